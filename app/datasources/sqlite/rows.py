"""How a message row of the SQLite store reads and writes: the shared SQL row (``app.datasources.sql_rows``) as one
column list, and id chunks under SQLite's variable limit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from app.datasources.sql_rows import MESSAGE_COLUMNS, decode_headers, headers_text, message_from_row

__all__ = ["MSG_COLUMNS", "MESSAGE_COLUMNS", "IN_CHUNK", "SCAN_BATCH", "headers_text", "decode_headers", "message_from_row", "chunks"]

T = TypeVar("T")

IN_CHUNK = 500  # ids per "IN (...)" statement, well under SQLITE_MAX_VARIABLE_NUMBER
SCAN_BATCH = 256  # rows fetched at a time while scanning with a selector or catching up a follower
MSG_COLUMNS = ", ".join(MESSAGE_COLUMNS)


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
