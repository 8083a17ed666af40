"""PollQueue on MongoDB: every queue of a gateway namespace in one collection ``<ns>.queue``.

Document: ``{_id (= message_id), message_id, destination, seq, priority, state ("ready" | "leased"), lease_until,
owner, deliveries, claims, expires_at, published_at, headers: [{k, v}], body, original_destination}`` (plus ``hdrs``
on FerretDB, see ``_common.message_doc``). Index ``(destination, state, priority desc, seq)`` serves the claim.
``claims`` counts every claim and release of the message and is never reset: it is the version the FerretDB claim
path races on. What ready, a claim, a requeue and a dead-lettering are is ``app.datasources.rules``' (its ``mongo_``
forms); this module applies them.

Claim atomicity, and why it differs by server:

* MongoDB: ``find_one_and_update`` (findAndModify) is atomic per document, so one round trip per message claims it
  (sorted ``priority desc, seq asc``; ready = ``state: ready`` or an expired lease; not expired by ``expires_at``).
* FerretDB v1: findAndModify reads the document, then writes it back by ``_id`` with no compare-and-swap, so a
  claimer wins a message by inserting a unique claim token into ``<ns>.claims`` first, and the sorted candidate read
  is shared by a per-destination window: see ``ferretdb_claims``, which also gives the cost model this path follows.

Wrapped collections (``DatasourceOptions.wrapped``), documents of an existing collection claimed in place: see
``wrapped``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Literal

from pymongo import DeleteOne, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError

from app.datasources import rules
from app.datasources.interface import (
    DatasourceRefused,
    PEEK_SCAN_LIMIT,
    SCAN_BUDGET,
    DatasourceError,
    HeaderFilter,
    NewMessage,
    PollQueue,
    QueueStats,
    Release,
    ScanMark,
    StoredMessage,
    WrappedCollection,
)
from app.datasources.mongodb._common import (
    Collection,
    Db,
    Doc,
    headers_from_list,
    is_duplicate_only,
    judge_duplicates,
    message_doc,
    stored_from_doc,
    translate_selector,
    unavailable_on_disconnect,
)
from app.datasources.failover import FailoverWriter
from app.datasources.mongodb._sequence import SequenceAllocator
from app.datasources.mongodb.ferretdb_claims import (
    RELEASE_HOLD_MS,
    ClaimTokens,
    HeldVersions,
    Window,
    gather_limited,
    window_size,
)
from app.datasources.mongodb.wrapped import WRAPPED_PREFIX, WrappedQueues
from app.datasources.wakeups import Signals

__all__ = ["WRAPPED_PREFIX", "MongoPollQueue"]

MAX_CLAIM_ROUNDS = 4  # candidate reads per claim call before returning fewer than ``limit``
SCAN_BATCH = 128  # documents one read of a selector scan takes


def _release_update(how: Release) -> Doc | list[Doc]:
    """The MongoDB update that gives a leased document back: requeue it, or (one pipeline update per document,
    atomic on MongoDB; FerretDB v1 has no pipeline updates and takes its own path) move it to its dead-letter queue."""
    if how is Release.REQUEUE:
        return {"$set": {**rules.MONGO_REQUEUE_SET}}
    return rules.mongo_dead_letter_pipeline()


def _after_in_order(after: tuple[int, int]) -> Doc:
    """Documents after ``(priority, seq)`` in delivery order (priority descending, then seq)."""
    priority, seq = after
    return {"$or": [{"priority": priority, "seq": {"$gt": seq}}, {"priority": {"$lt": priority}}]}


class MongoPollQueue(PollQueue):
    def __init__(
        self,
        db: Db,
        namespace: str,
        *,
        ferretdb: bool,
        writer: FailoverWriter,
        sequences: SequenceAllocator,
        wrapped: Sequence[WrappedCollection] = (),
    ) -> None:
        self._coll = Collection(db[f"{namespace}.queue"])
        self._claims = Collection(db[f"{namespace}.claims"])
        self._ferretdb = ferretdb
        # how a claim without a Python selector is made: "atomic" is one find_one_and_update per message (exactly
        # once on MongoDB only); the bench's reference loop sets it on FerretDB to show why "tokens" is used there
        self.claim_mode: Literal["atomic", "tokens"] = "tokens" if ferretdb else "atomic"
        self._writer = writer
        self._sequences = sequences
        self._signals = Signals()
        self._tokens = ClaimTokens(self._claims)
        self._wrapped = WrappedQueues(
            db, wrapped, queue=self._coll, ferretdb=ferretdb, tokens=self._tokens, sequences=sequences
        )
        self._windows: dict[str, Window] = {}
        self._generation: dict[str, int] = {}
        self._window_reads: dict[str, asyncio.Future[None]] = {}
        self._held = HeldVersions()

    def _merge_into_windows(self, docs: list[Doc]) -> None:
        """FerretDB: new ready messages of this gateway join the windows in delivery order. A window is a sorted
        prefix of the ready messages; a new message sorting after its last entry belongs beyond it and is left to
        the next read (unless the window held everything, then it is appended)."""
        by_destination: dict[str, list[Doc]] = {}
        for doc in docs:
            by_destination.setdefault(doc["destination"], []).append(doc)
        for destination, new in by_destination.items():
            window = self._windows.get(destination)
            if window is not None:
                window.merge(new)

    def _invalidate(self, destination: str | None = None) -> None:
        """Local work changed what is ready: the next claim reads a fresh window (``None``: every destination)."""
        if destination is None:
            for key in list(self._generation):
                self._generation[key] += 1
            self._windows.clear()
        else:
            self._generation[destination] = self._generation.get(destination, 0) + 1
            self._windows.pop(destination, None)

    async def setup(self) -> None:
        await self._coll.create_index(
            [("destination", 1), ("state", 1), ("priority", -1), ("seq", 1)], name="claim_order"
        )
        await self._coll.create_index([("owner", 1)], name="owner")
        if self._ferretdb:
            await self._claims.create_index([("at", 1)], name="age")

    # -- put ------------------------------------------------------------------------------------------------------
    async def put(self, messages: Sequence[NewMessage]) -> None:
        msgs = list(messages)
        if not msgs:
            return
        ids = [m.message_id for m in msgs]
        if len(set(ids)) != len(ids):
            raise DatasourceError("put: a message with the same message_id appears twice in one batch")
        first: int | None = None
        stored: list[Doc] = []

        spurious: list[BulkWriteError] = []  # the tries refused for messages not stored

        async def write(retry: bool) -> None:
            nonlocal first, stored
            if first is None:
                first = await self._sequences.allocate("queue", len(msgs))
            docs = stored = [self._new_doc(m, first + i) for i, m in enumerate(msgs)]
            try:
                await self._coll.insert_many(docs, ordered=not retry)
            except BulkWriteError as exc:
                if not is_duplicate_only(exc):
                    raise
                whose = await judge_duplicates(self._coll, exc, "seq", spurious)
                if whose == "ours":  # an earlier attempt of this call stored them: unordered, the rest went in too
                    return None if retry else await write(True)
                # a put is all or nothing: undo the part of this batch stored before the duplicate
                index = min(int(e.get("index", 0)) for e in exc.details.get("writeErrors", []))
                if index:
                    await self._coll.delete_many({"_id": {"$in": ids[:index]}})
                raise DatasourceError("put: a message with the same message_id is already stored") from exc

        await self._writer.run(len(msgs), write)
        if self._ferretdb:
            self._merge_into_windows(stored)
        for destination in {m.destination for m in msgs}:
            self._signals.notify(destination)

    def _new_doc(self, message: NewMessage, seq: int) -> Doc:
        doc = message_doc(message, seq_field="seq", seq=seq, flat_headers=self._ferretdb)
        doc.update(state="ready", lease_until=0, owner=None, deliveries=0, claims=0, original_destination=None)
        return doc

    # -- claim ----------------------------------------------------------------------------------------------------
    async def claim(
        self,
        destination: str,
        *,
        owner: str,
        limit: int,
        lease_ms: int,
        now_ms: int,
        selector: HeaderFilter | None = None,
        native_selector: Mapping[str, object] | None = None,
        scan: ScanMark | None = None,
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        wrapped = self._wrapped.get(destination)
        with unavailable_on_disconnect("claim"):
            if wrapped is not None:
                return await self._wrapped.claim(wrapped, owner, limit, rules.lease_until(now_ms, lease_ms), now_ms)
            query: Doc = {"destination": destination, **rules.mongo_claimable(now_ms)}
            if native_selector:
                query = {"$and": [query, translate_selector(native_selector, ferretdb=self._ferretdb)]}
            lease_until = rules.lease_until(now_ms, lease_ms)
            if self.claim_mode == "atomic" and selector is None:
                return await self._claim_mongodb(query, owner, limit, lease_until)
            if self._ferretdb and selector is None and not native_selector:
                return await self._claim_window(destination, query, owner, limit, lease_until, now_ms)
            if selector is not None and scan is not None:
                return await self._claim_scan_marked(query, owner, limit, lease_until, now_ms, selector, scan)
            return await self._claim_scan(query, owner, limit, lease_until, now_ms, selector)

    async def _claim_scan_marked(
        self,
        query: Doc,
        owner: str,
        limit: int,
        lease_until: int,
        now_ms: int,
        selector: HeaderFilter,
        scan: ScanMark,
    ) -> list[StoredMessage]:
        """A subscription's claim with a Python selector: read on from where its last claim stopped, examine at most
        ``SCAN_BUDGET`` documents, claim the matching ones. Other gateways' puts and requeues cannot be seen from
        here, so a scan that reached the end of the backlog starts over at the next claim (every ``poll_interval``
        when idle): each claim costs a bounded read, and a matching message deep in the backlog is reached."""
        after = scan.after if scan.more else None
        examined = 0
        out: list[Doc] = []
        more = False
        while len(out) < limit:
            if examined >= SCAN_BUDGET:
                more = True
                break
            page = min(SCAN_BATCH, SCAN_BUDGET - examined)
            resume = query if after is None else {"$and": [query, _after_in_order(after)]}
            docs = await self._coll.find_list(resume, sort=rules.MONGO_CLAIM_ORDER, limit=page)
            want = limit - len(out)
            candidates: list[Doc] = []
            for doc in docs:  # stop at the last candidate wanted: the mark must not pass a match left unclaimed
                examined += 1
                after = (int(doc["priority"]), int(doc["seq"]))
                if selector(headers_from_list(doc.get("headers"))):
                    candidates.append(doc)
                    if len(candidates) == want:
                        break
            if self._ferretdb:
                out += await self._claim_batch_ferretdb(candidates, owner, lease_until, now_ms)
            else:
                for doc in candidates:
                    claimed = await self._claim_one(doc, query, owner, lease_until)
                    if claimed is not None:
                        out.append(claimed)
            if len(docs) < page and len(candidates) < want:
                break  # the end of the backlog
        else:
            more = True  # the limit was reached: go on from here next time
        scan.after, scan.more = after, more
        return [stored_from_doc(d, seq_field="seq") for d in sorted(out, key=lambda d: (-d["priority"], d["seq"]))]

    async def _claim_mongodb(self, query: Doc, owner: str, limit: int, lease_until: int) -> list[StoredMessage]:
        update = rules.mongo_claim_update(owner, lease_until)
        out: list[StoredMessage] = []
        for _ in range(limit):
            doc = await self._coll.find_one_and_update(
                query, update, sort=rules.MONGO_CLAIM_ORDER, return_document=ReturnDocument.AFTER
            )
            if doc is None:
                break
            out.append(stored_from_doc(doc, seq_field="seq"))
        return out

    async def _claim_scan(
        self, query: Doc, owner: str, limit: int, lease_until: int, now_ms: int, selector: HeaderFilter | None
    ) -> list[StoredMessage]:
        """Read candidates in delivery order, then claim them (atomic per message, see module doc and
        ``ferretdb_claims``). On FerretDB a round is: one read, one unordered ``insert_many`` of claim tokens (the
        duplicates are the ones lost), one ``update_many`` of the won documents and one re-read: 4 round trips
        whatever ``limit`` is."""
        out: list[Doc] = []
        skip = 0
        for _round in range(MAX_CLAIM_ROUNDS):
            want = limit - len(out)
            batch = max(2 * want, 16)
            docs = await self._coll.find_list(query, sort=rules.MONGO_CLAIM_ORDER, skip=skip, limit=batch)
            candidates: list[Doc] = []
            for doc in docs:
                if selector is not None and not selector(headers_from_list(doc.get("headers"))):
                    skip += 1  # stays ready: page past it next round
                    continue
                candidates.append(doc)
            if self._ferretdb:
                out += await self._claim_batch_ferretdb(candidates[:want], owner, lease_until, now_ms)
            else:
                for doc in candidates:
                    claimed = await self._claim_one(doc, query, owner, lease_until)
                    if claimed is not None:
                        out.append(claimed)
                        if len(out) >= limit:
                            break
            if len(out) >= limit or len(docs) < batch:
                break
        return [stored_from_doc(d, seq_field="seq") for d in sorted(out, key=lambda d: (-d["priority"], d["seq"]))]

    async def _claim_one(self, doc: Doc, query: Doc, owner: str, lease_until: int) -> Doc | None:
        """MongoDB, with a Python selector: re-check readiness and lease the message atomically, by ``_id``."""
        return await self._coll.find_one_and_update(
            {"$and": [query, {"_id": doc["_id"]}]},
            rules.mongo_claim_update(owner, lease_until),
            return_document=ReturnDocument.AFTER,
        )

    async def _claim_window(
        self, destination: str, query: Doc, owner: str, limit: int, lease_until: int, now_ms: int
    ) -> list[StoredMessage]:
        """FerretDB without a selector: claim from the head of this destination's window (see ``ferretdb_claims``)."""
        out: list[Doc] = []
        for _round in range(MAX_CLAIM_ROUNDS):
            want = limit - len(out)
            window = await self._window(destination, query, want, now_ms)
            candidates = window.take(want, now_ms, self._held)
            try:
                leased = await self._claim_batch_ferretdb(candidates, owner, lease_until, now_ms)
            except BaseException:
                self._held.settle(candidates, [])
                raise
            self._held.settle(candidates, leased)
            out += leased
            if len(out) >= limit or (not window.docs and window.complete):
                break
        return [stored_from_doc(d, seq_field="seq") for d in sorted(out, key=lambda d: (-d["priority"], d["seq"]))]

    async def _window(self, destination: str, query: Doc, want: int, now_ms: int) -> Window:
        generation = self._generation.setdefault(destination, 0)
        window = self._windows.get(destination)
        if window is not None and window.docs and window.usable(now_ms, generation):
            return window
        reading = self._window_reads.get(destination)
        if reading is not None:  # another local claimer is reading it: share that read
            await asyncio.shield(reading)
            window = self._windows.get(destination)
            if window is not None and window.docs and window.usable(now_ms, self._generation[destination]):
                return window
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._window_reads[destination] = done
        try:
            size = window_size(self._windows.get(destination), want)
            started = time.monotonic()
            docs = await self._coll.find_list(query, sort=rules.MONGO_CLAIM_ORDER, limit=size)
            window = Window(docs, now_ms, generation, len(docs) < size, time.monotonic() - started)
            if self._generation[destination] == generation:
                self._windows[destination] = window
            return window
        finally:
            if self._window_reads.get(destination) is done:
                del self._window_reads[destination]
            done.set_result(None)

    async def _claim_batch_ferretdb(
        self, candidates: list[Doc], owner: str, lease_until: int, now_ms: int
    ) -> list[Doc]:
        """Win each candidate's next version with a token, then lease it by ``_id`` and the version read. Returns
        the documents leased (as stored now)."""
        if not candidates:
            return []
        won = await self._tokens.take(
            [(f"q|{d['_id']}", str(d["_id"]), int(d.get("claims", 0))) for d in candidates], lease_until, now_ms
        )
        if not won:
            return []
        leased = [d for d in candidates if str(d["_id"]) in won]
        # the claim rule's ``$set``; ``claims`` is the version the token won, ``deliveries`` one more than read
        claim_set = rules.mongo_claim_update(owner, lease_until)["$set"]
        changes = {
            str(d["_id"]): {
                **claim_set, "claims": won[str(d["_id"])], "deliveries": int(d.get("deliveries", 0)) + 1
            }
            for d in leased
        }
        # one command, one statement per message by ``_id`` and the version read (no ``$in``: see
        # ``ferretdb_claims``); no match means the message was acked (deleted) after our read - the token keeps others
        # off it anyway
        matched = await self._coll.bulk_write(
            [UpdateOne({"_id": d["_id"], "claims": int(d.get("claims", 0))}, {"$set": changes[str(d["_id"])]})
             for d in leased]
        )
        out = [{**d, **changes[str(d["_id"])]} for d in leased]
        if matched == len(leased):
            return out
        still = [await self._coll.find_one({"_id": d["_id"], "claims": d["claims"], "owner": owner}) for d in out]
        return [d for d, stored in zip(out, still, strict=True) if stored is not None]

    # -- ack / release / renew -----------------------------------------------------------------------------------
    async def ack(self, message_ids: Sequence[str], leases: Sequence[int] | None = None) -> None:
        plain = [i for i in message_ids if not i.startswith(WRAPPED_PREFIX)]
        # (id, lease) pairs, never a dict by id: one batch may name a message twice (two consumers of this gateway,
        # one of them late), and each must be judged under its own lease
        pairs = list(dict.fromkeys(zip(message_ids, leases))) if leases is not None else None
        if self._ferretdb and pairs is not None:
            fenced = [(i, lease) for i, lease in pairs if not i.startswith(WRAPPED_PREFIX)]
            self._held.retire([i for i, _ in fenced], [lease for _, lease in fenced])
        elif self._ferretdb:
            self._held.retire(plain)
        with unavailable_on_disconnect("ack"):
            if plain and pairs is not None:  # fenced: only under the lease the consumer was given
                await self._coll.bulk_write(
                    [DeleteOne({"_id": i, "claims": lease}) for i, lease in pairs if not i.startswith(WRAPPED_PREFIX)]
                )
            elif plain and self._ferretdb:  # one statement per ``_id``: a ``$in`` filter is a full decode there
                await self._coll.bulk_write([DeleteOne({"_id": i}) for i in dict.fromkeys(plain)])
            elif plain:
                await self._coll.delete_many({"_id": {"$in": plain}})
            await self._wrapped.ack(pairs if pairs is not None else [(i, None) for i in dict.fromkeys(message_ids)])

    async def release(self, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None = None) -> None:
        plain = [i for i in message_ids if not i.startswith(WRAPPED_PREFIX)]
        pairs = list(dict.fromkeys(zip(message_ids, leases))) if leases is not None else None  # see ack
        plain_pairs = None if pairs is None else [(i, lease) for i, lease in pairs if not i.startswith(WRAPPED_PREFIX)]
        if self._ferretdb:
            self._held.forget(plain)
        with unavailable_on_disconnect("release"):
            if plain:
                if self._ferretdb:
                    await self._release_ferretdb(plain, how, plain_pairs)
                elif plain_pairs is not None:
                    await self._release_fenced(plain_pairs, how)
                else:
                    await self._coll.update_many({"_id": {"$in": plain}, "state": "leased"}, _release_update(how))
            await self._wrapped.release(pairs if pairs is not None else [(i, None) for i in message_ids], how)
        self._invalidate()
        self._signals.notify_all()

    async def _release_fenced(self, pairs: list[tuple[str, int]], how: Release) -> None:
        """MongoDB: each document only while still leased under its consumer's token (one statement each)."""
        update = _release_update(how)
        await self._coll.bulk_write(
            [UpdateOne({"_id": i, "state": "leased", "claims": lease}, update) for i, lease in pairs]
        )

    async def _release_ferretdb(
        self, ids: list[str], how: Release, pairs: list[tuple[str, int]] | None = None
    ) -> None:
        async def one(message_id: str, lease: int | None) -> None:
            doc = await self._coll.find_one({"_id": message_id, "state": "leased"})
            if doc is None:
                return
            read_version = int(doc.get("claims", 0))
            if lease is not None and read_version != lease:
                return  # claimed again since this consumer's lease: not ours to give back
            # the token is held RELEASE_HOLD_MS: a claimer steps over it only if this release died before its update
            now_ms = int(time.time() * 1000)
            won = await self._tokens.take(
                [(f"q|{doc['_id']}", str(doc["_id"]), read_version)], now_ms + RELEASE_HOLD_MS, now_ms,
                look_up_at_once=True,
            )
            version = won.get(str(doc["_id"]))
            if version is None:
                return  # re-claimed by someone else since: our lease is gone, nothing to release
            # the rules' requeue and dead-letter sets, from the document read (no pipeline updates on FerretDB v1)
            changes: Doc = {**rules.MONGO_REQUEUE_SET, "claims": version}
            if how is Release.DEAD_LETTER:
                changes["original_destination"] = doc.get("original_destination") or doc["destination"]
                changes["destination"] = rules.dead_letter_destination(doc["destination"])
                changes["deliveries"] = 0
            # by the version read too: had someone stepped over our token meanwhile, their lease is not undone
            await self._coll.update_one({"_id": doc["_id"], "claims": read_version}, {"$set": changes})

        work = pairs if pairs is not None else [(i, None) for i in dict.fromkeys(ids)]
        await gather_limited([lambda i=i, lease=lease: one(i, lease) for i, lease in work])

    async def renew(self, owner: str, *, lease_ms: int, now_ms: int) -> None:
        lease_until = rules.lease_until(now_ms, lease_ms)
        with unavailable_on_disconnect("renew"):
            await self._coll.update_many(
                {"owner": owner, "state": "leased"}, {"$set": {"lease_until": lease_until}}
            )
            await self._wrapped.renew(owner, lease_until)

    def wake_token(self, destination: str) -> asyncio.Event:
        return self._signals.event(destination)

    async def wait(self, destination: str, timeout: float, token: asyncio.Event | None = None) -> None:
        await self._signals.wait(destination, timeout, token)

    # -- inspection -----------------------------------------------------------------------------------------------
    async def stats(self, destination: str, *, now_ms: int) -> QueueStats:
        with unavailable_on_disconnect("stats"):
            wrapped = self._wrapped.get(destination)
            if wrapped is not None:
                return await self._wrapped.stats(wrapped, now_ms)
            ready = await self._coll.count_documents({"destination": destination, **rules.mongo_claimable(now_ms)})
            unacked = await self._coll.count_documents(
                {"destination": destination, "state": "leased", "lease_until": {"$gt": now_ms}}
            )
            return QueueStats(ready=ready, unacked=unacked)

    async def peek(
        self, destination: str, *, limit: int, offset: int = 0, now_ms: int, selector: HeaderFilter | None = None
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        scanned = {"limit": PEEK_SCAN_LIMIT}  # with a selector: the first PEEK_SCAN_LIMIT, filtered here
        with unavailable_on_disconnect("peek"):
            wrapped = self._wrapped.get(destination)
            paging: dict[str, int] = {"skip": offset, "limit": limit} if selector is None else scanned
            if wrapped is not None:
                messages = await self._wrapped.peek(wrapped, now_ms, paging)
            else:
                query = {"destination": destination, **rules.mongo_claimable(now_ms)}
                docs = await self._coll.find_list(query, sort=rules.MONGO_CLAIM_ORDER, **paging)
                messages = [stored_from_doc(d, seq_field="seq") for d in docs]
        if selector is None:
            return messages
        return [m for m in messages if selector(m.headers)][offset : offset + limit]

    async def destinations(self) -> list[str]:
        with unavailable_on_disconnect("destinations"):
            found = {str(d) for d in await self._coll.distinct("destination")}
            found.update(await self._wrapped.destinations())
        return sorted(found)

    async def purge(self, destination: str) -> int:
        wrapped = self._wrapped.get(destination)
        if wrapped is not None:
            raise DatasourceRefused(
                f"purge: {destination} wraps the existing collection {wrapped.collection!r}; "
                "refusing to delete its documents in bulk"
            )
        with unavailable_on_disconnect("purge"):
            result = await self._coll.delete_many({"destination": destination})
        self._invalidate(destination)
        return result.deleted_count

    def close(self) -> None:
        self._signals.notify_all()

