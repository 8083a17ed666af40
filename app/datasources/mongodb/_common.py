"""Shared pieces of the MongoDB backend: document types, server detection, header encoding, selector translation."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from functools import partial
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import AutoReconnect, BulkWriteError, ConnectionFailure, OperationFailure
from pymongo.results import DeleteResult, InsertOneResult, UpdateResult

from app.datasources.interface import DatasourceError, DatasourceUnavailable, NewMessage, StoredMessage

Doc = dict[str, Any]
Coll = AsyncCollection[Doc]
Db = AsyncDatabase[Doc]

# ``expires_at`` is stored as this when a message never expires, so "not expired" is one range condition
# (``expires_at > now``) instead of an ``$or`` with ``null``.
NO_EXPIRY = 2**62

DUPLICATE_KEY = 11000


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What ``buildInfo`` says. FerretDB adds a ``ferretdbVersion`` field (v1.24.2 reports ``"v1.24.2"``, next to a
    MongoDB-compatible ``version`` such as ``"7.0.42"``)."""

    version: str
    ferretdb_version: str | None

    @property
    def is_ferretdb(self) -> bool:
        return self.ferretdb_version is not None


async def detect_server(db: Db) -> ServerInfo:
    info = await db.client.admin.command("buildInfo")
    ferret = info.get("ferretdbVersion")
    return ServerInfo(version=str(info.get("version", "")), ferretdb_version=str(ferret) if ferret else None)


@contextlib.contextmanager
def unavailable_on_disconnect(what: str) -> Iterator[None]:
    """Turn "no server reachable" into the interface's ``DatasourceUnavailable``."""
    try:
        yield
    except ConnectionFailure as exc:
        raise DatasourceUnavailable(f"MongoDB unreachable during {what}: {exc}") from exc


def escape_key(name: str) -> str:
    """A header name as a MongoDB field name: ``%``, ``.`` and ``$`` percent-encoded (FerretDB rejects ``.`` and a
    leading ``$``; MongoDB's dot notation would misread ``.``)."""
    return name.replace("%", "%25").replace(".", "%2E").replace("$", "%24")


def headers_to_list(headers: Mapping[str, str]) -> list[Doc]:
    return [{"k": k, "v": v} for k, v in headers.items()]


def headers_from_list(items: object) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                out.setdefault(str(item.get("k")), str(item.get("v")))
    return out


def message_doc(message: NewMessage, *, seq_field: str, seq: int, flat_headers: bool) -> Doc:
    """The stored form of a message. ``flat_headers`` adds ``hdrs`` ({escaped name: value}) for FerretDB, whose
    ``$elemMatch`` accepts only operator conditions, so header selectors use dot paths into ``hdrs`` there."""
    doc: Doc = {
        "_id": message.message_id,
        "message_id": message.message_id,
        "destination": message.destination,
        seq_field: seq,
        "priority": message.priority,
        "expires_at": NO_EXPIRY if message.expires_at is None else message.expires_at,
        "published_at": message.published_at,
        "headers": headers_to_list(message.headers),
        "body": message.body,
    }
    if flat_headers:
        doc["hdrs"] = {escape_key(k): v for k, v in message.headers.items()}
    return doc


def stored_from_doc(doc: Mapping[str, Any], *, seq_field: str) -> StoredMessage:
    expires_at = doc.get("expires_at")
    body = doc.get("body", b"")
    return StoredMessage(
        message_id=str(doc.get("message_id", doc.get("_id"))),
        destination=str(doc["destination"]),
        headers=headers_from_list(doc.get("headers")),
        body=bytes(body) if body is not None else b"",
        priority=int(doc.get("priority", 4)),
        expires_at=None if expires_at is None or expires_at >= NO_EXPIRY else int(expires_at),
        published_at=int(doc.get("published_at", 0)),
        seq=int(doc.get(seq_field, 0)),
        deliveries=int(doc.get("deliveries", 0)),
        original_destination=doc.get("original_destination"),
        lease=int(doc.get("claims", 0)),  # every claim changes ``claims``: the token that fences ack and release
    )


_LOGICAL = ("$and", "$or", "$nor")


