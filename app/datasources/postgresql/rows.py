"""How a message row of the PostgreSQL store reads and writes: the column list and header encoding."""

from __future__ import annotations

import json
from collections.abc import Mapping

import asyncpg

from app.datasources.interface import StoredMessage

__all__ = ["columns", "headers_text", "decode_headers", "message_from_record"]

_COLUMNS = (
    "message_id", "destination", "headers", "body", "priority", "expires_at", "published_at", "seq", "deliveries",
    "original_destination", "lease",
)  # fmt: skip

# Headers are stored as JSON text: the database never looks inside them, and text costs no jsonb parse per insert.
_encode_headers = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
decode_headers = json.JSONDecoder().decode


def columns(table: str) -> str:
    """The message columns, qualified by ``table`` (an UPDATE ... FROM another relation would find them ambiguous)."""
    return ", ".join(f"{table}.{name}" for name in _COLUMNS)


def headers_text(headers: Mapping[str, str]) -> str:
    return _encode_headers(headers) if headers else "{}"


def message_from_record(record: asyncpg.Record) -> StoredMessage:
    """A record selected as ``columns(...)`` (the topic log selects the same shape)."""
    return StoredMessage(
        message_id=record[0],
        destination=record[1],
        headers=decode_headers(record[2]),
        body=record[3],
        priority=record[4],
        expires_at=record[5],
        published_at=record[6],
        seq=record[7],
        deliveries=record[8],
        original_destination=record[9],
        lease=record[10],
    )
