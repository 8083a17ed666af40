"""Datasource on Redis: ``redis://[:password@]host:port/db`` (or ``rediss://`` for TLS), through redis-py's asyncio
client with hiredis. Install with ``pip install 'stompgate[redis]'``. Several gateways may share one Redis server.

Supports: every PollQueue and TailQueue operation; priority then FIFO; leases with expiry, fenced by lease tokens;
delivery counts; dead-lettering to ``<destination>.DLQ``; expiry; selectors evaluated in Python while scanning the
backlog (``ScanMark`` budget); a topic log on a Redis Stream with ``Gap`` reporting; durable cursors; COMMIT as one
script (``atomic_changes``). Each state change is one Lua script (``scripts``), loaded once and called by hash.

Durability: a call returns once Redis answered. A RECEIPT means durably stored only when the server writes its
append-only file with an fsync per write (``appendonly yes``, ``appendfsync always``). Start-up reads these settings
(``CONFIG GET``) and logs a warning saying what a RECEIPT means with anything weaker, or that it could not check
(CONFIG refused, as on some managed services).

Wake-ups across gateways: the scripts ``PUBLISH`` on ``<namespace>:wake`` what they made claimable; one subscribed
connection per gateway feeds the waiters. While it is down the datasource is ``shared`` (consumers poll every
``poll_interval``). Topic followers use blocking ``XREAD``.

COMMIT: ``apply`` is one script, which checks everything that can refuse the write (a message id already stored)
before changing anything, so a COMMIT is all or nothing on one Redis server. (A script that fails part-way for
another reason, out of memory, would keep its first changes: Redis scripts do not roll back.)

Failover: puts, publishes and COMMITs that meet an unreachable server wait in a bounded buffer (``failover_buffer``
messages; their RECEIPTs wait with them) and are replayed in order once it answers again. Each such write carries a
token the script stores (``{ns}:w:<token>``, kept an hour) with its changes: a replay of a write whose answer was lost
finds it and does nothing, so a write takes effect once, even if what it stored was consumed since. ACKs and releases
alone are not buffered: an unreachable server is ``DatasourceUnavailable`` to the broker, which retries them and then
gives the messages back (running one twice changes nothing more: each is fenced by its lease token and state).

Redis Cluster: a URL naming a cluster node (``INFO cluster`` says ``cluster_enabled:1``) switches the store to
redis-py's cluster client. Every key of a namespace shares the hash tag ``{ns}`` (``scripts``), so the namespace is
one slot on one master: every script keeps working unchanged and a COMMIT stays all or nothing. Each script call
declares one key of the namespace, which routes it to that master. Notifications: ``PUBLISH`` reaches subscribers on
every node of a cluster. Per-destination slots would spread one namespace over the masters, but a COMMIT across
destinations, a dead-letter and an ACK (which names only a message id) would then span slots and no longer be atomic;
several namespaces spread over the masters instead.

Options used: ``topic_retention``, ``poll_interval``, ``failover_buffer``, ``namespace`` (key prefix). Others are
ignored.
"""

from __future__ import annotations

from app.datasources.interface import Changes, Datasource, DatasourceOptions
from app.datasources.redis.queues import RedisPollQueue
from app.datasources.redis.store import Store
from app.datasources.redis.topics import RedisTailQueue

__all__ = ["RedisDatasource", "open_datasource"]


class RedisDatasource(Datasource):
    atomic_changes = True
    joins_sends_and_acks = True

    def __init__(self, url: str, store: Store) -> None:
        self.url = url
        self.store = store
        self._queues = RedisPollQueue(store)
        self._topics = RedisTailQueue(store)
        self.queues = self._queues
        self.topics = self._topics
        self.shared = not store.listening  # polling while notifications do not flow
        store.on_listening(self._listening)

    def _listening(self, value: bool) -> None:
        self.shared = not value

    async def apply(self, changes: Changes) -> None:
        """A COMMIT's puts, publishes, ACKs and releases in one script: all stored, or none."""
        if not (changes.queue or changes.topic or changes.acks or changes.requeue or changes.dead_letter):
            return
        result = await self.store.write(
            queue=changes.queue,
            topic=changes.topic,
            acks=list(changes.acks),
            requeue=list(changes.requeue),
            dead_letter=list(changes.dead_letter),
        )
        if changes.queue:
            self._queues.after_put(changes.queue)
        if changes.topic:
            self._topics.after_publish(result.newest)
        self._queues.after_release(result.woken)

    async def ping(self) -> None:
        await self.store.call(self.store.client.ping)

    async def close(self) -> None:
        self._queues.close()
        self._topics.close()
        await self.store.close()


async def open_datasource(url: str, options: DatasourceOptions) -> Datasource:
    store = Store(url, options)
    await store.open()
    datasource = RedisDatasource(url, store)
    try:
        await datasource._topics.start()
    except BaseException:
        await store.close()
        raise
    return datasource
