"""How a message row of the SQLite store reads and writes: the column list, header encoding, id chunks."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from app.datasources.interface import StoredMessage

__all__ = ["MSG_COLUMNS", "IN_CHUNK", "SCAN_BATCH", "headers_text", "decode_headers", "message_from_row", "chunks"]

T = TypeVar("T")

IN_CHUNK = 500  # ids per "IN (...)" statement, well under SQLITE_MAX_VARIABLE_NUMBER
SCAN_BATCH = 256  # rows fetched at a time while scanning with a selector or catching up a follower
MSG_COLUMNS = (
    "message_id, destination, headers, body, priority, expires_at, published_at, seq, deliveries, original_destination, "
    "lease"
)

_encode_headers = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
decode_headers = json.JSONDecoder().decode


def headers_text(headers: Mapping[str, str]) -> str:
    return _encode_headers(headers) if headers else "{}"


def message_from_row(row: Sequence[Any]) -> StoredMessage:
    """A row selected as ``MSG_COLUMNS`` (the topic log selects the same shape)."""
    return StoredMessage(
        message_id=row[0],
        destination=row[1],
        headers=decode_headers(row[2]),
        body=row[3],
        priority=row[4],
        expires_at=row[5],
        published_at=row[6],
        seq=row[7],
        deliveries=row[8],
        original_destination=row[9],
        lease=row[10],
    )


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