def translate_selector(query: Mapping[str, object], *, ferretdb: bool) -> Doc:
    """Translate a MongoDB-style query over header names into a query over stored messages.

    On MongoDB each ``{name: cond}`` becomes ``{"headers": {"$elemMatch": {"k": name, "v": cond}}}``. FerretDB v1
    rejects field conditions inside ``$elemMatch`` ("unknown operator: k"), so there it becomes ``{"hdrs.<name>":
    cond}`` over the flat copy written on FerretDB. ``$and``/``$or``/``$nor`` recurse; other top-level operators are
    refused."""
    clauses: list[Doc] = []
    for key, cond in query.items():
        if key in _LOGICAL:
            if not isinstance(cond, list | tuple) or not cond:
                raise DatasourceError(f"selector: {key} needs a non-empty list of query documents")
            parts: list[Doc] = []
            for part in cond:
                if not isinstance(part, Mapping):
                    raise DatasourceError(f"selector: {key} needs a list of query documents")
                parts.append(translate_selector(part, ferretdb=ferretdb))
            clauses.append({key: parts})
        elif key.startswith("$"):
            raise DatasourceError(f"selector: unsupported top-level operator {key}")
        elif ferretdb:
            clauses.append({f"hdrs.{escape_key(key)}": cond})
        else:
            clauses.append({"headers": {"$elemMatch": {"k": key, "v": cond}}})
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def is_duplicate_only(exc: OperationFailure) -> bool:
    """True when a (bulk) write failed only because some documents already existed."""
    details = exc.details or {}
    errors = details.get("writeErrors")
    if errors is None:
        return exc.code == DUPLICATE_KEY
    if details.get("writeConcernErrors"):
        return False
    return all(e.get("code") == DUPLICATE_KEY for e in errors)


# -- FerretDB/SQLite "database is locked" ----------------------------------------------------------------------------
# FerretDB's SQLite backend answers a write that meets a concurrent transaction with InternalError (code 1)
# "database is locked (517)" (SQLITE_BUSY_SNAPSHOT) instead of waiting: seen with a tailable cursor re-running its
# query while a publish inserts. The statement did not take effect, so it is retried after a short pause.
BUSY_RETRIES = 100
BUSY_PAUSE_S = 0.005

T = TypeVar("T")


async def whose_duplicates(coll: Collection, exc: BulkWriteError, number: str) -> Literal["ours", "absent", "other"]:
    """Whom the documents an insert was refused for as duplicates belong to. Each document carries a ``number``
    (``seq``, ``position``) that its insert call alone was given, so:

    * "ours": every one is stored with the number this call gave it: an earlier attempt of this very call wrote it
      (the server stored an insert whose reply was lost, and it was sent again); not a duplicate message;
    * "absent": none of them is stored at all: the report is not about our documents (FerretDB 1.24 answers a
      duplicate key error for an insert racing its own catalogue set-up right after a restart); try again;
    * "other": a different message with that id is stored: a real duplicate."""
    ops = [e.get("op") or {} for e in exc.details.get("writeErrors", [])]
    wanted = {op.get("_id"): op.get(number) for op in ops}
    if not wanted or None in wanted.values():
        return "other"
    stored = await coll.find_list({"_id": {"$in": list(wanted)}}, projection={number: 1})
    if any(doc.get(number) != wanted.get(doc["_id"]) for doc in stored):
        return "other"
    return "ours" if len(stored) == len(wanted) else "absent"  # some or all not there: try again


MAX_SPURIOUS_DUPLICATES = 10  # tries of one write refused that way before it fails (with backoff: about 8 s)


class SpuriousDuplicate(AutoReconnect):
    """A duplicate key error about documents that are not there (see ``whose_duplicates``): a transient state of
    the server, so a ``ConnectionFailure``: the failover buffer holds the write and retries it."""


async def judge_duplicates(
    coll: Collection, exc: BulkWriteError, number: str, spurious: list[BulkWriteError]
) -> Literal["ours", "other"]:
    """``whose_duplicates`` for a put or publish call: "absent" is raised as a ``SpuriousDuplicate`` (the failover
    buffer retries the write), and after MAX_SPURIOUS_DUPLICATES of them (``spurious``, the call's list) as a
    ``DatasourceError``, so a server that keeps answering that way fails the call instead of the buffer for ever."""
    whose = await whose_duplicates(coll, exc, number)
    if whose != "absent":
        return whose
    spurious.append(exc)
    if len(spurious) < MAX_SPURIOUS_DUPLICATES:
        raise SpuriousDuplicate("a duplicate key error about messages that are not stored") from exc
    raise DatasourceError("the server keeps refusing messages as duplicates that it has not stored") from exc


def is_busy(exc: OperationFailure) -> bool:
    return exc.code == 1 and "database is locked" in str(exc)


