"""PollQueue on MongoDB: every queue of a gateway namespace in one collection ``<ns>.queue``.

Document: ``{_id (= message_id), message_id, destination, seq, priority, state ("ready" | "leased"), lease_until,
owner, deliveries, claims, expires_at, published_at, headers: [{k, v}], body, original_destination}`` (plus ``hdrs``
on FerretDB, see ``_common.message_doc``). Index ``(destination, state, priority desc, seq)`` serves the claim.
``claims`` counts every claim and release of the message and is never reset: it is the version the FerretDB claim
path races on.

Claim atomicity, and why it differs by server:

* MongoDB: ``find_one_and_update`` (findAndModify) is atomic per document, so one round trip per message claims it
  (sorted ``priority desc, seq asc``; ready = ``state: ready`` or an expired lease; not expired by ``expires_at``).
* FerretDB v1: findAndModify reads the document, then writes it back by ``_id`` with no compare-and-swap, so two
  concurrent claimers can both "win" the same message (measured here: duplicates within seconds). What its storage
  does make atomic is an insert into a unique ``_id`` index. So a claimer reads candidates, then inserts a claim
  token ``{_id: "q|<message _id>|<claims + 1>"}`` into ``<ns>.claims``: exactly one claimer can insert the token
  for a given version, a ``DuplicateKeyError`` means another one won. The winner then writes the lease (and the
  version won into ``claims``) with ``update_one({_id, claims: <version read>})``; no match means the message was
  acked (deleted) meanwhile, and it is dropped. Releases take the same kind of token, so a release racing a
  re-claim of an expired lease has one winner too. A token whose claim lease expired while the document still
  shows the old version belongs to a claimer that died between token and update; the next version is tried.
  Tokens carry the gateway time and are pruned after ``TOKEN_KEEP_MS``.

  Cost model (FerretDB 1.24, PostgreSQL or SQLite backend, measured): only top-level equality is pushed down to SQL,
  and every document that reaches FerretDB is decoded (~0.1 ms each), so a sorted read or any ``$in``/range filter
  costs O(documents of the collection or destination) - ~0.5 s at 5,000 -, while a write or read by ``_id`` equality
  costs ~1-4 ms. (That too grows with the collection: on PostgreSQL FerretDB pushes equality down as
  ``_jsonb->'_id' @> <value>``, which its B-tree index on ``_jsonb->'_id'`` cannot serve, so each such statement is a
  sequential scan of the table - cheap per row, but a large backlog makes every claim and ack slower.) So the FerretDB
  path never filters by ``$in``: claims, acks, releases and token look-ups work per ``_id``, and the sorted candidate
  read is shared: each ``MongoPollQueue`` keeps a *window* per destination - the next ready messages in delivery
  order, read with one query - and hands its head to successive claims (an in-process lock-free pop, so local claimers
  never contend). A window holds ``WINDOW`` documents, or behind a backlog (the previous read did not return every
  ready message) up to ``WINDOW_MAX`` as long as they fit ``WINDOW_BYTES``: the read costs O(backlog) whatever its
  limit. A local ``put`` merges its messages into the window (so this gateway's own messages are claimed in exact
  priority/FIFO order); the window is read again when it runs out, after a local ``release``/``purge``, and once it is
  ``max_age`` old by the gateway clock or by ``now_ms`` (``max(WINDOW_S, 4 x the read's duration)``: leases that
  expired since and another gateway's puts wait at most that long - ordering between gateways is by arrival anyway -
  and reading stays a small share of the database's work). A window entry another gateway took meanwhile just loses
  its token and is skipped (its holder is looked up only if it comes round again, ``_Lost``). A copy of a message this
  process is claiming, holds or acked, read before that write landed, is skipped without a token (``_Held``). Per
  claim call: 1 ``insert_many`` of tokens + 1 unordered ``bulk_write`` of one ``update_one`` per message, plus one
  sorted read per window; an ack is 1 ``bulk_write`` of ``delete_one``s. Selectors (Python or native) read fresh
  candidates each call.

Wrapped collections (``DatasourceOptions.wrapped``): documents of an existing collection matching a filter are
claimed in place with the lease fields ``_sg_state``, ``_sg_lease_until``, ``_sg_owner``, ``_sg_deliveries``,
``_sg_claims`` and delivered as relaxed Extended JSON bodies (``content-type: application/json``); ack deletes the
document; requeue unsets the lease; dead-lettering copies it into ``<destination>.DLQ`` and then deletes it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

from bson import json_util
from pymongo import DeleteOne, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from app.datasources.interface import (
    DatasourceError,
    HeaderFilter,
    NewMessage,
    PollQueue,
    ScanMark,
    SCAN_BUDGET,
    PEEK_SCAN_LIMIT,
    QueueStats,
    Release,
    Signals,
    StoredMessage,
    WrappedCollection,
)
from app.datasources.mongodb._common import (
    Collection,
    Db,
    Doc,
    headers_from_list,
    is_duplicate_only,
    message_doc,
    stored_from_doc,
    translate_selector,
    unavailable_on_disconnect,
)
from app.datasources.mongodb._failover import FailoverWriter
from app.datasources.mongodb._sequence import SequenceAllocator

__all__ = ["WRAPPED_PREFIX", "MongoPollQueue"]

SORT: list[tuple[str, int]] = [("priority", -1), ("seq", 1)]
MAX_CLAIM_ROUNDS = 4  # candidate reads per claim call before returning fewer than ``limit``
SCAN_BATCH = 128  # documents one read of a selector scan takes


def _release_update(how: Release) -> Any:
    """The MongoDB update that gives a leased document back: requeue it, or (one pipeline update per document,
    atomic on MongoDB; FerretDB v1 has no pipeline updates and takes its own path) move it to its dead-letter queue."""
    if how is Release.REQUEUE:
        return {"$set": {"state": "ready", "lease_until": 0, "owner": None}}
    return [
        {
            "$set": {
                "original_destination": {"$ifNull": ["$original_destination", "$destination"]},
                "destination": {"$concat": ["$destination", ".DLQ"]},
                "deliveries": 0,
                "state": "ready",
                "lease_until": 0,
                "owner": None,
            }
        }
    ]


def _after_in_order(after: tuple[int, int]) -> Doc:
    """Documents after ``(priority, seq)`` in delivery order (priority descending, then seq)."""
    priority, seq = after
    return {"$or": [{"priority": priority, "seq": {"$gt": seq}}, {"priority": {"$lt": priority}}]}
# FerretDB claim tokens are pruned when older than this (by the gateway clock, ``at``): far longer than any claimer
# holds a candidate it read, so no stale claimer can re-insert a pruned token.
TOKEN_KEEP_MS = 10 * 60 * 1000
TOKEN_PRUNE_EVERY = 5_000  # tokens taken between two prunes
# FerretDB candidate window (see module doc): size, and how long (gateway monotonic s / now_ms span) it is reused.
WINDOW = 256
# Behind a backlog a window grows up to WINDOW_MAX documents while they fit WINDOW_BYTES: a sorted read costs
# O(backlog) on FerretDB whatever its limit, so fewer, larger reads save database CPU; the budget bounds the memory.
WINDOW_MAX = 1024
WINDOW_BYTES = 4 * 1024 * 1024
WINDOW_S = 0.25
WINDOW_MS = 250
RELEASE_HOLD_MS = 30_000  # how long a release's token keeps claimers off before they may step over it
PARALLEL_WRITES = 4  # concurrent per-message releases and token look-ups of one call on FerretDB
MAX_HELD = 100_000  # ``_Held`` entries kept at most (a leak guard: entries leave on release, or RETIRED_S after ack)
RETIRED_S = 30.0  # an acked id stays in ``_Held`` this long: far longer than a window read before its delete lives
_GONE = 2**62  # ``_Held`` version of an acked (deleted) message: every copy of it in a window is stale
# A claim token lost again this long after it was first lost is looked up (see ``_Lost``); records are dropped after
# LOST_KEEP_S (a message still stuck then just waits one more LOST_RECHECK_S).
LOST_RECHECK_S = 1.0
LOST_KEEP_S = 120.0
WRAPPED_PREFIX = "wrapped:"  # message ids of wrapped documents: wrapped:["<collection>", "<_id as Extended JSON>"]
_WRAPPED_FIELDS = ("_sg_state", "_sg_lease_until", "_sg_owner", "_sg_deliveries", "_sg_claims")



class _Window:
    """FerretDB: the next ready messages of one destination, in delivery order, as read at ``now_ms``."""

    __slots__ = ("complete", "doc_bytes", "docs", "generation", "max_age", "now_ms", "read_at")

    def __init__(self, docs: list[Doc], now_ms: int, generation: int, complete: bool, read_s: float) -> None:
        self.docs = deque(docs)
        # rough size of one document as held here (body plus a fixed allowance for the other fields)
        self.doc_bytes = 256 + sum(len(d.get("body") or b"") for d in docs) // max(len(docs), 1)
        self.now_ms = now_ms
        self.read_at = time.monotonic()
        # a read that took long is reused longer, so reading stays a small share of the work
        self.max_age = max(WINDOW_S, 4 * read_s)
        self.generation = generation
        self.complete = complete  # the read returned every ready message there was

    def merge(self, new: list[Doc]) -> None:
        """New ready messages (of this destination) join in delivery order; one sorting after the last entry of an
        incomplete window is beyond it and left to the next read."""
        if self.docs and not self.complete:
            last = _order_key(self.docs[-1])
            new = [d for d in new if _order_key(d) < last]
        if new:
            self.docs = deque(sorted([*self.docs, *new], key=_order_key))

    def usable(self, now_ms: int, generation: int) -> bool:
        # the ``now_ms`` span follows ``max_age`` too: with a fixed WINDOW_MS a slow read was re-done every 250 ms
        # whatever ``max_age`` said, and on FerretDB a sorted read costs O(backlog) of database CPU
        return (
            generation == self.generation
            and self.now_ms <= now_ms < self.now_ms + max(WINDOW_MS, int(self.max_age * 1000))
            and time.monotonic() - self.read_at < self.max_age
        )

    def take(self, want: int, now_ms: int, held: _Held) -> list[Doc]:
        """Pop up to ``want`` claim candidates from the head, synchronously (concurrent claimers of this process get
        disjoint ones): not expired, and not a stale copy of a message this process is claiming or holds."""
        candidates: list[Doc] = []
        while self.docs and len(candidates) < want:
            doc = self.docs.popleft()
            if int(doc.get("expires_at", 0)) > now_ms and held.mark(doc):
                candidates.append(doc)
        return candidates


class _Held:
    """FerretDB: ``{_id: version}`` of the messages this process is claiming (the version its token is for) or has
    leased (the version it won), until released, or for RETIRED_S after it acked (deleted) them. A window read that
    overlapped a local claim or ack still shows such a message as ready at an older version; claiming it again can
    only lose the token (an insert wasted, plus a look-up), so that copy is skipped. Only an optimization: the
    tokens alone decide who gets a message."""

    __slots__ = ("retired", "versions")

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}
        self.retired: deque[tuple[float, str, int]] = deque()  # (monotonic time acked, id, version), oldest first

    def mark(self, doc: Doc) -> bool:
        """Record that this process now tries to take ``doc`` from the version it shows; False (and nothing
        recorded) when a local claim already took or is taking that version or a later one."""
        key, version = str(doc["_id"]), int(doc.get("claims", 0))
        taken = self.versions.get(key)
        if taken is not None and version < taken:
            return False
        if len(self.versions) >= MAX_HELD:
            self.versions.clear()
            self.retired.clear()
        self.versions[key] = version + 1
        return True

    def settle(self, candidates: list[Doc], leased: list[Doc]) -> None:
        """After a claim attempt: keep the versions won (``leased`` as stored now), forget the rest."""
        for doc in candidates:
            key = str(doc["_id"])
            if self.versions.get(key) == int(doc.get("claims", 0)) + 1:
                del self.versions[key]
        for doc in leased:
            self.versions[str(doc["_id"])] = int(doc["claims"])

    def forget(self, message_ids: Sequence[str]) -> None:
        """Released: the release takes a new version and invalidates the windows, so no stale copy is used."""
        for message_id in message_ids:
            self.versions.pop(message_id, None)

    def retire(self, message_ids: Sequence[str], leases: Sequence[int] | None = None) -> None:
        """Acked (being deleted): windows read before the delete may still show them; skip those copies for a
        while. A fenced ACK (``leases``, one per id) deletes only the version its lease names, so only copies up to
        that version are skipped: when it was refused as late (claimed again since), the newer version stays
        claimable here."""
        now = time.monotonic()
        retired = self.retired
        while retired and retired[0][0] < now - RETIRED_S:
            _, old, version = retired.popleft()
            if self.versions.get(old) == version:
                del self.versions[old]
        for i, message_id in enumerate(message_ids):
            version = _GONE if leases is None else leases[i] + 1
            if self.versions.get(message_id, -1) >= version:
                continue  # a later version is being claimed or held here, or every copy is skipped already
            self.versions[message_id] = version
            retired.append((now, message_id, version))


async def _gather_limited(calls: list[Any], limit: int = PARALLEL_WRITES) -> list[Any]:
    """Await the coroutine factories in ``calls`` at most ``limit`` at a time; results in order."""
    out: list[Any] = []
    for i in range(0, len(calls), limit):
        out += await asyncio.gather(*(c() for c in calls[i : i + limit]))
    return out


class _Lost:
    """FerretDB: claim tokens this process lost, ``{token key: (version, monotonic time)}``. Nearly always the winner
    is alive and writes its lease within moments (two gateways' windows share their head, so they lose tokens to
    each other all the time), and looking each one up only finds that out. So a lost token is looked up - to find a
    holder that died between token and update, whose token can be stepped over once its lease expired - only when
    the message still shows that version when it comes round again LOST_RECHECK_S or more later; a dead holder's
    token expires a whole lease after its claim anyway."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, float]] = {}  # oldest first

    def due(self, key: str, version: int, now: float) -> bool:
        """Lost ``key`` at ``version`` (again): True when it is time to look the holder up."""
        seen = self.seen.pop(key, None)
        if seen is not None and seen[0] == version and now - seen[1] < LOST_RECHECK_S:
            self.seen[key] = seen
            return False
        self.seen[key] = (version, now)  # first loss (record), or due (the next look-up waits again)
        while len(self.seen) > MAX_HELD or now - next(iter(self.seen.values()))[1] > LOST_KEEP_S:
            del self.seen[next(iter(self.seen))]
        return seen is not None and seen[0] == version

    def won(self, key: str) -> None:
        self.seen.pop(key, None)


