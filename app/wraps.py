"""``[[wrap]]`` settings: an existing MongoDB collection plus a filter, served as a ``/queue/...`` destination.

Checked when the settings load, so that a mistake is one line at start-up instead of an error at the first claim:
the destination, the collection name, the filter (a table of plain values and query operators the backend can
send to the server), and, across all wraps, that no destination or collection is wrapped twice.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator

from app.broker.destinations import InvalidDestination, parse_destination

__all__ = ["WrapSetting", "MONGODB_SCHEMES", "parse_wraps", "check_wraps"]

# Only the MongoDB backend can wrap a collection; the others would silently serve an empty queue.
MONGODB_SCHEMES = frozenset({"mongodb", "mongodb+srv"})
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
_LOGICAL = frozenset({"$and", "$or", "$nor"})
# The backend leases a wrapped document in place with these fields (see app/datasources/mongodb/wrapped.py): a filter
# on them would fight the lease.
LEASE_FIELD_PREFIX = "_sg_"


class WrapSetting(BaseModel):
    """One ``[[wrap]]`` table. An ACK deletes the document: that is the only ACK action the backend has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    destination: str
    collection: str
    filter: dict[str, Any] = {}

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
    def _collection_name(cls, value: str) -> str:
        if not value or "$" in value or "\x00" in value or value.startswith(("system.", ".")) or value.endswith("."):
            raise ValueError(f"{value!r} is not a MongoDB collection name (no '$', no NUL, not system.*)")
        return value

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
        elif key.startswith(LEASE_FIELD_PREFIX):
            raise ValueError(f"{path}: fields starting with {LEASE_FIELD_PREFIX} hold the gateway's lease")
        _check_value(value, path)


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
    if store is not None and urlsplit(store).scheme.lower() not in MONGODB_SCHEMES:
        raise ValueError(f"[[wrap]] needs a MongoDB store (mongodb:// or mongodb+srv://), not {urlsplit(store).scheme!r}")
    destinations: set[str] = set()
    collections: set[str] = set()
    for wrap in wraps:
        if wrap.destination in destinations:
            raise ValueError(f"the destination {wrap.destination} is wrapped twice")
        # the backend finds a document's wrap by its collection: two wraps of one collection would mix their leases
        if wrap.collection in collections:
            raise ValueError(f"the collection {wrap.collection!r} is wrapped twice; use one filter with $or")
        if namespace is not None and wrap.collection.startswith(f"{namespace}."):
            raise ValueError(f"the collection {wrap.collection!r} is one of the gateway's own ({namespace}.*)")
        destinations.add(wrap.destination)
        collections.add(wrap.collection)
