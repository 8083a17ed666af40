"""How a message row of the PostgreSQL store reads: the shared SQL row (``app.datasources.sql_rows``), its columns
qualified by table (an UPDATE ... FROM another relation would find them ambiguous)."""

from __future__ import annotations

from app.datasources.sql_rows import MESSAGE_COLUMNS, decode_headers, headers_text, message_from_row

__all__ = ["columns", "headers_text", "decode_headers", "message_from_row"]


def columns(table: str) -> str:
    return ", ".join(f"{table}.{name}" for name in MESSAGE_COLUMNS)
