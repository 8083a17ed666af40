"""Existing tables wrapped as queues (``DatasourceOptions.wrapped_tables``), for ``PgPollQueue``.

The rows of an existing table matching a filter (``wrap_filter``) are delivered in key order as JSON bodies
(``row_to_json``; headers ``content-type: application/json`` and ``postgresql-table: <table>``). The table is never
altered: a row's lease is a row of ``<ns>_wrap_leases`` keyed by (destination, the row's key columns as JSON text),
holding its owner, expiry, claim count (the lease token) and delivery count. An ACK deletes the row, or updates the
``ack_set`` columns; a requeue lapses the lease; dead-lettering copies the row's JSON into ``<destination>.DLQ`` (a
message of the gateway's own queue table) and then applies the ACK action. Message ids are
``wrapped:["<table>", "<row key JSON>"]`` (``WRAPPED_PREFIX``, as on MongoDB). A dead letter's id is
``dead:<uuid>:`` and that id: it must not start with the prefix, or its ACK would be routed here instead of deleting
it, and each dead-lettering of a key (a row deleted and inserted again) is a message of its own.

A claim is one statement: rows matching the filter without a live lease, locked ``FOR NO KEY UPDATE SKIP LOCKED``
in key order, then leased by an upsert whose ``WHERE`` is the fence. Under READ COMMITTED a claim whose snapshot
predates another gateway's committed lease may still lock that row once the other commits; the upsert then finds a
live lease and takes nothing, so no row is delivered twice at once.

Everything from the configuration is quoted (identifiers) or bound (values). ``WrappedTables.open`` resolves each
table, its key (the primary key unless configured) and columns, and runs every statement once in a rolled-back
transaction, so that a missing table or column or a value of the wrong type is one ``DatasourceError`` at start-up.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence

import asyncpg

from app.datasources import rules
from app.datasources.interface import DatasourceError, NewMessage, QueueStats, Release, StoredMessage, WrappedTable
from app.datasources.postgresql.rows import NEW_COLUMNS, new_arrays, unnest_new
from app.datasources.postgresql.store import Store, quote
from app.datasources.postgresql.wrap_filter import compile_filter

__all__ = ["WRAPPED_PREFIX", "WrappedTables", "Held"]

log = logging.getLogger("stompgate.datasource.postgresql")

WRAPPED_PREFIX = "wrapped:"  # message ids of wrapped rows: wrapped:["<table>", "<row key as JSON text>"]
Held = tuple[str, int | None]  # a message id, and the lease token its consumer holds (None: unfenced)


def wrapped_id(table: str, row_key: str) -> str:
    return WRAPPED_PREFIX + json.dumps([table, row_key])


def parse_wrapped_id(message_id: str) -> tuple[str, str] | None:
    try:
        table, row_key = json.loads(message_id[len(WRAPPED_PREFIX) :])
    except (ValueError, TypeError):
        return None
    return (table, row_key) if isinstance(table, str) and isinstance(row_key, str) else None


class _Wrap:
    """One wrapped table's statements. The table is aliased ``t``; ``$1`` is always the destination, and the
    values from the wrap's settings (ack_set, filter) follow each statement's fixed parameters."""

    def __init__(
        self, setting: WrappedTable, qualified: str, key: Sequence[str], key_types: Sequence[str], store: Store
    ) -> None:
        self.setting = setting
        self.destination = setting.destination
        self.table = qualified
        self.key = tuple(key)
        self.headers = {"content-type": "application/json", "postgresql-table": setting.table}
        self.dead_letters = rules.dead_letter_destination(setting.destination)
        # statement name -> (the number of its first value from the settings, those values, where each came from)
        self.values: dict[str, tuple[int, list[object], list[str]]] = {}
        leases = store.wrap_leases
        row_key = self.row_key("t")
        # Whole rows are always ``alias.*``: a bare alias would name a column of that name, should the table have one.
        body = "row_to_json(t.*)::text"
        order = ", ".join(f"t.{quote(c)}" for c in key)
        # The row whose key JSON is held.row_key: the JSON read back as the key columns' own types (from the catalog),
        # compared column by column so that the key's unique index is used.
        typed = ", ".join(f"{quote(c)} {kind}" for c, kind in zip(key, key_types))
        to_key = f"CROSS JOIN LATERAL jsonb_to_record(held.row_key::jsonb) AS sg_key_row({typed})"
        key_match = " AND ".join(f"t.{quote(c)} = sg_key_row.{quote(c)}" for c in key)

        def condition(name: str, start: int, before: Mapping[str, object] | None = None) -> str:
            """The filter as SQL for statement ``name``, its values from ``$start`` after those of ``before``."""
            first = dict(before or {})
            compiled = compile_filter(setting.filter, lambda column: f"t.{quote(column)}", start + len(first))
            self.values[name] = (
                start,
                [*first.values(), *compiled.params],
                [*(f"ack_set.{c}" for c in first), *compiled.places],
            )
            return compiled.sql

        self.filter_columns = compile_filter(setting.filter, quote, 1).columns

        # $1 destination, $2 now, $3 limit, $4 owner, $5 lease until. A new lease row's token comes from the
        # identity, and so does a retaken one's (claims = DEFAULT).
        self.sql_claim = (
            f"WITH picked AS (SELECT {body} AS sg_body, {row_key} AS sg_key, "
            + ", ".join(f"t.{quote(c)} AS sg_order_{i}" for i, c in enumerate(key))
            + f" FROM {qualified} AS t "
            f"WHERE ({condition('claim', 6)}) AND NOT EXISTS (SELECT 1 FROM {leases} AS l "
            f"WHERE l.destination = $1 AND l.row_key = {row_key} AND l.lease_until > $2) "
            f"ORDER BY {order} LIMIT $3 FOR NO KEY UPDATE OF t SKIP LOCKED), "
            f"leased AS (INSERT INTO {leases} AS l (destination, row_key, owner, lease_until, deliveries) "
            "SELECT $1, sg_key, $4::text, $5::bigint, 1 FROM picked "
            "ON CONFLICT (destination, row_key) DO UPDATE SET owner = excluded.owner, "
            "lease_until = excluded.lease_until, claims = DEFAULT, deliveries = l.deliveries + 1 "
            "WHERE l.lease_until <= $2 "  # the fence: leased by another claim since this one's snapshot
            "RETURNING l.row_key, l.claims, l.deliveries) "
            "SELECT p.sg_body, leased.row_key, leased.claims, leased.deliveries "
            "FROM picked AS p JOIN leased ON leased.row_key = p.sg_key ORDER BY "
            + ", ".join(f"p.sg_order_{i}" for i in range(len(key)))
        )
        # ACK: $1 row keys, $2 destination, and fenced $3 lease tokens. The lease rows go, then the table's rows
        # (or their ack_set columns change) if they still match the filter: a row the application moved out of it
        # meanwhile is the application's again. Each row answers whether it still matches after the update.
        gone = {
            True: f"DELETE FROM {leases} AS l USING unnest($1::text[], $3::bigint[]) AS held(row_key, claims) "
            "WHERE l.destination = $2 AND l.row_key = held.row_key AND l.claims = held.claims RETURNING l.row_key",
            False: f"DELETE FROM {leases} AS l WHERE l.destination = $2 AND l.row_key = ANY($1::text[])",
        }
        acked = {True: "gone AS held", False: "unnest($1::text[]) AS held(row_key)"}  # unfenced: by key alone
        self.sql_ack: dict[bool, str] = {}
        for fenced in (True, False):
            name, start = ("ack fenced", 4) if fenced else ("ack", 3)
            if setting.ack_set is None:
                test = condition(name, start)
                action = (
                    f"DELETE FROM {qualified} AS t USING {acked[fenced]} {to_key} WHERE {key_match} AND ({test}) "
                    "RETURNING false"
                )
            else:
                test = condition(name, start, setting.ack_set)
                sets = ", ".join(f"{quote(c)} = ${start + i}" for i, c in enumerate(setting.ack_set))
                action = (
                    f"UPDATE {qualified} AS t SET {sets} FROM {acked[fenced]} {to_key} WHERE {key_match} AND ({test}) "
                    f"RETURNING ({test})"
                )
            self.sql_ack[fenced] = f"WITH gone AS ({gone[fenced]}) {action}"
        # release: $1 row keys, $2 destination, and fenced $3 lease tokens; only leases still held (a requeue clears
        # the owner, and takes a new token)
        held = {
            True: "unnest($1::text[], $3::bigint[]) AS held(row_key, claims) WHERE l.destination = $2 "
            "AND l.row_key = held.row_key AND l.claims = held.claims AND l.owner IS NOT NULL",
            False: "WHERE l.destination = $2 AND l.row_key = ANY($1::text[]) AND l.owner IS NOT NULL",
        }
        self.sql_requeue = {
            True: f"UPDATE {leases} AS l SET lease_until = 0, owner = NULL, claims = DEFAULT FROM {held[True]} "
            "RETURNING l.row_key",
            False: f"UPDATE {leases} AS l SET lease_until = 0, owner = NULL, claims = DEFAULT {held[False]} "
            "RETURNING l.row_key",
        }
        # dead-lettering first takes the lease rows (the fence), then reads the rows and copies them
        self.sql_take = {
            True: f"DELETE FROM {leases} AS l USING {held[True]} RETURNING l.row_key",
            False: f"DELETE FROM {leases} AS l {held[False]} RETURNING l.row_key",
        }
        # $1 row keys: the rows still matching the filter, as JSON, locked until the dead-lettering transaction ends
        self.sql_rows = (
            f"SELECT held.row_key, {body} FROM unnest($1::text[]) AS held(row_key) {to_key} "
            f"JOIN {qualified} AS t ON {key_match} WHERE ({condition('dead-letter rows', 2)}) FOR UPDATE OF t"
        )
        # $1 destination, $2 now
        self.sql_stats = (
            "SELECT count(*) FILTER (WHERE l.row_key IS NULL), count(*) FILTER (WHERE l.row_key IS NOT NULL) "
            f"FROM {qualified} AS t LEFT JOIN {leases} AS l "
            f"ON l.destination = $1 AND l.row_key = {row_key} AND l.lease_until > $2 "
            f"WHERE ({condition('stats', 3)})"
        )
        # $1 destination, $2 now, $3 limit, $4 offset
        self.sql_peek = (
            f"SELECT {body}, {row_key}, coalesce(l.claims, 0), coalesce(l.deliveries, 0) "
            f"FROM {qualified} AS t LEFT JOIN {leases} AS l ON l.destination = $1 AND l.row_key = {row_key} "
            f"WHERE ({condition('peek', 5)}) AND (l.lease_until IS NULL OR l.lease_until <= $2) "
            f"ORDER BY {order} LIMIT $3 OFFSET $4"
        )
        self.sql_any = f"SELECT EXISTS (SELECT 1 FROM {qualified} AS t WHERE ({condition('any', 1)}))"

    def row_key(self, alias: str) -> str:
        """A row's key columns as JSON text, built by PostgreSQL (``to_jsonb`` of a row of just those columns, named
        as they are), so that equal keys are equal texts. The text of some types depends on session settings
        (time zone, float digits, date and interval styles): the store pins them on every connection
        (``Store.open``), so every gateway writes one key the same way."""
        columns = ", ".join(f"{alias}.{quote(c)}" for c in self.key)
        return f"(SELECT to_jsonb(sg_key_columns.*) FROM (SELECT {columns}) AS sg_key_columns)::text"

    def settings_values(self, statement: str) -> list[object]:
        """The values from the settings that follow ``statement``'s fixed parameters."""
        found = self.values.get(statement)
        return found[1] if found is not None else []

    def ack_values(self, fenced: bool) -> list[object]:
        return self.settings_values("ack fenced" if fenced else "ack")

    def message(self, body: str, row_key: str, claims: int, deliveries: int) -> StoredMessage:
        return StoredMessage(
            message_id=wrapped_id(self.setting.table, row_key),
            destination=self.destination,
            headers=self.headers,
            body=body.encode(),
            deliveries=int(deliveries),
            lease=int(claims),
        )