class _ClaimTokens:
    """FerretDB: the unique claim tokens of ``<ns>.claims`` (see module doc), with the losses this process saw
    (``_Lost``) and their pruning."""

    def __init__(self, claims: Collection) -> None:
        self._claims = claims
        self._lost = _Lost()
        self._since_prune = 0

    async def take(
        self, items: list[tuple[str, str, int]], until: int, now_ms: int, *, look_up_at_once: bool = False
    ) -> dict[str, int]:
        """For each ``(key, message_id, read_version)`` try to win the transition from
        ``read_version`` by inserting the unique token ``<key>|<read_version + 1>``. A duplicate means another
        claimer won, unless that token's own lease has expired while the document still shows ``read_version``:
        its holder died between token and update, so the next version is tried (a few times at most). Whether it
        expired is looked up when the loss is due (``_Lost``), or at once with ``look_up_at_once``.
        Returns {message_id: version won}."""
        at = int(time.time() * 1000)
        won: dict[str, int] = {}
        pending = [(key, message_id, version + 1) for key, message_id, version in items]
        for _attempt in range(4):
            if not pending:
                break
            tokens = [{"_id": f"{key}|{v}", "m": message_id, "until": until, "at": at} for key, message_id, v in pending]
            lost: set[int] = set()
            try:
                await self._claims.insert_many(tokens, ordered=False)
            except BulkWriteError as exc:
                if not is_duplicate_only(exc):
                    raise
                lost = {int(e["index"]) for e in exc.details.get("writeErrors", [])}
            for i, (key, message_id, v) in enumerate(pending):
                if i not in lost:
                    won[message_id] = v
                    self._lost.won(key)
            if not lost:
                break
            now_s = time.monotonic()
            check = [
                tokens[i]["_id"]
                for i in sorted(lost)
                if look_up_at_once or self._lost.due(pending[i][0], pending[i][2], now_s)
            ]
            # one look-up by ``_id`` per token: an ``$in`` filter decodes the whole claims collection on FerretDB,
            # which keeps TOKEN_KEEP_MS of tokens (tens of thousands under load)
            found = await _gather_limited([partial(self._claims.find_one, {"_id": token_id}) for token_id in check])
            held = {t["_id"]: t for t in found if t is not None}
            pending = [
                (key, message_id, v + 1)
                for i, (key, message_id, v) in enumerate(pending)
                if i in lost and (token := held.get(f"{key}|{v}")) is not None and int(token.get("until", 0)) <= now_ms
            ]
        self._since_prune += len(items)
        if self._since_prune >= TOKEN_PRUNE_EVERY:
            self._since_prune = 0
            await self._claims.delete_many({"at": {"$lt": at - TOKEN_KEEP_MS}})
        return won


