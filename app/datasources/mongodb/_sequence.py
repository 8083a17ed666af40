"""Gateway-assigned sequence numbers (queue ``seq``, topic ``position``), allocated in ranges of N per batch.

MongoDB: one ``find_one_and_update({_id: name}, {$inc: {n: N}}, upsert)`` per batch; atomic on the server.

FerretDB v1: ``findAndModify``/``update`` read the document, compute and write it back with no compare-and-swap, so
two gateways incrementing at once can both get the same range. What FerretDB's storage does make atomic is an insert
into a unique ``_id``. So there a range is *reserved* by inserting ``{_id: "<name>@<start>", end}``: a reservation
always starts right after an existing one's ``end``, so reservations form a chain with unique starts, and a duplicate
key means someone else took that start: read their ``end`` and try right after it. A hint document
``{_id: name, n}`` (raised with ``$max`` after each reservation, a lost update only makes it stale) says where to
begin walking. Cost: 3 round trips per batch instead of 1. Old reservations are pruned now and then.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from app.datasources.mongodb._common import Collection

__all__ = ["SequenceAllocator"]

PRUNE_EVERY = 1_000  # reservations between two prunes
PRUNE_KEEP = 100_000  # positions behind the hint whose reservations are kept (a walker never starts that far back)


class SequenceAllocator:
    def __init__(self, counters: Collection, *, ferretdb: bool) -> None:
        self._counters = counters
        self._ferretdb = ferretdb
        self._locks: dict[str, asyncio.Lock] = {}
        self._since_prune = 0

    async def allocate(self, name: str, count: int) -> int:
        """Reserve ``count`` consecutive numbers; return the first. Numbers start at 1."""
        if count <= 0:
            raise ValueError("count must be positive")
        if not self._ferretdb:
            doc = await self._counters.find_one_and_update(
                {"_id": name}, {"$inc": {"n": count}}, upsert=True, return_document=ReturnDocument.AFTER
            )
            assert doc is not None
            return int(doc["n"]) - count + 1
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # one walker per gateway and name: the others would only collide with it
            return await self._reserve(name, count)

    async def _reserve(self, name: str, count: int) -> int:
        hint_doc = await self._counters.find_one({"_id": name})
        start = int(hint_doc["n"]) + 1 if hint_doc is not None else 1
        while True:
            end = start + count - 1
            try:
                await self._counters.insert_one({"_id": f"{name}@{start}", "name": name, "start": start, "end": end})
                break
            except DuplicateKeyError:
                taken: dict[str, Any] | None = await self._counters.find_one({"_id": f"{name}@{start}"})
                start = int(taken["end"]) + 1 if taken is not None else start + 1
        try:
            await self._counters.update_one({"_id": name}, {"$max": {"n": end}}, upsert=True)
        except DuplicateKeyError:  # two first-ever upserts raced; the hint exists now
            await self._counters.update_one({"_id": name}, {"$max": {"n": end}})
        self._since_prune += 1
        if self._since_prune >= PRUNE_EVERY:
            self._since_prune = 0
            await self._counters.delete_many({"name": name, "end": {"$lt": end - PRUNE_KEEP}})
        return start

    async def allocated_end(self, name: str) -> int:
        """The highest number reserved so far (0 before the first): written, in flight or abandoned. On FerretDB the
        hint can lag (a lost ``$max``), so the reservation chain is walked from it."""
        hint_doc = await self._counters.find_one({"_id": name})
        end = int(hint_doc["n"]) if hint_doc is not None else 0
        if not self._ferretdb:
            return end
        while (taken := await self._counters.find_one({"_id": f"{name}@{end + 1}"})) is not None:
            end = int(taken["end"])
        return end
