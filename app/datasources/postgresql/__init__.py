"""Datasource on PostgreSQL: ``postgresql://user:password@host:port/database`` (or ``postgres://``), through asyncpg.
Install with ``pip install 'stompgate[postgresql]'``. Several gateways may share one database: it is the distributed
engine, and each gateway keeps no state another needs.

Supports: every PollQueue and TailQueue operation; leases with expiry, fenced by lease tokens; dead-lettering to
``<destination>.DLQ``; selectors evaluated in Python while scanning the backlog (``ScanMark`` budget); a topic log with
``Gap`` reporting; durable cursors; COMMIT as one transaction (``atomic_changes``); group commit of the queue SENDs and
ACKs that arrive together (``joins_sends_and_acks``: one statement); existing tables wrapped as queues
(``DatasourceOptions.wrapped_tables``: ``wrapped``, checked at open). No native (MongoDB-style) selectors.

Durability: a call returns after its transaction committed. The gateway's connections set ``synchronous_commit`` on
whatever the server's default, so with ``fsync`` on (PostgreSQL's default) that commit is on disk and a RECEIPT means
stored.

Wake-ups across gateways: LISTEN/NOTIFY (``store``); while notifications flow the datasource is not ``shared`` (an
idle consumer waits for a notification, looking again only at the lease period), and while the listener is down it
is (consumers poll every ``poll_interval``).

Failover: puts, publishes and COMMITs that meet an unreachable server wait in a bounded buffer
(``failover_buffer`` messages; their RECEIPTs wait with them) and are replayed in order once it answers again. Each
write commits a mark with its rows (``Store.write_once``): a replay after an answer lost in the outage first writes the
mark itself and finds it there (waiting for an earlier try still running), and then does nothing, so a write takes
effect once even if what it stored was consumed in between.

Options used: ``topic_retention``, ``poll_interval``, ``failover_buffer``, ``namespace`` (table name prefix),
``wrapped_tables``. Others are ignored.

Modules: ``store`` (pool, schema migrations, listener, errors), ``rows``, ``queues``, ``topics``, ``wrapped`` and
``wrap_filter`` (wrapped tables); this one joins them into a ``Datasource`` and makes a COMMIT one transaction.
"""

from __future__ import annotations

import asyncpg

from app.datasources.interface import Changes, Datasource, DatasourceOptions, Release
from app.datasources.postgresql.queues import PgPollQueue
from app.datasources.postgresql.store import Store, WriteAttempt
from app.datasources.postgresql.topics import PgTailQueue
from app.datasources.postgresql.wrapped import WRAPPED_PREFIX, WrappedTables

__all__ = ["PgDatasource", "open_datasource"]


class PgDatasource(Datasource):
    atomic_changes = True
    joins_sends_and_acks = True

    def __init__(self, url: str, store: Store, wrapped: WrappedTables | None = None) -> None:
        self.url = url
        self.store = store
        self._queues = PgPollQueue(store, wrapped)
        self._topics = PgTailQueue(store)
        self.queues = self._queues
        self.topics = self._topics
        self.shared = not store.listening  # polling while notifications do not flow
        store.on_listening(self._listening)

    def _listening(self, value: bool) -> None:
        self.shared = not value

    async def apply(self, changes: Changes) -> None:
        """A COMMIT's puts, publishes, ACKs and releases in one PostgreSQL transaction: all stored, or none. The
        common group, SENDs and the ACKs that arrived with them (``joins_sends_and_acks``), is one statement."""
        if not (changes.queue or changes.topic or changes.acks or changes.requeue or changes.dead_letter):
            return
        queues, topics = self._queues, self._topics
        # ACKs of wrapped rows change another table (ack_in routes them): not in the one statement
        one_statement = (
            bool(changes.queue)
            and not (changes.topic or changes.requeue or changes.dead_letter)
            and not any(message_id.startswith(WRAPPED_PREFIX) for message_id, _ in changes.acks)
        )
        attempt = WriteAttempt(transaction=not one_statement)

        async def work(conn: asyncpg.Connection, retry: bool) -> tuple[int, set[str]]:
            mark = None if retry else attempt  # a replay's mark is written by write_once
            if one_statement:
                await queues.put_in(conn, changes.queue, retry, mark, acks=changes.acks)
                return 0, set()
            newest = 0
            woken: set[str] = set()
            if mark is not None:
                await conn.execute(self.store.sql_mark, *mark.mark_args())
            if changes.queue:
                await queues.put_in(conn, changes.queue, retry)
            if changes.acks:
                await queues.ack_in(conn, [i for i, _ in changes.acks], [lease for _, lease in changes.acks])
            for held, how in ((changes.requeue, Release.REQUEUE), (changes.dead_letter, Release.DEAD_LETTER)):
                if held:
                    woken |= await queues.release_in(conn, [i for i, _ in held], how, [lease for _, lease in held])
            if changes.topic:  # last: the topic head's row lock, which every publisher waits for, is held to the commit
                newest = await topics.publish_in(conn, changes.topic, retry)
            return newest, woken

        # A replay whose earlier try committed does nothing (Store.write_once); should the server have forgotten that
        # try, the puts skip what it stored, and ACKs and releases, fenced by lease tokens, change nothing again.
        written = await self.store.write_once(attempt, work, len(changes.queue) + len(changes.topic))
        if written is None:  # committed by a try whose answer was lost: its notifications went out with it
            newest = await topics.committed_position(changes.topic) if changes.topic else 0
            woken: set[str] = set()
        else:
            newest, woken = written
        if changes.queue:
            queues.after_put(changes.queue)
        if changes.topic:
            topics.after_publish(newest, len(changes.topic))
        queues.after_release(woken)

    async def ping(self) -> None:
        await self.store.run(lambda conn: conn.fetchval("SELECT 1"), transaction=False)

    async def close(self) -> None:
        self._queues.close()
        await self._topics.close()
        await self.store.close()


async def open_datasource(url: str, options: DatasourceOptions) -> Datasource:
    store = Store(url, options)
    await store.open()
    try:
        wrapped = await WrappedTables.open(store, options.wrapped_tables)  # checked now: a mistake stops start-up
        datasource = PgDatasource(url, store, wrapped)
        await datasource._topics.start()
    except BaseException:
        await store.close()
        raise
    return datasource
