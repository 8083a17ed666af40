"""What both selector forms share: the limits, the budget that enforces them while compiling, reading header
values as numbers and booleans, and the three-valued combinators."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

# Selectors come from clients. These bounds keep compiling cheap and keep the recursive-descent parser and the JSON
# decoder far from Python's recursion limit.
MAX_SELECTOR_LENGTH: Final = 4096  # characters of selector text
MAX_SELECTOR_DEPTH: Final = 32  # nested parentheses/NOTs, or nested JSON objects/arrays
# Evaluation runs once per candidate message on every poll and peek, so a selector's cost is multiplied by the
# backlog. Conditions and logical operators each cost a call or more per message; 256 is far beyond hand-written
# selectors and keeps the per-message overhead in the tens of microseconds.
MAX_SELECTOR_NODES: Final = 256
# Each compiled regex may hold up to REGEX_MEMORY (its program and its lazily built DFA) for as long as the
# subscription lives: 16 bound one selector to 4 MiB.
MAX_SELECTOR_REGEXES: Final = 16
REGEX_MEMORY: Final = 256 * 1024
# Linear time is not yet short time: when RE2's DFA gives up (patterns such as "([ab]{1,10}){1,50}c" make it), its NFA
# steps through every instruction of the program for each byte of the value, about 12 ns a step (measured). The cost
# of a selector is that worst case in steps per character of a header value: a regex costs its RE2 program size
# (Unicode classes are large: "\pL" alone is about 1200), a LIKE that has to search for a run containing "_" costs
# LIKE_SCAN_COST (a Python-level shift-and step per character, 0.2-0.4 us), the rest costs nothing worth counting.
# 1000 keeps a selector under about 12 us per character: 100 ms on an 8 KiB header line (the default
# max_header_line_bytes), under 1 ms on typical values of tens of characters.
MAX_SELECTOR_COST: Final = 1000
LIKE_SCAN_COST: Final = 40

# A compiled predicate: True, False, or None for SQL's "unknown". Query documents only ever return True or False.
Pred = Callable[[Mapping[str, str]], "bool | None"]
Compare = Callable[[Any, Any], bool]


class SelectorError(ValueError):
    """A selector that cannot be compiled; ``position`` is the 0-based offset of the problem when there is one."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class Budget:
    """What one selector has spent of its limits while it is compiled; going over one raises :class:`SelectorError`."""

    __slots__ = ("_cost", "_nodes", "_regexes")

    def __init__(self) -> None:
        self._nodes = self._regexes = self._cost = 0

    def node(self, pos: int | None = None) -> None:
        """Count one condition or logical operator (``pos`` where it is, in SQL-like text)."""
        self._nodes += 1
        if self._nodes > MAX_SELECTOR_NODES:
            where = "" if pos is None else f" at position {pos}"
            raise SelectorError(
                f"Selector has more than {MAX_SELECTOR_NODES} conditions and operators{where}.", pos
            )

    def regex(self) -> None:
        self._regexes += 1
        if self._regexes > MAX_SELECTOR_REGEXES:
            raise SelectorError(f"Selector has more than {MAX_SELECTOR_REGEXES} $regex operators.")

    def charge(self, cost: int, what: str, pos: int | None = None) -> None:
        """Add ``cost`` steps per character of a header value (see :data:`MAX_SELECTOR_COST`) for ``what``."""
        self._cost += cost
        if self._cost > MAX_SELECTOR_COST:
            raise SelectorError(
                f"Selector is too costly to evaluate: with {what} it needs {self._cost} steps per character of a "
                f"header value, more than the limit of {MAX_SELECTOR_COST}.",
                pos,
            )


# --- values -----------------------------------------------------------------------------------------------------------

NUMBER_RE: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def number_from_text(text: str) -> int | float:
    """The value of text already known to be a decimal number: an int when it has no point or exponent."""
    if "." in text or "e" in text or "E" in text:
        return float(text)
    try:
        return int(text)
    except ValueError:  # more digits than int() accepts (sys.get_int_max_str_digits)
        return float(text)


def to_number(raw: str) -> int | float | None:
    """A header value read as a number, or None when it is not a plain decimal number."""
    if NUMBER_RE.fullmatch(raw) is None:
        return None
    return number_from_text(raw)


def to_bool(raw: str) -> bool | None:
    lowered = raw.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return None


# --- three-valued combinators -----------------------------------------------------------------------------------------


def constant(value: bool) -> Pred:
    def pred(headers: Mapping[str, str]) -> bool | None:
        return value

    return pred


def negate(inner: Pred) -> Pred:
    def pred(headers: Mapping[str, str]) -> bool | None:
        result = inner(headers)
        return None if result is None else not result

    return pred


def all_of(parts: list[Pred]) -> Pred:
    if len(parts) == 1:
        return parts[0]
    preds = tuple(parts)

    def pred(headers: Mapping[str, str]) -> bool | None:
        result: bool | None = True
        for part in preds:
            value = part(headers)
            if value is False:
                return False
            if value is None:
                result = None
        return result

    return pred


def any_of(parts: list[Pred]) -> Pred:
    if len(parts) == 1:
        return parts[0]
    preds = tuple(parts)

    def pred(headers: Mapping[str, str]) -> bool | None:
        result: bool | None = False
        for part in preds:
            value = part(headers)
            if value is True:
                return True
            if value is None:
                result = None
        return result

    return pred
