"""Destination names: ``/queue/NAME`` (each message to one consumer) and ``/topic/NAME`` (to every subscriber)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["Destination", "InvalidDestination", "parse_destination", "dead_letter_of", "MAX_NAME_LENGTH"]

# 200 characters keeps a name well inside MongoDB's index key limits and SQLite's page size while leaving room for
# dotted hierarchies such as "orders.eu.priority".
MAX_NAME_LENGTH = 200
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-:/]*")
_PREFIXES: dict[str, Literal["queue", "topic"]] = {"/queue/": "queue", "/topic/": "topic"}
# C0 controls (NUL included) and DEL: they could split a log line or a header, and never belong in a name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Path segments that name another place ("orders/../reports" is "reports" to anyone who normalises paths, yet
# starts with "orders" for a prefix permission), and the empty segment that "a//b" would hide.
_BAD_SEGMENTS = frozenset({"", ".", ".."})


class InvalidDestination(ValueError):
    """The destination is malformed or uses an unknown prefix; the message says which."""


@dataclass(frozen=True, slots=True)
class Destination:
    kind: Literal["queue", "topic"]
    name: str

    def __str__(self) -> str:
        return f"/{self.kind}/{self.name}"


def parse_destination(text: str) -> Destination:
    for prefix, kind in _PREFIXES.items():
        if text.startswith(prefix):
            name = text[len(prefix) :]
            if not name:
                raise InvalidDestination(f"destination {text!r} has no name after {prefix}")
            if len(name) > MAX_NAME_LENGTH:
                raise InvalidDestination(f"destination name is longer than {MAX_NAME_LENGTH} characters")
            if _CONTROL.search(name):
                raise InvalidDestination(f"destination {text!r} holds a control character")
            for segment in name.split("/"):
                if segment in _BAD_SEGMENTS:
                    raise InvalidDestination(
                        f"destination {text!r} has an empty, '.' or '..' segment ({segment!r}) between '/'s"
                    )
            if not _NAME.fullmatch(name):
                raise InvalidDestination(
                    f"destination {text!r} has characters outside letters, digits and _ . - : /"
                )
            return Destination(kind, name)
    raise InvalidDestination(f"unknown destination prefix in {text!r}: use /queue/NAME or /topic/NAME")


def dead_letter_of(destination: str) -> str:
    return destination + ".DLQ"
