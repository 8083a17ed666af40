"""Embedded datasource on SQLite (the default): ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``
(SQLAlchemy's form: three slashes then the path; the default is ``sqlite:///./data/stompgate.db``). The parent
directory is created when missing. One gateway process per database file.

Supports: every PollQueue and TailQueue operation; leases with expiry; dead-lettering to ``<destination>.DLQ``;
selectors evaluated in Python while scanning the backlog in delivery order (a subscription's scan resumes where
its last one stopped and examines at most ``SCAN_BUDGET`` rows per claim, see ``ScanMark``); a topic log with ``Gap`` reporting;
durable cursors. No native (MongoDB-style) selectors.

How it writes: WAL mode and ONE writer thread that owns the write connection. Every write (put, claim, ack, release,
renew, publish, cursor save) is queued; the writer takes everything pending, runs it in one transaction, commits
once (group commit) and only then resolves each caller. So ``put`` returns after the COMMIT that contains it, and
with ``PRAGMA synchronous`` FULL (``DatasourceOptions.sqlite_synchronous``) that commit is on disk; NORMAL survives
a killed process but not a power cut. Inspection (stats, peek, destinations, cursors, topic catch-up) uses a second,
read-only connection on its own thread and sees committed data only.

Atomicity: each call is all or nothing (a failing call is retried alone in its own transaction, so it cannot spoil
the batch it was grouped with); ``release`` with DEAD_LETTER is one UPDATE per message. A claim runs inside the
single writer, so no two claims ever return the same message.

Leases: a claim first requeues leases that expired before ``now_ms`` on its destination (the writer remembers the
earliest lease it granted, so this costs nothing on the hot path). On open, every lease of a previous process is
released (delivery counts kept): that process is gone.

Topics: ``topic_log`` holds at least ``topic_retention`` messages; the writer trims it every
``max(1, min(1000, topic_retention // 10))`` publishes, or when ``SqliteTailQueue.trim()`` is awaited.
Followers read backlogs from the database in batches, then follow an in-memory tail of recently committed messages.
Options used: ``topic_retention``, ``sqlite_synchronous``, ``namespace`` (table name prefix). Others are ignored.

Large queue bodies (``FILE_BODY_MIN``, 128 KiB, and more) are files in ``<database>-bodies/``, written and synced
before the commit that names them (``body_files`` says why and how); topic messages keep their bodies in the log.

Modules: ``store`` (connections, schema, group commit), ``rows`` (the message row), ``body_files``, ``queues``,
``topics``; this one joins them into a ``Datasource`` and makes a COMMIT one writer step.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from app.datasources.interface import Changes, Datasource, DatasourceError, DatasourceOptions, Release
from app.datasources.sqlite.queues import SqlitePollQueue
from app.datasources.sqlite.store import MIN_SQLITE, Store, Write, database_path
from app.datasources.sqlite.topics import SqliteTailQueue

__all__ = ["SqliteDatasource", "SqlitePollQueue", "SqliteTailQueue", "open_datasource", "database_path"]


class SqliteDatasource(Datasource):
    def __init__(self, url: str, store: Store) -> None:
        self.url = url
        self.store = store
        self._queues = SqlitePollQueue(store)
        self._topics = SqliteTailQueue(store)
        self.queues = self._queues
        self.topics = self._topics

    @property
    def commits(self) -> int:
        """Write transactions committed so far (each may hold many calls: group commit)."""
        return self.store.commits

    atomic_changes = True

    async def apply(self, changes: Changes) -> None:
        """A COMMIT's puts, publishes, ACKs and releases as one step of the writer, so in one SQLite transaction:
        all stored, or (the step raised, the transaction rolled back) none. Wake-ups follow the commit."""
        if not (changes.queue or changes.topic or changes.acks or changes.requeue or changes.dead_letter):
            return
        files = await self._queues.write_bodies(changes.queue) if changes.queue else None

        def build() -> Write[list[Any]]:
            writes: list[Write[Any]] = []
            if changes.queue:
                writes.append(self._queues.put_write(changes.queue, files))
            if changes.topic:
                writes.append(self._topics.publish_write(changes.topic))
            if changes.acks:
                writes.append(self._queues.ack_write([i for i, _ in changes.acks], [lease for _, lease in changes.acks]))
            for held, how in ((changes.requeue, Release.REQUEUE), (changes.dead_letter, Release.DEAD_LETTER)):
                if held:
                    writes.append(self._queues.release_write([i for i, _ in held], how, [lease for _, lease in held]))

            def run(conn: sqlite3.Connection) -> list[Any]:
                return [step(conn) for step, _ in writes]

            def after(results: list[Any]) -> None:
                for (_, follow_up), result in zip(writes, results):
                    if follow_up is not None:
                        follow_up(result)

            return run, after

        await self.store.write_naming(files, build)

    async def ping(self) -> None:
        await self.store.read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        self._queues.close()
        self._topics.close()
        await self.store.close()


async def open_datasource(url: str, options: DatasourceOptions) -> Datasource:
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise DatasourceError(
            f"the sqlite:// datasource needs SQLite 3.35 or newer (UPDATE ... RETURNING); "
            f"this Python links SQLite {sqlite3.sqlite_version}"
        )
    store = Store(database_path(url), options)
    await store.open()
    datasource = SqliteDatasource(url, store)
    try:
        await datasource._topics.start()
    except BaseException:
        await store.close()
        raise
    return datasource
