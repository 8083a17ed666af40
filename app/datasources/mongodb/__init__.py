"""MongoDB datasource: ``mongodb://[user:pass@]host[:port][,host...]/[database][?options]`` or ``mongodb+srv://...``.

Built on PyMongo's async API (``AsyncMongoClient``). The database is the URL's, else ``stompgate``; every collection
name starts with ``DatasourceOptions.namespace``: ``<ns>.queue`` (all queues), ``<ns>.topics`` (capped topic log),
``<ns>.cursors`` (durable subscriptions), ``<ns>.counters`` (sequence numbers), ``<ns>.claims`` (FerretDB claim
tokens). Connection-string options pass through and win over the ones derived from ``DatasourceOptions``.

Supports: every PollQueue / TailQueue operation; leases; dead-lettering to ``<destination>.DLQ``; selectors both as
Python predicates and as MongoDB query documents evaluated in the database (``native_selectors = True``); existing
collections wrapped as queues (``DatasourceOptions.wrapped``); a failover buffer for writes.

Options used: ``server_selection_timeout_ms``, ``write_concern`` (``w``; retryable writes on), ``failover_buffer``,
``topic_retention`` / ``topic_retention_bytes`` (capped ``max`` / ``size``), ``poll_interval``, ``wrapped``,
``namespace``. ``sqlite_synchronous`` is ignored.

Atomicity:

* MongoDB: a claim is one ``find_one_and_update`` per message, atomic on the server; dead-lettering is one pipeline
  update per message; sequence ranges come from one ``$inc``. A ``put`` of several messages is one ordered
  ``insert_many``: without a transaction it is not all-or-nothing against a crash of the server mid-batch, but a
  duplicate id undoes the part already stored and a retried batch is idempotent (ids are ``_id``).
* FerretDB v1 (detected once with ``buildInfo``, which carries ``ferretdbVersion``): ``findAndModify`` and updates
  are read-then-write without compare-and-swap, so claims, releases and sequence ranges race on unique-``_id``
  inserts instead (claim tokens, range reservations), which its storage makes atomic. See ``queues`` and
  ``_sequence``. There are no transactions, change streams or TTL indexes, so none are used anywhere.

Failover: while no server is reachable, ``put``/``publish`` wait in a bounded in-memory buffer (``failover_buffer``
messages) and are written in order when it returns; a full buffer raises ``DatasourceUnavailable`` at once. Reads
and claims raise ``DatasourceUnavailable``; topic followers re-open with backoff.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from pymongo import AsyncMongoClient
from pymongo.errors import ConfigurationError, ConnectionFailure, PyMongoError

from app.datasources.interface import Datasource, DatasourceError, DatasourceOptions, DatasourceUnavailable
from app.datasources.mongodb._common import Collection, Doc, ServerInfo, detect_server, limit_writes
from app.datasources.failover import FailoverWriter
from app.datasources.mongodb._sequence import SequenceAllocator
from app.datasources.mongodb.queues import MongoPollQueue
from app.datasources.mongodb.topics import MongoTailQueue

__all__ = ["MongoDatasource", "MongoPollQueue", "MongoTailQueue", "open_datasource", "DEFAULT_DATABASE"]

DEFAULT_DATABASE = "stompgate"
PING_TIMEOUT_MS = 2_000


class MongoDatasource(Datasource):
    native_selectors = True
    shared = True  # several gateways share one database

    def __init__(
        self,
        url: str,
        client: AsyncMongoClient[Doc],
        server: ServerInfo,
        queues: MongoPollQueue,
        topics: MongoTailQueue,
        writer: FailoverWriter,
    ) -> None:
        self.url = url
        self.client = client
        self.server = server
        self.queues: MongoPollQueue = queues
        self.topics: MongoTailQueue = topics
        self._writer = writer

    @property
    def is_ferretdb(self) -> bool:
        return self.server.is_ferretdb

    async def ping(self) -> None:
        try:
            await self.client.admin.command("ping", maxTimeMS=PING_TIMEOUT_MS)
        except ConnectionFailure as exc:
            raise DatasourceUnavailable(f"MongoDB unreachable: {exc}") from exc

    async def close(self) -> None:
        self.queues.close()
        self.topics.close()
        await self._writer.close()
        await self.client.close()


def _client_options(url: str, options: DatasourceOptions) -> dict[str, object]:
    given = {key.lower() for key, _ in parse_qsl(urlsplit(url).query)}
    out: dict[str, object] = {}
    if "serverselectiontimeoutms" not in given:
        out["serverSelectionTimeoutMS"] = options.server_selection_timeout_ms
    if "w" not in given:
        w = options.write_concern
        out["w"] = int(w) if w.isdigit() else w
    if "retrywrites" not in given:
        out["retryWrites"] = True
    if "appname" not in given:
        out["appname"] = "stompgate"
    return out


async def open_datasource(url: str, options: DatasourceOptions) -> Datasource:
    try:
        client: AsyncMongoClient[Doc] = AsyncMongoClient(url, **_client_options(url, options))  # type: ignore[arg-type]
    except (ConfigurationError, ValueError, TypeError) as exc:
        raise DatasourceError(f"bad MongoDB URL or option: {exc}") from exc
    try:
        db = client.get_default_database(DEFAULT_DATABASE)
        server = await detect_server(db)
        if server.is_ferretdb:
            limit_writes(client)
        writer = FailoverWriter(options.failover_buffer, unavailable=(ConnectionFailure,), database="MongoDB")
        sequences = SequenceAllocator(Collection(db[f"{options.namespace}.counters"]), ferretdb=server.is_ferretdb)
        queues = MongoPollQueue(
            db,
            options.namespace,
            ferretdb=server.is_ferretdb,
            writer=writer,
            sequences=sequences,
            wrapped=options.wrapped,
        )
        topics = MongoTailQueue(
            db, options.namespace, ferretdb=server.is_ferretdb, writer=writer, sequences=sequences, options=options
        )
        await queues.setup()
        await topics.setup()
    except ConnectionFailure as exc:
        await client.close()
        # the driver's text ends with its whole topology description: the cause comes before it
        cause = str(exc).split(", Timeout: ")[0]
        raise DatasourceUnavailable(f"MongoDB unreachable at start-up: {cause}") from exc
    except PyMongoError as exc:
        await client.close()
        raise DatasourceError(f"MongoDB set-up failed: {exc}") from exc
    return MongoDatasource(url, client, server, queues, topics, writer)
