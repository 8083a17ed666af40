"""FerretDB claims for ``MongoPollQueue``: claim tokens (``ClaimTokens``), the shared candidate read (``Window``), and
what this process remembers of its own claims (``HeldVersions``) and of the tokens it lost (``LostTokens``).

FerretDB v1: findAndModify reads the document, then writes it back by ``_id`` with no compare-and-swap, so two
concurrent claimers can both "win" the same message (measured here: duplicates within seconds). What its storage does
make atomic is an insert into a unique ``_id`` index. So a claimer reads candidates, then inserts a claim token
``{_id: "q|<message _id>|<claims + 1>"}`` into ``<ns>.claims``: exactly one claimer can insert the token for a given
version, a ``DuplicateKeyError`` means another one won. The winner then writes the lease (and the version won into
``claims``) with ``update_one({_id, claims: <version read>})``; no match means the message was acked (deleted)
meanwhile, and it is dropped. Releases take the same kind of token, so a release racing a re-claim of an expired lease
has one winner too. A token whose claim lease expired while the document still shows the old version belongs to a
claimer that died between token and update; the next version is tried. Tokens carry the gateway time and are pruned
after ``TOKEN_KEEP_MS``.

Cost model (FerretDB 1.24, PostgreSQL or SQLite backend, measured): only top-level equality is pushed down to SQL, and
every document that reaches FerretDB is decoded (~0.1 ms each), so a sorted read or any ``$in``/range filter costs
O(documents of the collection or destination) - ~0.5 s at 5,000 -, while a write or read by ``_id`` equality costs
~1-4 ms. (That too grows with the collection: on PostgreSQL FerretDB pushes equality down as
``_jsonb->'_id' @> <value>``, which its B-tree index on ``_jsonb->'_id'`` cannot serve, so each such statement is a
sequential scan of the table - cheap per row, but a large backlog makes every claim and ack slower.) So the FerretDB
path never filters by ``$in``: claims, acks, releases and token look-ups work per ``_id``, and the sorted candidate
read is shared: each ``MongoPollQueue`` keeps a *window* per destination - the next ready messages in delivery order,
read with one query - and hands its head to successive claims (an in-process lock-free pop, so local claimers never
contend). A window holds ``WINDOW`` documents, or behind a backlog (the previous read did not return every ready
message) up to ``WINDOW_MAX`` as long as they fit ``WINDOW_BYTES``: the read costs O(backlog) whatever its limit. A
local ``put`` merges its messages into the window (so this gateway's own messages are claimed in exact priority/FIFO
order); the window is read again when it runs out, after a local ``release``/``purge``, and once it is ``max_age`` old
by the gateway clock or by ``now_ms`` (``max(WINDOW_S, 4 x the read's duration)``: leases that expired since and
another gateway's puts wait at most that long - ordering between gateways is by arrival anyway - and reading stays a
small share of the database's work). A window entry another gateway took meanwhile just loses its token and is skipped
(its holder is looked up only if it comes round again, ``LostTokens``). A copy of a message this process is claiming,
holds or acked, read before that write landed, is skipped without a token (``HeldVersions``). Per claim call: 1
``insert_many`` of tokens + 1 unordered ``bulk_write`` of one ``update_one`` per message, plus one sorted read per
window; an ack is 1 ``bulk_write`` of ``delete_one``s. Selectors (Python or native) read fresh candidates each call.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Any

from pymongo.errors import BulkWriteError

from app.datasources import rules
from app.datasources.mongodb._common import Collection, Doc, is_duplicate_only

__all__ = [
    "LOST_KEEP_S",
    "LOST_RECHECK_S",
    "MAX_HELD",
    "PARALLEL_WRITES",
    "RELEASE_HOLD_MS",
    "RETIRED_S",
    "TOKEN_KEEP_MS",
    "TOKEN_PRUNE_EVERY",
    "WINDOW",
    "WINDOW_BYTES",
    "WINDOW_MAX",
    "WINDOW_MS",
    "WINDOW_S",
    "ClaimTokens",
    "HeldVersions",
    "LostTokens",
    "Window",
    "gather_limited",
    "window_size",
]

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
# ``HeldVersions`` entries kept at most (a leak guard: entries leave on release, or RETIRED_S after ack)
MAX_HELD = 100_000
# an acked id stays in ``HeldVersions`` this long: far longer than a window read before its delete lives
RETIRED_S = 30.0
_GONE = 2**62  # ``HeldVersions`` version of an acked (deleted) message: every copy of it in a window is stale
# A claim token lost again this long after it was first lost is looked up (see ``LostTokens``); records are dropped
# after LOST_KEEP_S (a message still stuck then just waits one more LOST_RECHECK_S).
LOST_RECHECK_S = 1.0
LOST_KEEP_S = 120.0


class Window:
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

    def take(self, want: int, now_ms: int, held: HeldVersions) -> list[Doc]:
        """Pop up to ``want`` claim candidates from the head, synchronously (concurrent claimers of this process get
        disjoint ones): not expired, and not a stale copy of a message this process is claiming or holds."""
        candidates: list[Doc] = []
        while self.docs and len(candidates) < want:
            doc = self.docs.popleft()
            if int(doc.get("expires_at", 0)) > now_ms and held.mark(doc):
                candidates.append(doc)
        return candidates


class HeldVersions:
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



async def gather_limited(calls: list[Any], limit: int = PARALLEL_WRITES) -> list[Any]:
    """Await the coroutine factories in ``calls`` at most ``limit`` at a time; results in order."""
    out: list[Any] = []
    for i in range(0, len(calls), limit):
        out += await asyncio.gather(*(c() for c in calls[i : i + limit]))
    return out


class LostTokens:
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


class ClaimTokens:
    """FerretDB: the unique claim tokens of ``<ns>.claims`` (see module doc), with the losses this process saw
    (``LostTokens``) and their pruning."""

    def __init__(self, claims: Collection) -> None:
        self._claims = claims
        self._lost = LostTokens()
        self._since_prune = 0

    async def take(
        self, items: list[tuple[str, str, int]], until: int, now_ms: int, *, look_up_at_once: bool = False
    ) -> dict[str, int]:
        """For each ``(key, message_id, read_version)`` try to win the transition from
        ``read_version`` by inserting the unique token ``<key>|<read_version + 1>``. A duplicate means another
        claimer won, unless that token's own lease has expired while the document still shows ``read_version``:
        its holder died between token and update, so the next version is tried (a few times at most). Whether it
        expired is looked up when the loss is due (``LostTokens``), or at once with ``look_up_at_once``.
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
            found = await gather_limited([partial(self._claims.find_one, {"_id": token_id}) for token_id in check])
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


def window_size(previous: Window | None, want: int) -> int:
    """Documents to read for a destination's next window, given its previous one (see WINDOW_MAX)."""
    size = WINDOW
    if previous is not None and not previous.complete:
        size = min(WINDOW_MAX, max(WINDOW, WINDOW_BYTES // previous.doc_bytes))
    return max(size, 2 * want)


def _order_key(doc: Doc) -> tuple[int, int]:
    return rules.delivery_order(int(doc["priority"]), int(doc["seq"]))