async def busy_retry(call: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(BUSY_RETRIES):
        try:
            return await call()
        except OperationFailure as exc:
            if not is_busy(exc) or attempt == BUSY_RETRIES - 1:
                raise
        await asyncio.sleep(BUSY_PAUSE_S * min(attempt + 1, 10))
    raise AssertionError("unreachable")


# -- FerretDB write gate -----------------------------------------------------------------------------------------------
# FerretDB 1.24's PostgreSQL backend runs each update/delete statement as a SELECT whose iterator keeps a pooled
# connection until the whole command ends, while each write takes another one; its pool defaults to 50 connections,
# so ~50 concurrent update/delete statements (in one multi-statement command or in many commands) deadlock the
# server for good (seen here: all 50 connections idle after a SELECT, nothing answering). A FerretDB client therefore
# sends at most FERRETDB_WRITE_CONCURRENCY such commands at once, and a bulk write at most FERRETDB_BULK statements
# per command: <= 4 x 8 = 32 held connections per gateway process. Several gateways on one FerretDB must stay under
# its ``pool_max_conns`` together, or raise it in ``--postgresql-url`` (``?pool_max_conns=150``).
FERRETDB_WRITE_CONCURRENCY = 4
FERRETDB_BULK = 8
_write_gates: weakref.WeakKeyDictionary[object, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def limit_writes(client: object, concurrency: int = FERRETDB_WRITE_CONCURRENCY) -> None:
    """Gate the update/delete commands of ``client`` (FerretDB only)."""
    _write_gates[client] = asyncio.Semaphore(concurrency)


class Collection:
    """The calls this backend makes on a collection, each retried while SQLite says "database is locked"; updates
    and deletes pass the client's write gate when it has one (FerretDB)."""

    def __init__(self, raw: Coll) -> None:
        self.raw = raw
        self._gate = _write_gates.get(raw.database.client)

    async def _write(self, call: Callable[[], Awaitable[T]]) -> T:
        if self._gate is None:
            return await busy_retry(call)
        async with self._gate:
            return await busy_retry(call)

    @property
    def name(self) -> str:
        return self.raw.name

    async def insert_one(self, doc: Doc) -> InsertOneResult:
        return await busy_retry(lambda: self.raw.insert_one(doc))

    async def insert_many(self, docs: list[Doc], *, ordered: bool = True) -> None:
        """On a busy retry the first attempt may have stored part of the batch (ids are ours), so the retry is
        unordered and "already there" counts as success."""
        try:
            await self.raw.insert_many(docs, ordered=ordered)
            return
        except OperationFailure as exc:
            if not is_busy(exc) and not (isinstance(exc, BulkWriteError) and _bulk_busy(exc)):
                raise
        try:
            await busy_retry(lambda: self.raw.insert_many(docs, ordered=False))
        except BulkWriteError as exc:
            if not is_duplicate_only(exc):
                raise

    async def update_one(self, filter: Doc, update: Doc | list[Doc], **kw: Any) -> UpdateResult:
        return await self._write(lambda: self.raw.update_one(filter, update, **kw))

    async def update_many(self, filter: Doc, update: Doc | list[Doc], **kw: Any) -> UpdateResult:
        return await self._write(lambda: self.raw.update_many(filter, update, **kw))

    async def bulk_write(self, requests: list[Any]) -> int:
        """Unordered: every statement is attempted; returns how many matched (updates) or were deleted. Used with
        idempotent statements only (by ``_id`` plus a version), so a busy retry repeating applied ones changes nothing.
        On FerretDB sent in commands of at most ``FERRETDB_BULK`` statements (see the write gate above)."""
        size = FERRETDB_BULK if self._gate is not None else 1000
        count = 0
        for i in range(0, len(requests), size):
            result = await self._write(partial(self.raw.bulk_write, requests[i : i + size], ordered=False))
            count += result.matched_count + result.deleted_count
        return count

    async def delete_one(self, filter: Doc) -> DeleteResult:
        return await self._write(lambda: self.raw.delete_one(filter))

    async def delete_many(self, filter: Doc) -> DeleteResult:
        return await self._write(lambda: self.raw.delete_many(filter))

    async def find_one(self, filter: Doc, **kw: Any) -> Doc | None:
        return await busy_retry(lambda: self.raw.find_one(filter, **kw))

    async def find_list(self, filter: Doc, **kw: Any) -> list[Doc]:
        return await busy_retry(lambda: self.raw.find(filter, **kw).to_list())

    async def find_one_and_update(self, filter: Doc, update: Doc, **kw: Any) -> Doc | None:
        return await self._write(lambda: self.raw.find_one_and_update(filter, update, **kw))

    async def count_documents(self, filter: Doc) -> int:
        return await busy_retry(lambda: self.raw.count_documents(filter))

    async def distinct(self, key: str) -> list[Any]:
        return await busy_retry(lambda: self.raw.distinct(key))

    async def create_index(self, keys: list[tuple[str, int]], **kw: Any) -> str:
        return await busy_retry(lambda: self.raw.create_index(keys, **kw))


def _bulk_busy(exc: BulkWriteError) -> bool:
    errors = (exc.details or {}).get("writeErrors") or []
    return any(e.get("code") == 1 and "database is locked" in str(e.get("errmsg", "")) for e in errors)