class WrappedTables:
    """The wrapped tables of one ``PgPollQueue``, by destination. Open with ``WrappedTables.open``."""

    def __init__(self, store: Store, wraps: Sequence[_Wrap]) -> None:
        self._store = store
        self._by_destination = {w.destination: w for w in wraps}
        self._by_table = {w.setting.table: w for w in wraps}
        self._warned: set[str] = set()  # destinations warned of rows an ack_set left matching the filter
        self._sql_renew = (
            f"UPDATE {store.wrap_leases} SET lease_until = $1 WHERE (destination, row_key) IN "
            f"(SELECT destination, row_key FROM {store.wrap_leases} WHERE owner = $2 FOR UPDATE SKIP LOCKED)"
        )
        self._sql_dead = (
            f"INSERT INTO {store.messages} ({NEW_COLUMNS}, original_destination) "
            f"SELECT *, $8::text FROM {unnest_new(1)}"
        )

    @classmethod
    async def open(cls, store: Store, settings: Sequence[WrappedTable]) -> WrappedTables:
        """Resolve and check every wrapped table; a problem is a one-sentence ``DatasourceError`` naming the wrap."""
        wraps: list[_Wrap] = []
        if settings:
            async with store.connection() as conn:
                for setting in settings:
                    wraps.append(await _resolve(conn, store, setting))
        tables = cls(store, wraps)
        for wrap in wraps:
            await tables._try_statements(wrap)
        return tables

    def get(self, destination: str) -> _Wrap | None:
        return self._by_destination.get(destination)

    def __bool__(self) -> bool:
        return bool(self._by_destination)

    # -- claim ----------------------------------------------------------------------------------------------------
    async def claim(self, wrap: _Wrap, owner: str, limit: int, lease_until: int, now_ms: int) -> list[StoredMessage]:
        args = (wrap.destination, now_ms, limit, owner, lease_until, *wrap.settings_values("claim"))
        rows = await self._store.run(lambda conn: conn.fetch(wrap.sql_claim, *args), transaction=False)
        return [wrap.message(r[0], r[1], r[2], r[3]) for r in rows]

    # -- ack / release / renew (in the caller's transaction) --------------------------------------------------------
    def _by_wrap(self, held: Sequence[Held]) -> dict[_Wrap, tuple[list[str], list[int | None]]]:
        grouped: dict[_Wrap, tuple[list[str], list[int | None]]] = {}
        for message_id, lease in held:
            parsed = parse_wrapped_id(message_id)
            wrap = self._by_table.get(parsed[0]) if parsed is not None else None
            if parsed is None or wrap is None:
                continue  # not one of ours (a table no longer wrapped): nothing to do, as for an unknown id
            keys, leases = grouped.setdefault(wrap, ([], []))
            keys.append(parsed[1])
            leases.append(lease)
        return grouped

    async def ack_in(self, conn: asyncpg.Connection, held: Sequence[Held], fenced: bool) -> None:
        for wrap, (keys, leases) in self._by_wrap(held).items():
            fence = [leases] if fenced else []
            matching = await conn.fetch(wrap.sql_ack[fenced], keys, wrap.destination, *fence, *wrap.ack_values(fenced))
            self._warn_if_still_matching(wrap, [bool(r[0]) for r in matching])

    def _warn_if_still_matching(self, wrap: _Wrap, matches: Sequence[bool]) -> None:
        if any(matches) and wrap.destination not in self._warned:
            self._warned.add(wrap.destination)
            log.warning(
                "wrap %s: a row acked with ack_set still matches the filter, so it will be delivered again; "
                "set a column the filter tests",
                wrap.destination,
            )

    async def release_in(self, conn: asyncpg.Connection, held: Sequence[Held], how: Release, fenced: bool) -> set[str]:
        """Requeue or dead-letter the held rows; answers the destinations that have new work for their consumers."""
        woken: set[str] = set()
        for wrap, (keys, leases) in self._by_wrap(held).items():
            fence = [leases] if fenced else []
            if how is Release.REQUEUE:
                if await conn.fetch(wrap.sql_requeue[fenced], keys, wrap.destination, *fence):
                    woken.add(wrap.destination)
                continue
            taken = [r[0] for r in await conn.fetch(wrap.sql_take[fenced], keys, wrap.destination, *fence)]
            if not taken:
                continue
            rows = await conn.fetch(wrap.sql_rows, taken, *wrap.settings_values("dead-letter rows"))
            now_ms = int(time.time() * 1000)
            dead = [
                NewMessage(
                    message_id=rules.wrapped_dead_letter_id(wrapped_id(wrap.setting.table, r[0])), destination=wrap.dead_letters,
                    headers=wrap.headers, body=r[1].encode(), published_at=now_ms,
                )  # fmt: skip
                for r in rows
            ]
            # copied, then the ACK action: one transaction (the caller's), after the lease rows were taken (the
            # fence): a repeat, or a release under a stale token, finds no lease and copies nothing
            if dead:
                await conn.execute(self._sql_dead, *new_arrays(dead), wrap.destination)
                woken.add(wrap.dead_letters)
            matching = await conn.fetch(wrap.sql_ack[False], taken, wrap.destination, *wrap.ack_values(False))
            self._warn_if_still_matching(wrap, [bool(r[0]) for r in matching])
        return woken

    async def renew(self, owner: str, lease_until: int) -> None:
        if self._by_destination:
            await self._store.run(lambda conn: conn.execute(self._sql_renew, lease_until, owner), transaction=False)

    # -- inspection -----------------------------------------------------------------------------------------------
    async def stats(self, wrap: _Wrap, now_ms: int) -> QueueStats:
        args = (wrap.destination, now_ms, *wrap.settings_values("stats"))
        row = await self._store.run(lambda conn: conn.fetchrow(wrap.sql_stats, *args), transaction=False)
        assert row is not None  # an aggregate always answers one row
        return QueueStats(ready=int(row[0]), unacked=int(row[1]))

    async def peek(self, wrap: _Wrap, now_ms: int, limit: int, offset: int) -> list[StoredMessage]:
        """The ready rows in key order."""
        args = (wrap.destination, now_ms, limit, offset, *wrap.settings_values("peek"))
        rows = await self._store.run(lambda conn: conn.fetch(wrap.sql_peek, *args), transaction=False)
        return [wrap.message(r[0], r[1], r[2], r[3]) for r in rows]

    async def destinations(self) -> list[str]:
        """The destinations whose table has a row matching its filter."""
        found: list[str] = []
        for wrap in self._by_destination.values():
            params = wrap.settings_values("any")
            if await self._store.run(lambda conn: conn.fetchval(wrap.sql_any, *params), transaction=False):
                found.append(wrap.destination)
        return found

    # -- the check at open ----------------------------------------------------------------------------------------
    async def _try_statements(self, wrap: _Wrap) -> None:
        """Run every statement of ``wrap`` once, changing nothing (no keys, limit 0, rolled back): a value that does
        not fit its column, an operator the column's type lacks, a missing privilege fail here, not at a claim."""
        none: list[object] = []
        tries: list[tuple[str, str, list[object]]] = [
            ("claim", wrap.sql_claim, [wrap.destination, 0, 0, "", 0]),
            ("ack fenced", wrap.sql_ack[True], [none, wrap.destination, none]),
            ("ack", wrap.sql_ack[False], [none, wrap.destination]),
            ("requeue", wrap.sql_requeue[True], [none, wrap.destination, none]),
            ("requeue", wrap.sql_requeue[False], [none, wrap.destination]),
            ("dead-letter", wrap.sql_take[True], [none, wrap.destination, none]),
            ("dead-letter", wrap.sql_take[False], [none, wrap.destination]),
            ("dead-letter rows", wrap.sql_rows, [none]),
            ("stats", wrap.sql_stats, [wrap.destination, 0]),
            ("peek", wrap.sql_peek, [wrap.destination, 0, 0, 0]),
            ("any", wrap.sql_any, []),
        ]
        async with self._store.connection() as conn:
            for name, sql, fixed in tries:
                try:
                    async with conn.transaction():
                        await conn.fetch(sql, *fixed, *wrap.settings_values(name))
                        raise _RollBack
                except _RollBack:
                    pass
                except (asyncpg.PostgresError, ValueError) as exc:  # ValueError: asyncpg's client-side DataError
                    raise DatasourceError(_statement_failure(wrap, name, exc)) from None


