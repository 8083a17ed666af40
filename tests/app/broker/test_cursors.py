"""The cursor saver: a deleted durable subscription's position cannot come back from a save still waiting."""

from __future__ import annotations

import asyncio

from app.broker.cursors import CursorSaver
from app.broker.supervision import BackgroundHealth


async def test_a_delete_drops_a_waiting_save_and_is_not_overtaken_by_one_in_flight() -> None:
    stored: dict[str, int] = {}
    saving = asyncio.Event()
    release = asyncio.Event()

    async def save(name: str, position: int) -> None:
        saving.set()
        await release.wait()  # a slow database: this save is in flight while the delete comes
        stored[name] = position

    async def delete(name: str) -> None:
        stored.pop(name, None)

    saver = CursorSaver(save, delete, BackgroundHealth())
    first = saver.save_soon("client/1", 5)
    await saving.wait()  # the flush holding position 5 is running
    second = saver.save_soon("client/1", 9)  # waits for the next flush
    deleting = asyncio.ensure_future(saver.delete("client/1"))
    release.set()
    await first
    await deleting
    await second  # told done: its subscription is gone
    await saver.close()
    assert stored == {}


async def test_a_failed_delete_puts_the_waiting_position_back() -> None:
    """The database refuses the delete: the position it dropped is saved after all, and whoever waited for it (a
    durable ACK's RECEIPT, ahead of everything the connection sent later) is answered, not left waiting for ever."""
    stored: dict[str, int] = {}

    async def save(name: str, position: int) -> None:
        stored[name] = position

    async def delete(name: str) -> None:
        raise RuntimeError("the database is away")

    saver = CursorSaver(save, delete, BackgroundHealth())
    waiting = saver.save_soon("client/1", 5)
    try:
        await saver.delete("client/1")
    except RuntimeError:
        pass
    await asyncio.wait_for(waiting, 5)
    assert stored == {"client/1": 5}
    await saver.close()
