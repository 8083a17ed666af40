"""``[[wrap]]`` settings: an existing MongoDB collection (``collection``) or PostgreSQL table (``table``) plus a
filter, served as a ``/queue/...`` destination.

Checked when the settings load, so that a mistake is one line at start-up instead of an error at the first claim:
the destination, the collection or table name, the filter (a table of plain values and query operators the backend
can send to the server: on PostgreSQL only those with an SQL form), and, across all wraps, that the store's backend
can wrap what is asked and that no destination, collection or table is wrapped twice. Whether a table and its columns
exist, and whether the values fit them, only the database knows: the PostgreSQL datasource checks that at open.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from app.broker.destinations import InvalidDestination, parse_destination

__all__ = ["WrapSetting", "MONGODB_SCHEMES", "POSTGRESQL_SCHEMES", "SQL_QUERY_OPERATORS", "parse_wraps", "check_wraps"]

# Only the MongoDB backend can wrap a collection, and only the PostgreSQL backend a table; the others would silently
# serve an empty queue.
MONGODB_SCHEMES = frozenset({"mongodb", "mongodb+srv"})
POSTGRESQL_SCHEMES = frozenset({"postgresql", "postgres"})
# Query operators a filter may use. ``$where``/``$function`` (server-side JavaScript) and ``$expr`` are left out:
# FerretDB v1 refuses them and MongoDB would run code from a settings file on every claim.
QUERY_OPERATORS = frozenset(
    {
        "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin",
        "$and", "$or", "$nor", "$not",
        "$exists", "$type", "$regex", "$options", "$mod",
        "$all", "$elemMatch", "$size",
    }
)  # fmt: skip
# The operators a PostgreSQL wrap's filter may use: those with an SQL form (app/datasources/postgresql/wrap_filter.py
# compiles them).
SQL_QUERY_OPERATORS = frozenset(
    {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$and", "$or", "$nor", "$not", "$exists", "$regex"}
)
_LOGICAL = frozenset({"$and", "$or", "$nor"})
_LIST_OPERATORS = frozenset({"$in", "$nin"})
# The backend leases a wrapped document in place with these fields (see app/datasources/mongodb/wrapped.py): a filter
# on them would fight the lease.
LEASE_FIELD_PREFIX = "_sg_"


class WrapSetting(BaseModel):
    """One ``[[wrap]]`` table: a MongoDB ``collection`` or a PostgreSQL ``table``. An ACK deletes the document or
    row; on a table, ``ack_set`` makes it an UPDATE of these columns instead. ``key`` names the columns that identify
    a row (default: the table's primary key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    destination: str
    collection: str | None = None
    table: str | None = None
    key: tuple[str, ...] | None = None
    filter: dict[str, Any] = {}
    ack_set: dict[str, Any] | None = None

    @field_validator("destination")
    @classmethod
    def _queue_destination(cls, value: str) -> str:
        try:
            parsed = parse_destination(value)
        except InvalidDestination as exc:
            raise ValueError(str(exc)) from None
        if parsed.kind != "queue":
            raise ValueError(f"a wrapped destination must be a queue (/queue/NAME), not {value!r}")
        if value.endswith(".DLQ"):  # its dead letters go to <destination>.DLQ, a plain gateway queue
            raise ValueError(f"a wrapped destination cannot be a dead-letter queue (.DLQ): {value!r}")
        return value

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value or "$" in value or "\x00" in value or value.startswith(("system.", ".")) or value.endswith("."):
            raise ValueError(f"{value!r} is not a MongoDB collection name (no '$', no NUL, not system.*)")
        return value

    @field_validator("table")
    @classmethod
    def _table_name(cls, value: str | None) -> str | None:
        if value is not None:
            table_parts(value)
        return value

    @field_validator("key")
    @classmethod
    def _key_columns(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("key must name at least one column (or be left out: the table's primary key)")
        for column in value:
            _check_column(column, "key")
        if len(set(value)) != len(value):
            raise ValueError(f"key names a column twice: {list(value)}")
        return value

    @field_validator("ack_set", mode="before")
    @classmethod
    def _ack_set_columns(cls, value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, Mapping) or not value:
            raise ValueError(f"ack_set must be a non-empty table of columns and values, not {value!r}")
        for column, item in value.items():
            _check_column(column, "ack_set")
            if not _is_plain(item):
                raise ValueError(f"ack_set.{column}: a column is set to a plain value, not {item!r}")
        return value

    @model_validator(mode="after")
    def _collection_or_table(self) -> WrapSetting:
        if (self.collection is None) == (self.table is None):
            raise ValueError(f"wrap {self.destination}: give exactly one of collection (MongoDB) or table (PostgreSQL)")
        if self.collection is not None:
            if self.key is not None or self.ack_set is not None:
                raise ValueError(f"wrap {self.destination}: key and ack_set are for a PostgreSQL table, not a collection")
            _check_no_lease_fields(self.filter, "filter")
        return self

    @property
    def source(self) -> str:
        """What is wrapped: the collection or the table, as configured."""
        name = self.collection if self.collection is not None else self.table
        assert name is not None  # one of them, checked above
        return name

    @field_validator("filter", mode="before")
    @classmethod
    def _filter_document(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            raise ValueError(f"the filter must be a table (a JSON object), not {type(value).__name__} {value!r}")
        _check_query(value, "filter")
        return value


def _check_query(query: Mapping[object, object], where: str) -> None:
    for key, value in query.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where} has an empty or non-text key")
        path = f"{where}.{key}"
        if key.startswith("$"):
            if key not in QUERY_OPERATORS:
                raise ValueError(f"{path}: {key} is not a query operator a wrap filter may use")
            if key in _LOGICAL:
                if not isinstance(value, list) or not value or not all(isinstance(v, Mapping) for v in value):
                    raise ValueError(f"{path} must be a non-empty array of tables")
                for index, sub in enumerate(value):
                    _check_query(sub, f"{path}[{index}]")
                continue
        _check_value(value, path)


def _check_no_lease_fields(query: Mapping[str, Any], where: str) -> None:
    """A collection's filter: the MongoDB backend leases a document in place, in fields a filter must not fight."""
    for key, value in query.items():
        path = f"{where}.{key}"
        if key in _LOGICAL:
            for index, sub in enumerate(value):
                _check_no_lease_fields(sub, f"{path}[{index}]")
        elif key.startswith(LEASE_FIELD_PREFIX):
            raise ValueError(f"{path}: fields starting with {LEASE_FIELD_PREFIX} hold the gateway's lease")


def _check_value(value: object, where: str) -> None:
    # datetime.date / datetime.time (TOML local dates and times) have no BSON type; a datetime is a BSON date.
    if value is None or isinstance(value, (str, int, float, bool, datetime.datetime)):
        return
    if isinstance(value, Mapping):
        _check_query(value, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, f"{where}[{index}]")
    else:
        raise ValueError(f"{where}: a {type(value).__name__} cannot be sent to MongoDB")


def table_parts(table: str) -> tuple[str, ...]:
    """``name`` or ``schema.name``: each part is an identifier of its own (quoted where it is used)."""
    parts = tuple(table.split("."))
    if len(parts) > 2 or not all(parts) or "\x00" in table or any(len(p.encode()) > 63 for p in parts):
        raise ValueError(f"{table!r} is not a PostgreSQL table name: NAME or SCHEMA.NAME, each at most 63 bytes")
    return parts


def _check_column(column: object, where: str) -> None:
    if not isinstance(column, str) or not column or "\x00" in column or len(column.encode()) > 63:
        raise ValueError(f"{where}: {column!r} is not a column name (1 to 63 bytes, no NUL)")


def _is_plain(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, datetime.datetime))


def _check_sql_query(query: Mapping[str, Any], where: str) -> None:
    """A PostgreSQL wrap's filter: column names with plain values or tables of the SQL_QUERY_OPERATORS."""
    for key, value in query.items():
        path = f"{where}.{key}"
        if key in _LOGICAL:
            for index, sub in enumerate(value):  # a non-empty array of tables: checked by _check_query
                _check_sql_query(sub, f"{path}[{index}]")
        elif key.startswith("$"):
            raise ValueError(f"{path}: {key} cannot stand for a column; use it inside a column's table")
        else:
            _check_column(key, where)
            _check_sql_condition(value, path)


def _check_sql_condition(value: object, where: str) -> None:
    if not isinstance(value, Mapping):
        if not _is_plain(value):
            raise ValueError(f"{where}: a column is compared with a plain value or a table of operators, not {value!r}")
        return
    if not value:
        raise ValueError(f"{where}: an empty table of operators")
    for operator, operand in value.items():
        path = f"{where}.{operator}"
        if operator not in SQL_QUERY_OPERATORS or operator in _LOGICAL:
            raise ValueError(f"{path}: {operator} is not an operator a PostgreSQL wrap's filter may use "
                             "($eq $ne $gt $gte $lt $lte $in $nin $not $exists $regex; $and $or $nor of tables)")
        if operator in _LIST_OPERATORS:
            if not isinstance(operand, list) or not all(_is_plain(item) for item in operand):
                raise ValueError(f"{path} must be an array of plain values")
        elif operator == "$not":
            if not isinstance(operand, Mapping):
                raise ValueError(f"{path} must be a table of operators")
            _check_sql_condition(operand, path)
        elif operator == "$exists":
            if not isinstance(operand, bool):
                raise ValueError(f"{path} must be true or false")
        elif operator == "$regex":
            if not isinstance(operand, str):
                raise ValueError(f"{path} must be a text (a POSIX regular expression)")
        elif not _is_plain(operand):
            raise ValueError(f"{path} must be a plain value")


def parse_wraps(value: object) -> object:
    """A flag or environment variable gives the wraps as JSON text: an array of tables (or one table)."""
    if not isinstance(value, str):
        return value
    try:
        decoded = json.loads(value) if value.strip() else []
    except ValueError as exc:
        raise ValueError(f"wraps given as text must be a JSON array of tables: {exc}") from None
    return [decoded] if isinstance(decoded, dict) else decoded


def check_wraps(wraps: Sequence[WrapSetting], *, store: str | None, namespace: str | None) -> None:
    """What one wrap cannot see: the store's backend, the gateway's own collections, and the other wraps."""
    if not wraps:
        return
    scheme = urlsplit(store).scheme.lower() if store is not None else None
    if scheme is not None and scheme not in MONGODB_SCHEMES | POSTGRESQL_SCHEMES:
        raise ValueError(
            "[[wrap]] needs a MongoDB store (mongodb:// or mongodb+srv://) for a collection, or a PostgreSQL store "
            f"(postgresql:// or postgres://) for a table, not {scheme!r}"
        )
    destinations: set[str] = set()
    sources: set[str] = set()
    for wrap in wraps:
        if scheme in MONGODB_SCHEMES and wrap.collection is None:
            raise ValueError(f"wrap {wrap.destination}: a MongoDB store wraps a collection, not a table")
        if scheme in POSTGRESQL_SCHEMES and wrap.table is None:
            raise ValueError(f"wrap {wrap.destination}: a PostgreSQL store wraps a table, not a collection")
        if wrap.destination in destinations:
            raise ValueError(f"the destination {wrap.destination} is wrapped twice")
        # the backend finds a row's wrap by its collection or table: two wraps of one would mix their leases
        if wrap.source in sources:
            kind = "collection" if wrap.collection is not None else "table"
            raise ValueError(f"the {kind} {wrap.source!r} is wrapped twice; use one filter with $or")
        if wrap.collection is not None and namespace is not None and wrap.collection.startswith(f"{namespace}."):
            raise ValueError(f"the collection {wrap.collection!r} is one of the gateway's own ({namespace}.*)")
        if wrap.table is not None:
            if namespace is not None and table_parts(wrap.table)[-1].startswith(f"{namespace}_"):
                raise ValueError(f"the table {wrap.table!r} is one of the gateway's own ({namespace}_*)")
            _check_sql_query(wrap.filter, f"wrap {wrap.destination}: filter")
        destinations.add(wrap.destination)
        sources.add(wrap.source)