class _RollBack(Exception):
    """Leaves a ``conn.transaction()`` block by rolling it back."""


async def _resolve(conn: asyncpg.Connection, store: Store, setting: WrappedTable) -> _Wrap:
    where = f"wrap {setting.destination}"
    parts = setting.table.split(".")
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise DatasourceError(f"{where}: {setting.table!r} is not a table name (NAME or SCHEMA.NAME)")
    qualified = ".".join(quote(p) for p in parts)
    found = await conn.fetchrow(
        "SELECT c.oid, c.relkind FROM pg_catalog.pg_class AS c WHERE c.oid = to_regclass($1)", qualified
    )
    if found is None:
        raise DatasourceError(f"{where}: table {qualified} does not exist (or is not on the search_path)")
    if found["relkind"] not in (b"r", b"p", "r", "p"):
        raise DatasourceError(f"{where}: {qualified} is not a table")
    oid = found["oid"]
    columns = {
        r[0]: (r[1], r[2])  # name -> (type as SQL, NOT NULL)
        for r in await conn.fetch(
            "SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_catalog.pg_attribute "
            "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
            oid,
        )
    }
    key = setting.key
    if key is None:
        key = tuple(
            r[0]
            for r in await conn.fetch(
                "SELECT a.attname FROM pg_catalog.pg_index AS i JOIN pg_catalog.pg_attribute AS a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = $1 AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
                oid,
            )
        )
        if not key:
            raise DatasourceError(
                f"{where}: table {qualified} has no primary key; name the columns that identify a row with key = [...]"
            )
    try:
        wrap = _Wrap(setting, qualified, key, [columns[c][0] if c in columns else "text" for c in key], store)
    except DatasourceError as exc:
        raise DatasourceError(f"{where}: {exc}") from None
    for role, names in (("key", key), ("filter", sorted(wrap.filter_columns)), ("ack_set", list(setting.ack_set or {}))):
        for name in names:
            if name not in columns:
                raise DatasourceError(f"{where}: table {qualified} has no column {quote(name)} (in {role})")
    # A key must name one row, always: an ACK deletes by it, and a lease is kept by it. A NULL matches nothing.
    nullable = [quote(c) for c in key if not columns[c][1]]
    if nullable:
        raise DatasourceError(f"{where}: the key column {', '.join(nullable)} of table {qualified} may be NULL")
    unique_sets = [
        set(r[0])
        for r in await conn.fetch(
            "SELECT array(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) "
            "JOIN pg_catalog.pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE k.n <= i.indnkeyatts) FROM pg_catalog.pg_index AS i "
            "WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL",
            oid,
        )
    ]
    if set(key) not in unique_sets:
        raise DatasourceError(
            f"{where}: no unique index of table {qualified} is on exactly the key ({', '.join(quote(c) for c in key)}); "
            "a key must identify one row"
        )
    return wrap


_ARGUMENT = re.compile(r"query argument \$(\d+)")


def _statement_failure(wrap: _Wrap, statement: str, exc: BaseException) -> str:
    """One sentence: the wrap, and where it can be said, the setting whose value the column refused."""
    where = f"wrap {wrap.destination}"
    reason = " ".join(str(exc).split())
    found = _ARGUMENT.search(reason)
    if found is not None and statement in wrap.values:
        start, _, places = wrap.values[statement]
        index = int(found.group(1)) - start
        if 0 <= index < len(places):
            return f"{where}: the value of {places[index]} does not fit its column of table {wrap.table}: {reason}"
    return f"{where}: PostgreSQL refused the {statement} statement on table {wrap.table}: {reason}"
