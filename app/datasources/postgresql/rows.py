"""How a message row of the PostgreSQL store reads: the shared SQL row (``app.datasources.sql_rows``), its columns
qualified by table (an UPDATE ... FROM another relation would find them ambiguous)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.datasources.interface import NewMessage
from app.datasources.sql_rows import MESSAGE_COLUMNS, decode_headers, headers_text, message_from_row

__all__ = ["columns", "headers_text", "decode_headers", "message_from_row", "NEW_COLUMNS", "unnest_new", "new_arrays"]

# What a put or a publish stores of each message, as one array parameter per column (one statement for a batch).
NEW_COLUMNS = "message_id, destination, priority, expires_at, published_at, headers, body"
_NEW_TYPES = ("text", "text", "smallint", "bigint", "bigint", "text", "bytea")


def unnest_new(first: int) -> str:
    """``unnest`` of the ``new_arrays`` parameters, numbered from ``$first``."""
    return "unnest(" + ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(_NEW_TYPES)) + ")"


def new_arrays(messages: Sequence[NewMessage]) -> list[list[Any]]:
    """The parameters ``unnest_new`` reads, in ``NEW_COLUMNS`` order."""
    return [
        [m.message_id for m in messages],
        [m.destination for m in messages],
        [m.priority for m in messages],
        [m.expires_at for m in messages],
        [m.published_at for m in messages],
        [headers_text(m.headers) for m in messages],
        [m.body for m in messages],
    ]


def columns(table: str) -> str:
    return ", ".join(f"{table}.{name}" for name in MESSAGE_COLUMNS)
