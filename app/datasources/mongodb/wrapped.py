"""Existing collections wrapped as queues (``DatasourceOptions.wrapped``), for ``MongoPollQueue``.

Documents of an existing collection matching a filter are claimed in place with the lease fields ``_sg_state``,
``_sg_lease_until``, ``_sg_owner``, ``_sg_deliveries``, ``_sg_claims`` and delivered as relaxed Extended JSON bodies
(``content-type: application/json``); ack deletes the document; requeue unsets the lease; dead-lettering copies it into
``<destination>.DLQ`` (under an id of its own, ``rules.wrapped_dead_letter_id``) and then deletes it. Their message ids are ``wrapped:["<collection>", "<_id as Extended JSON>"]``
(``WRAPPED_PREFIX``). The rules are those of ``app.datasources.rules`` on these ``_sg_`` fields; on FerretDB a claim
takes the same claim tokens as the queue collection's (``ferretdb_claims``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from bson import json_util
from pymongo import ReturnDocument

from app.datasources import rules
from app.datasources.interface import (
    NewMessage,
    QueueStats,
    Release,
    StoredMessage,
    WrappedCollection,
)
from app.datasources.mongodb._common import Collection, Db, Doc, message_doc
from app.datasources.mongodb._sequence import SequenceAllocator
from app.datasources.mongodb.ferretdb_claims import ClaimTokens

__all__ = ["WRAPPED_PREFIX", "WrappedQueues"]

WRAPPED_PREFIX = "wrapped:"  # message ids of wrapped documents: wrapped:["<collection>", "<_id as Extended JSON>"]
_WRAPPED_FIELDS = ("_sg_state", "_sg_lease_until", "_sg_owner", "_sg_deliveries", "_sg_claims")


def _wrapped_ready(now_ms: int) -> Doc:
    return {"$or": [{"_sg_state": {"$ne": "leased"}}, {"_sg_lease_until": {"$lte": now_ms}}]}


def _wrapped_id(collection: str, doc_id: object) -> str:
    return WRAPPED_PREFIX + json.dumps([collection, json_util.dumps(doc_id)])


def _parse_wrapped_id(message_id: str) -> tuple[str, object] | None:
    try:
        collection, raw = json.loads(message_id[len(WRAPPED_PREFIX) :])
        return str(collection), json_util.loads(raw)
    except (ValueError, TypeError):
        return None


class WrappedQueues:
    """The wrapped collections of one ``MongoPollQueue``, by destination. A dead-lettered document is copied into
    ``queue`` (the queue collection) with a sequence number of ``sequences``; on FerretDB claims take ``tokens``."""

    def __init__(
        self,
        db: Db,
        wrapped: Sequence[WrappedCollection],
        *,
        queue: Collection,
        ferretdb: bool,
        tokens: ClaimTokens,
        sequences: SequenceAllocator,
    ) -> None:
        self._db = db
        self._queue = queue
        self._ferretdb = ferretdb
        self._tokens = tokens
        self._sequences = sequences
        self._by_destination: dict[str, WrappedCollection] = {w.destination: w for w in wrapped}
        self._by_collection: dict[str, WrappedCollection] = {w.collection: w for w in wrapped}

    def get(self, destination: str) -> WrappedCollection | None:
        """The wrapped collection delivered as ``destination``, if any."""
        return self._by_destination.get(destination)

    def _coll(self, name: str) -> Collection:
        return Collection(self._db[name])

    def _target(self, message_id: str) -> tuple[Collection, object] | None:
        parsed = _parse_wrapped_id(message_id)
        if parsed is None or parsed[0] not in self._by_collection:
            return None
        return self._coll(parsed[0]), parsed[1]

    def _message(self, wrapped: WrappedCollection, doc: Mapping[str, Any]) -> StoredMessage:
        clean = {k: v for k, v in doc.items() if k not in _WRAPPED_FIELDS}
        body = json_util.dumps(clean, json_options=json_util.RELAXED_JSON_OPTIONS).encode()
        message_id = _wrapped_id(wrapped.collection, doc["_id"])
        return StoredMessage(
            message_id=message_id,
            destination=wrapped.destination,
            headers={"content-type": "application/json", "mongodb-collection": wrapped.collection},
            body=body,
            deliveries=int(doc.get("_sg_deliveries", 0)),
            lease=int(doc.get("_sg_claims", 0)),
        )

    # -- claim ----------------------------------------------------------------------------------------------------
    async def claim(
        self, wrapped: WrappedCollection, owner: str, limit: int, lease_until: int, now_ms: int
    ) -> list[StoredMessage]:
        coll = self._coll(wrapped.collection)
        query: Doc = {"$and": [dict(wrapped.filter), _wrapped_ready(now_ms)]}
        out: list[StoredMessage] = []
        if not self._ferretdb:
            update = {
                "$set": {"_sg_state": "leased", "_sg_lease_until": lease_until, "_sg_owner": owner},
                "$inc": {"_sg_deliveries": 1, "_sg_claims": 1},
            }
            for _ in range(limit):
                doc = await coll.find_one_and_update(
                    query, update, sort=[("_id", 1)], return_document=ReturnDocument.AFTER
                )
                if doc is None:
                    break
                out.append(self._message(wrapped, doc))
            return out
        for doc in await coll.find_list(query, sort=[("_id", 1)], limit=max(2 * limit, 16)):
            message_id = _wrapped_id(wrapped.collection, doc["_id"])
            read_version = int(doc.get("_sg_claims", 0))
            version = (await self._tokens.take([(f"w|{message_id}", message_id, read_version)], lease_until, now_ms)).get(
                message_id
            )
            if version is None:
                continue
            changes = {
                "_sg_state": "leased",
                "_sg_lease_until": lease_until,
                "_sg_owner": owner,
                "_sg_deliveries": int(doc.get("_sg_deliveries", 0)) + 1,
                "_sg_claims": version,
            }
            result = await coll.update_one({"_id": doc["_id"]}, {"$set": changes})
            if result.matched_count == 0:
                continue
            doc.update(changes)
            out.append(self._message(wrapped, doc))
            if len(out) >= limit:
                break
        return out

    # -- ack / release / renew -----------------------------------------------------------------------------------
    async def ack(self, pairs: Sequence[tuple[str, int | None]]) -> None:
        """Delete the wrapped documents among ``(message id, lease or None)``, each only under its lease if given."""
        for message_id, wrapped_lease in pairs:
            if message_id.startswith(WRAPPED_PREFIX):
                target = self._target(message_id)
                if target is not None:
                    coll, doc_id = target
                    fence = {} if wrapped_lease is None else {"_sg_claims": wrapped_lease}
                    await coll.delete_one({"_id": doc_id, **fence})

    async def release(self, pairs: Sequence[tuple[str, int | None]], how: Release) -> None:
        """Give back the wrapped documents among ``(message id, lease or None)``, one at a time."""
        for message_id, wrapped_lease in pairs:
            if message_id.startswith(WRAPPED_PREFIX):
                await self._release_one(message_id, how, wrapped_lease)

    async def _release_one(self, message_id: str, how: Release, lease: int | None = None) -> None:
        target = self._target(message_id)
        if target is None:
            return
        coll, doc_id = target
        fence = {} if lease is None else {"_sg_claims": lease}
        if how is Release.REQUEUE:
            await coll.update_one(
                {"_id": doc_id, "_sg_state": "leased", **fence},
                {"$set": {"_sg_state": "ready", "_sg_lease_until": 0, "_sg_owner": None},
                 "$inc": {"_sg_claims": 1}},
            )
            return
        doc = await coll.find_one({"_id": doc_id, "_sg_state": "leased", **fence})
        if doc is None:
            return
        wrapped = self._by_collection[coll.name]
        message = self._message(wrapped, doc)
        seq = await self._sequences.allocate("queue", 1)
        dead = message_doc(
            NewMessage(
                message_id=rules.wrapped_dead_letter_id(message_id),
                destination=rules.dead_letter_destination(wrapped.destination),
                headers=message.headers,
                body=message.body,
            ),
            seq_field="seq",
            seq=seq,
            flat_headers=self._ferretdb,
        )
        dead.update(
            state="ready", lease_until=0, owner=None, deliveries=0, claims=0, original_destination=wrapped.destination
        )
        await self._queue.insert_one(dead)  # copy first, then delete: a crash in between leaves a duplicate, never a loss
        # fenced like the read: had another consumer claimed it meanwhile, theirs is not deleted (a duplicate in the
        # DLQ then, never a loss)
        await coll.delete_one({"_id": doc_id, **fence})

    async def renew(self, owner: str, lease_until: int) -> None:
        for wrapped in self._by_destination.values():
            await self._coll(wrapped.collection).update_many(
                {"_sg_owner": owner, "_sg_state": "leased"}, {"$set": {"_sg_lease_until": lease_until}}
            )

    # -- inspection -----------------------------------------------------------------------------------------------
    async def stats(self, wrapped: WrappedCollection, now_ms: int) -> QueueStats:
        coll = self._coll(wrapped.collection)
        base = dict(wrapped.filter)
        ready = await coll.count_documents({"$and": [base, _wrapped_ready(now_ms)]})
        unacked = await coll.count_documents(
            {"$and": [base, {"_sg_state": "leased", "_sg_lease_until": {"$gt": now_ms}}]}
        )
        return QueueStats(ready=ready, unacked=unacked)

    async def peek(self, wrapped: WrappedCollection, now_ms: int, paging: Mapping[str, int]) -> list[StoredMessage]:
        """The ready documents in ``_id`` order, ``paging`` (``skip``/``limit``) applied by the server."""
        docs = await self._coll(wrapped.collection).find_list(
            {"$and": [dict(wrapped.filter), _wrapped_ready(now_ms)]}, sort=[("_id", 1)], **paging
        )
        return [self._message(wrapped, d) for d in docs]

    async def destinations(self) -> list[str]:
        """The destinations whose collection has a document matching its filter."""
        found: list[str] = []
        for wrapped in self._by_destination.values():
            if await self._coll(wrapped.collection).find_one(dict(wrapped.filter), projection={"_id": 1}):
                found.append(wrapped.destination)
        return found
