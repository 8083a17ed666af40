"""The broker's group commit: one submitter's bad item must not fail the others' writes."""

from __future__ import annotations

import asyncio

import pytest

from app.broker.batching import Batcher
from app.datasources.interface import DatasourceUnavailable


class Store:
    """A sink that refuses any batch holding a poisoned item (as SQLite refuses an out-of-range integer)."""

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.calls = 0
        self.down = False
        self.first_call = asyncio.Event()
        self.go_on = asyncio.Event()

    async def put(self, items: list[str]) -> None:
        self.calls += 1
        if self.calls == 1:  # hold the first write so that the next submissions pile up into one batch
            self.first_call.set()
            await self.go_on.wait()
        if self.down:
            raise DatasourceUnavailable("down")
        if any(item.startswith("bad") for item in items):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        self.rows.extend(items)


async def test_a_bad_group_fails_alone_and_the_others_are_written() -> None:
    store = Store()
    batcher: Batcher[str] = Batcher(store.put)
    first = batcher.submit(["warm-up"])
    await store.first_call.wait()
    good1 = batcher.submit(["a1", "a2"])
    bad = batcher.submit(["bad"])
    good2 = batcher.submit(["b1"])
    store.go_on.set()
    await first
    await good1
    await good2
    with pytest.raises(OverflowError):
        await bad
    assert store.rows == ["warm-up", "a1", "a2", "b1"]
    await batcher.close()


async def test_an_unavailable_database_fails_the_batch_at_once() -> None:
    store = Store()
    batcher: Batcher[str] = Batcher(store.put)
    first = batcher.submit(["warm-up"])
    await store.first_call.wait()
    store.down = True
    others = [batcher.submit([f"m{i}"]) for i in range(3)]
    store.go_on.set()
    for future in [first, *others]:
        with pytest.raises(DatasourceUnavailable):
            await future
    assert store.calls == 2  # the warm-up, then one try of the whole batch: no per-group retries while down
    await batcher.close()