def _window_size(previous: _Window | None, want: int) -> int:
    """Documents to read for a destination's next window, given its previous one (see WINDOW_MAX)."""
    size = WINDOW
    if previous is not None and not previous.complete:
        size = min(WINDOW_MAX, max(WINDOW, WINDOW_BYTES // previous.doc_bytes))
    return max(size, 2 * want)


def _order_key(doc: Doc) -> tuple[int, int]:
    return -int(doc["priority"]), int(doc["seq"])


def _ready(now_ms: int) -> Doc:
    return {"$or": [{"state": "ready"}, {"state": "leased", "lease_until": {"$lte": now_ms}}]}


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
        self._db = db
        self._coll = Collection(db[f"{namespace}.queue"])
        self._claims = Collection(db[f"{namespace}.claims"])
        self._ferretdb = ferretdb
        # how a claim without a Python selector is made: "atomic" is one find_one_and_update per message (exactly
        # once on MongoDB only); the bench's reference loop sets it on FerretDB to show why "tokens" is used there
        self.claim_mode: Literal["atomic", "tokens"] = "tokens" if ferretdb else "atomic"
        self._writer = writer
        self._sequences = sequences
        self._wrapped: dict[str, WrappedCollection] = {w.destination: w for w in wrapped}
        self._wrapped_by_collection: dict[str, WrappedCollection] = {w.collection: w for w in wrapped}
        self._signals = Signals()
        self._tokens = _ClaimTokens(self._claims)
        self._windows: dict[str, _Window] = {}
        self._generation: dict[str, int] = {}
        self._window_reads: dict[str, asyncio.Future[None]] = {}
        self._held = _Held()

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
                if retry:  # an earlier attempt got (some of) them in: they are ours
                    return
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
                return await self._claim_wrapped(wrapped, owner, limit, now_ms + lease_ms, now_ms)
            query: Doc = {"destination": destination, "expires_at": {"$gt": now_ms}, **_ready(now_ms)}
            if native_selector:
                query = {"$and": [query, translate_selector(native_selector, ferretdb=self._ferretdb)]}
            lease_until = now_ms + lease_ms
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
            docs = await self._coll.find_list(resume, sort=SORT, limit=page)
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
        update = {
            "$set": {"state": "leased", "lease_until": lease_until, "owner": owner},
            "$inc": {"deliveries": 1, "claims": 1},
        }
        out: list[StoredMessage] = []
        for _ in range(limit):
            doc = await self._coll.find_one_and_update(
                query, update, sort=SORT, return_document=ReturnDocument.AFTER
            )
            if doc is None:
                break
            out.append(stored_from_doc(doc, seq_field="seq"))
        return out

    async def _claim_scan(
        self, query: Doc, owner: str, limit: int, lease_until: int, now_ms: int, selector: HeaderFilter | None
    ) -> list[StoredMessage]:
        """Read candidates in delivery order, then claim them (atomic per message, see module doc). On FerretDB a
        round is: one read, one unordered ``insert_many`` of claim tokens (the duplicates are the ones lost), one
        ``update_many`` of the won documents and one re-read: 4 round trips whatever ``limit`` is."""
        out: list[Doc] = []
        skip = 0
        for _round in range(MAX_CLAIM_ROUNDS):
            want = limit - len(out)
            batch = max(2 * want, 16)
            docs = await self._coll.find_list(query, sort=SORT, skip=skip, limit=batch)
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
            {"$set": {"state": "leased", "lease_until": lease_until, "owner": owner},
             "$inc": {"deliveries": 1, "claims": 1}},
            return_document=ReturnDocument.AFTER,
        )

    async def _claim_window(
        self, destination: str, query: Doc, owner: str, limit: int, lease_until: int, now_ms: int
    ) -> list[StoredMessage]:
        """FerretDB without a selector: claim from the head of this destination's window (see module doc)."""
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

    async def _window(self, destination: str, query: Doc, want: int, now_ms: int) -> _Window:
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
            size = _window_size(self._windows.get(destination), want)
            started = time.monotonic()
            docs = await self._coll.find_list(query, sort=SORT, limit=size)
            window = _Window(docs, now_ms, generation, len(docs) < size, time.monotonic() - started)
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
        changes = {
            str(d["_id"]): {"state": "leased", "lease_until": lease_until, "owner": owner,
                            "claims": won[str(d["_id"])], "deliveries": int(d.get("deliveries", 0)) + 1}
            for d in leased
        }
        # one command, one statement per message by ``_id`` and the version read (no ``$in``: see module doc); no
        # match means the message was acked (deleted) after our read - the token keeps others off it anyway
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
            wrapped_pairs = pairs if pairs is not None else [(i, None) for i in dict.fromkeys(message_ids)]
            for message_id, wrapped_lease in wrapped_pairs:
                if message_id.startswith(WRAPPED_PREFIX):
                    target = self._wrapped_target(message_id)
                    if target is not None:
                        coll, doc_id = target
                        fence = {} if wrapped_lease is None else {"_sg_claims": wrapped_lease}
                        await coll.delete_one({"_id": doc_id, **fence})

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
            for message_id, wrapped_lease in pairs if pairs is not None else [(i, None) for i in message_ids]:
                if message_id.startswith(WRAPPED_PREFIX):
                    await self._release_wrapped(message_id, how, wrapped_lease)
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
            changes: Doc = {"state": "ready", "lease_until": 0, "owner": None, "claims": version}
            if how is Release.DEAD_LETTER:
                changes["original_destination"] = doc.get("original_destination") or doc["destination"]
                changes["destination"] = f"{doc['destination']}.DLQ"
                changes["deliveries"] = 0
            # by the version read too: had someone stepped over our token meanwhile, their lease is not undone
            await self._coll.update_one({"_id": doc["_id"], "claims": read_version}, {"$set": changes})

        work = pairs if pairs is not None else [(i, None) for i in dict.fromkeys(ids)]
        await _gather_limited([lambda i=i, lease=lease: one(i, lease) for i, lease in work])

    async def renew(self, owner: str, *, lease_ms: int, now_ms: int) -> None:
        lease_until = now_ms + lease_ms
        with unavailable_on_disconnect("renew"):
            await self._coll.update_many(
                {"owner": owner, "state": "leased"}, {"$set": {"lease_until": lease_until}}
            )
            for wrapped in self._wrapped.values():
                await self._wrapped_coll(wrapped.collection).update_many(
                    {"_sg_owner": owner, "_sg_state": "leased"}, {"$set": {"_sg_lease_until": lease_until}}
                )

    def wake_token(self, destination: str) -> asyncio.Event:
        return self._signals.event(destination)

    async def wait(self, destination: str, timeout: float, token: asyncio.Event | None = None) -> None:
        await self._signals.wait(destination, timeout, token)

    # -- inspection -----------------------------------------------------------------------------------------------
    async def stats(self, destination: str, *, now_ms: int) -> QueueStats:
        with unavailable_on_disconnect("stats"):
            wrapped = self._wrapped.get(destination)
            if wrapped is not None:
                coll = self._wrapped_coll(wrapped.collection)
                base = dict(wrapped.filter)
                ready = await coll.count_documents({"$and": [base, _wrapped_ready(now_ms)]})
                unacked = await coll.count_documents(
                    {"$and": [base, {"_sg_state": "leased", "_sg_lease_until": {"$gt": now_ms}}]}
                )
                return QueueStats(ready=ready, unacked=unacked)
            ready = await self._coll.count_documents(
                {"destination": destination, "expires_at": {"$gt": now_ms}, **_ready(now_ms)}
            )
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
            if wrapped is not None:
                paging: dict[str, int] = {"skip": offset, "limit": limit} if selector is None else scanned
                docs = await self._wrapped_coll(wrapped.collection).find_list(
                    {"$and": [dict(wrapped.filter), _wrapped_ready(now_ms)]}, sort=[("_id", 1)], **paging
                )
                messages = [self._wrapped_message(wrapped, d) for d in docs]
            else:
                query = {"destination": destination, "expires_at": {"$gt": now_ms}, **_ready(now_ms)}
                paging = {"skip": offset, "limit": limit} if selector is None else scanned
                docs = await self._coll.find_list(query, sort=SORT, **paging)
                messages = [stored_from_doc(d, seq_field="seq") for d in docs]
        if selector is None:
            return messages
        return [m for m in messages if selector(m.headers)][offset : offset + limit]

    async def destinations(self) -> list[str]:
        with unavailable_on_disconnect("destinations"):
            found = {str(d) for d in await self._coll.distinct("destination")}
            for wrapped in self._wrapped.values():
                if await self._wrapped_coll(wrapped.collection).find_one(dict(wrapped.filter), projection={"_id": 1}):
                    found.add(wrapped.destination)
        return sorted(found)

    async def purge(self, destination: str) -> int:
        if destination in self._wrapped:
            raise DatasourceError(
                f"purge: {destination} wraps the existing collection {self._wrapped[destination].collection!r}; "
                "refusing to delete its documents in bulk"
            )
        with unavailable_on_disconnect("purge"):
            result = await self._coll.delete_many({"destination": destination})
        self._invalidate(destination)
        return result.deleted_count

    def close(self) -> None:
        self._signals.notify_all()

    # -- wrapped collections --------------------------------------------------------------------------------------
    def _wrapped_coll(self, name: str) -> Collection:
        return Collection(self._db[name])

    def _wrapped_target(self, message_id: str) -> tuple[Collection, object] | None:
        parsed = _parse_wrapped_id(message_id)
        if parsed is None or parsed[0] not in self._wrapped_by_collection:
            return None
        return self._wrapped_coll(parsed[0]), parsed[1]

    def _wrapped_message(self, wrapped: WrappedCollection, doc: Mapping[str, Any]) -> StoredMessage:
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

    async def _claim_wrapped(
        self, wrapped: WrappedCollection, owner: str, limit: int, lease_until: int, now_ms: int
    ) -> list[StoredMessage]:
        coll = self._wrapped_coll(wrapped.collection)
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
                out.append(self._wrapped_message(wrapped, doc))
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
            out.append(self._wrapped_message(wrapped, doc))
            if len(out) >= limit:
                break
        return out

    async def _release_wrapped(self, message_id: str, how: Release, lease: int | None = None) -> None:
        target = self._wrapped_target(message_id)
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
        wrapped = self._wrapped_by_collection[coll.name]
        message = self._wrapped_message(wrapped, doc)
        seq = await self._sequences.allocate("queue", 1)
        dead = message_doc(
            NewMessage(
                message_id=message_id,
                destination=f"{wrapped.destination}.DLQ",
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
        try:  # copy first, then delete: a crash in between leaves a duplicate, never a loss
            await self._coll.insert_one(dead)
        except DuplicateKeyError:
            pass
        # fenced like the read: had another consumer claimed it meanwhile, theirs is not deleted (a duplicate in the
        # DLQ then, never a loss)
        await coll.delete_one({"_id": doc_id, **fence})

