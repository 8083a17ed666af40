"""The message row of the SQL stores (SQLite, PostgreSQL): its columns in the order they are selected, how headers
are kept (JSON text: the database never looks inside them, and text costs no parse per insert), and how a selected
row becomes a ``StoredMessage``. The topic log selects the same shape, with its position as ``seq``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from app.datasources.interface import StoredMessage

__all__ = ["MESSAGE_COLUMNS", "Row", "headers_text", "decode_headers", "message_from_row"]

MESSAGE_COLUMNS = (
    "message_id", "destination", "headers", "body", "priority", "expires_at", "published_at", "seq", "deliveries",
    "original_destination", "lease",
)  # fmt: skip

_encode_headers = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
decode_headers = json.JSONDecoder().decode


def headers_text(headers: Mapping[str, str]) -> str:
    return _encode_headers(headers) if headers else "{}"


class Row(Protocol):
    """A selected row as each driver gives it (a tuple, an asyncpg Record): read by position."""

    def __getitem__(self, index: int, /) -> Any: ...


def message_from_row(row: Row) -> StoredMessage:
    """A row selected as ``MESSAGE_COLUMNS``, in that order."""
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
