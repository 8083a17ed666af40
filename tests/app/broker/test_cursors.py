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
