r"""Message selectors: the ``selector`` header of a STOMP SUBSCRIBE frame.

A selector filters the messages delivered to a subscription by looking at their headers. Header values are always
strings; header names are case-sensitive. A selector is compiled once, when the subscription is made, by
:func:`compile_selector`; :meth:`Selector.matches` then runs on every delivery without re-parsing anything. A bad
selector raises :class:`SelectorError` (a ``ValueError``) whose message is one sentence naming the problem and, where
there is one, the 0-based character position.

Selectors come from clients, so both compiling one and evaluating it against a message are bounded. A selector is at
most :data:`MAX_SELECTOR_LENGTH` characters, nests at most :data:`MAX_SELECTOR_DEPTH` levels deep and has at most
:data:`MAX_SELECTOR_NODES` conditions and logical operators. Every pattern runs in time linear in the header value:
``LIKE`` with a matcher of its own, ``$regex`` on RE2 (at most :data:`MAX_SELECTOR_REGEXES` of them). What is left,
the steps needed per character of a header value, is at most :data:`MAX_SELECTOR_COST` (see there).

There are two forms. Text whose first non-blank character is ``{`` is a MongoDB-style query document; anything else
is an SQL-like expression.

SQL-like expressions (the JMS / ActiveMQ selector subset)
---------------------------------------------------------
* Header names: ``priority``, ``content-type``, ``app.region`` (a letter or ``_`` followed by letters, digits,
  ``_``, ``-`` and ``.``), or any text in double quotes: ``"my header"``, ``"a ""quoted"" name"``. A name that is
  also a keyword (``"in"``, ``"not"``) must be quoted. There is no arithmetic: ``price-5`` is one header name.
* Literals: strings in single quotes (``'it''s'``; ``''`` is an escaped quote), numbers (``7``, ``-3``, ``2.5``,
  ``1e3``), ``TRUE`` and ``FALSE``.
* Comparisons: ``=``, ``<>`` (or ``!=``), ``<``, ``<=``, ``>``, ``>=``; either side may be a header or a literal.
* ``h [NOT] LIKE 'pattern' [ESCAPE 'c']``: ``%`` matches any run of characters, ``_`` exactly one; the escape
  character makes the next character literal (``'50\%' ESCAPE '\'``). The whole value must match.
* ``h [NOT] IN ('a', 'b', 3)``, ``x [NOT] BETWEEN low AND high`` (inclusive), ``h IS [NOT] NULL``.
* ``NOT``, ``AND``, ``OR`` and parentheses; ``NOT`` binds tightest, then ``AND``, then ``OR``.
* Keywords are case-insensitive; header names are not.

A header compared with a number literal is read as a number: a plain decimal such as ``7``, ``-3``, ``2.5`` or
``1e3`` (no spaces, no ``nan``/``inf``), so ``priority > 5`` holds for the header ``"7"``; it does not hold for
``"abc"``. A header compared with a string literal, or with another header, is compared as a string (code-point
order). A header compared with ``TRUE``/``FALSE`` must read ``true`` or ``false`` (any case); booleans support only
``=`` and ``<>``.

Missing values follow SQL's three-valued logic. A comparison involving a missing header, or a header that is not a
number where a number is needed, is *unknown*. ``NOT unknown`` is unknown, ``unknown AND false`` is false,
``unknown OR true`` is true, and a message is delivered only when the whole selector is *true*. So both
``price > 10`` and ``NOT (price > 10)`` skip a message without a ``price`` header; use ``price IS NULL`` to ask for
that. ``IS [NOT] NULL`` is never unknown.

MongoDB-style query documents
-----------------------------
A JSON object whose keys are header names (dots are part of the name, not paths) or logical operators:

* ``{"h": value}`` is ``{"h": {"$eq": value}}``.
* Field operators: ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``, ``$in``, ``$nin``, ``$exists``
  (``true``/``false``), ``$regex`` (a pattern that may match anywhere, with optional ``$options`` of ``i``, ``m``,
  ``s``, ``x``) and ``$not`` (an operator document to negate). Several operators on one field must all hold.
* ``$regex`` patterns use RE2 syntax, which runs in linear time: that of Python's ``re`` and PCRE without
  backreferences, lookaround, atomic groups or possessive quantifiers, which are refused. ``\d``, ``\w``, ``\s`` and
  ``\b`` are ASCII-only (as in MongoDB), ``$`` without ``m`` matches only at the very end (``\z``; ``\Z`` is
  refused), and ``x`` drops unescaped whitespace and ``#`` comments outside character classes.
* Top level: ``$and``, ``$or``, ``$nor``, each a non-empty array of query documents; several keys must all hold.
  As in MongoDB, ``$not`` is a field operator, not a top-level one.

A number operand compares numerically with the header read as a number; a string operand compares as a string; a
boolean operand matches a header reading ``true``/``false`` (any case); ``null`` matches a missing header. A missing
header, or one that is not a number where a number is needed, fails ``$eq``, ``$gt``... and ``$in``; as in MongoDB,
the negations ``$ne``, ``$nin`` and ``$not`` then *match* (this form is two-valued). Duplicate keys, ``NaN`` and
``Infinity`` are refused. The parsed document is kept as :attr:`Selector.native` so that a database backend can
evaluate it itself only when the database's answer is this module's for every message (string comparisons; see
``_database_agrees``): one selector means the same on every store, for queues and topics alike.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, Protocol, cast

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

__all__ = [
    "MAX_SELECTOR_COST",
    "MAX_SELECTOR_DEPTH",
    "MAX_SELECTOR_LENGTH",
    "MAX_SELECTOR_NODES",
    "MAX_SELECTOR_REGEXES",
    "Selector",
    "SelectorError",
    "compile_selector",
]

# Selectors come from clients. These bounds keep compiling cheap and keep the recursive-descent parser and the JSON
# decoder far from Python's recursion limit.
MAX_SELECTOR_LENGTH: Final = 4096  # characters of selector text
MAX_SELECTOR_DEPTH: Final = 32  # nested parentheses/NOTs, or nested JSON objects/arrays
# Evaluation runs once per candidate message on every poll and peek, so a selector's cost is multiplied by the
# backlog. Conditions and logical operators each cost a call or more per message; 256 is far beyond hand-written
# selectors and keeps the per-message overhead in the tens of microseconds.
MAX_SELECTOR_NODES: Final = 256
# Each compiled regex may hold up to _REGEX_MEMORY (its program and its lazily built DFA) for as long as the
# subscription lives: 16 bound one selector to 4 MiB.
MAX_SELECTOR_REGEXES: Final = 16
_REGEX_MEMORY: Final = 256 * 1024
# Linear time is not yet short time: when RE2's DFA gives up (patterns such as "([ab]{1,10}){1,50}c" make it), its NFA
# steps through every instruction of the program for each byte of the value, about 12 ns a step (measured). The cost
# of a selector is that worst case in steps per character of a header value: a regex costs its RE2 program size
# (Unicode classes are large: "\pL" alone is about 1200), a LIKE that has to search for a run containing "_" costs
# _LIKE_SCAN_COST (a Python-level shift-and step per character, 0.2-0.4 us), the rest costs nothing worth counting.
# 1000 keeps a selector under about 12 us per character: 100 ms on an 8 KiB header line (the default
# max_header_line_bytes), under 1 ms on typical values of tens of characters.
MAX_SELECTOR_COST: Final = 1000
_LIKE_SCAN_COST: Final = 40

# A compiled predicate: True, False, or None for SQL's "unknown". Query documents only ever return True or False.
_Pred = Callable[[Mapping[str, str]], "bool | None"]
_Compare = Callable[[Any, Any], bool]


class SelectorError(ValueError):
    """A selector that cannot be compiled; ``position`` is the 0-based offset of the problem when there is one."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True, slots=True)
class Selector:
    """A compiled selector. Two selectors are equal when their texts are."""

    text: str
    native: Mapping[str, object] | None = field(compare=False)  # the parsed query document (form 2), else None
    _predicate: _Pred = field(repr=False, compare=False)

    def matches(self, headers: Mapping[str, str]) -> bool:
        """Whether a message with these headers should be delivered (the selector is true, not false or unknown)."""
        return self._predicate(headers) is True


def compile_selector(text: str) -> Selector:
    """Compile selector text (either form, see the module documentation); raises :class:`SelectorError`."""
    if len(text) > MAX_SELECTOR_LENGTH:
        raise SelectorError(f"Selector is {len(text)} characters long, more than the limit of {MAX_SELECTOR_LENGTH}.")
    stripped = text.strip()
    if not stripped:
        raise SelectorError("Selector is empty.", 0)
    budget = _Budget()
    if stripped.startswith("{"):
        document = _load_document(text)
        predicate = _document(document, budget)
        return Selector(text, document if _database_agrees(document) else None, predicate)
    return Selector(text, None, _Parser(_tokenize(text), budget).parse())


_STRING_COMPARISONS = frozenset({"$eq", "$gt", "$gte", "$lt", "$lte"})


def _database_agrees(document: object) -> bool:
    """Whether a database evaluating this document over the stored headers (always strings) gives this module's
    answer for every message, so that it may be handed over as :attr:`Selector.native`. Only string comparisons,
    ``$in`` of strings, ``$exists: true`` and ``$and``/``$or``/``$nor`` of such parts qualify. Numbers compare
    numerically here but never match a string in the database; booleans and ``null`` have their own rules here;
    ``$ne``, ``$nin``, ``$not`` and ``$exists: false`` match a missing header here but not inside the database's
    ``$elemMatch``; and ``$regex`` would run on the database's backtracking engine (PCRE), where a pattern that is
    linear on RE2 here can still burn the server's CPU on every claim. Anything else is evaluated here."""
    if not isinstance(document, Mapping):
        return False
    for key, condition in document.items():
        if key in _LOGICAL_KEYS:
            if not isinstance(condition, list) or not all(_database_agrees(part) for part in condition):
                return False
        elif key.startswith("$"):
            return False
        elif isinstance(condition, Mapping):
            for op, operand in condition.items():
                if op in _STRING_COMPARISONS and isinstance(operand, str):
                    continue
                if op == "$in" and isinstance(operand, list) and all(isinstance(item, str) for item in operand):
                    continue
                if op == "$exists" and operand is True:
                    continue
                return False
        elif not isinstance(condition, str):
            return False
    return True


_LOGICAL_KEYS = frozenset({"$and", "$or", "$nor"})


class _Budget:
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

_NUMBER_RE: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _number_from_text(text: str) -> int | float:
    """The value of text already known to be a decimal number: an int when it has no point or exponent."""
    if "." in text or "e" in text or "E" in text:
        return float(text)
    try:
        return int(text)
    except ValueError:  # more digits than int() accepts (sys.get_int_max_str_digits)
        return float(text)


def _to_number(raw: str) -> int | float | None:
    """A header value read as a number, or None when it is not a plain decimal number."""
    if _NUMBER_RE.fullmatch(raw) is None:
        return None
    return _number_from_text(raw)


def _to_bool(raw: str) -> bool | None:
    lowered = raw.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return None


# --- three-valued combinators -----------------------------------------------------------------------------------------


def _constant(value: bool) -> _Pred:
    def pred(headers: Mapping[str, str]) -> bool | None:
        return value

    return pred


def _negate(inner: _Pred) -> _Pred:
    def pred(headers: Mapping[str, str]) -> bool | None:
        result = inner(headers)
        return None if result is None else not result

    return pred


def _all(parts: list[_Pred]) -> _Pred:
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


def _any(parts: list[_Pred]) -> _Pred:
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


# --- SQL-like expressions: tokens -------------------------------------------------------------------------------------

_KEYWORDS: Final = frozenset({"AND", "OR", "NOT", "LIKE", "ESCAPE", "IN", "BETWEEN", "IS", "NULL", "TRUE", "FALSE"})
_COMPARISONS: Final[dict[str, _Compare]] = {
    "=": operator.eq,
    "<>": operator.ne,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_MIRRORED: Final = {"=": "=", "<>": "<>", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_ORDERING: Final = frozenset({"<", "<=", ">", ">="})
_IDENT_RE: Final = re.compile(r"[^\W\d][\w.\-]*")
_NUMBER_LITERAL_RE: Final = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OPERATOR_RE: Final = re.compile(r"[<>=!~&|+*/^]+")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "ident", "string", "number", "keyword", "op", "(", ")", ",", "end"
    value: str  # the decoded text: a header name, a string's contents, an upper-cased keyword...
    pos: int
    raw: str

    def is_keyword(self, *words: str) -> bool:
        return self.kind == "keyword" and self.value in words

    def describe(self) -> str:
        return "the end of the selector" if self.kind == "end" else repr(self.raw)


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """The contents of the quoted run starting at ``start`` (doubled quotes stand for one) and the offset after it."""
    quote = text[start]
    parts: list[str] = []
    index = start + 1
    while True:
        end = text.find(quote, index)
        if end < 0:
            what = "string literal" if quote == "'" else "quoted identifier"
            raise SelectorError(f"Unterminated {what} starting at position {start}.", start)
        parts.append(text[index:end])
        if text.startswith(quote, end + 1):
            parts.append(quote)
            index = end + 2
            continue
        return "".join(parts), end + 1


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if char.isspace():
            index += 1
            continue
        if char in "(),":
            tokens.append(_Token(char, char, index, char))
            index += 1
            continue
        if char in "'\"":
            value, end = _read_quoted(text, index)
            if char == '"' and not value:
                raise SelectorError(f"Empty quoted identifier at position {index}.", index)
            tokens.append(_Token("string" if char == "'" else "ident", value, index, text[index:end]))
            index = end
            continue
        match = _NUMBER_LITERAL_RE.match(text, index)
        if match is not None:
            end = match.end()
            if end < length and (text[end].isalnum() or text[end] in "_."):
                raise SelectorError(f"Malformed number starting at position {index}.", index)
            tokens.append(_Token("number", match.group(), index, match.group()))
            index = end
            continue
        match = _IDENT_RE.match(text, index)
        if match is not None:
            word = match.group()
            upper = word.upper()
            if upper in _KEYWORDS:
                tokens.append(_Token("keyword", upper, index, word))
            else:
                tokens.append(_Token("ident", word, index, word))
            index = match.end()
            continue
        match = _OPERATOR_RE.match(text, index)
        if match is not None or char == "-":
            symbol = char if match is None else match.group()
            if symbol not in _COMPARISONS:
                raise SelectorError(f"Unknown operator {symbol!r} at position {index}.", index)
            tokens.append(_Token("op", symbol, index, symbol))
            index += len(symbol)
            continue
        raise SelectorError(f"Unexpected character {char!r} at position {index}.", index)
    tokens.append(_Token("end", "", length, ""))
    return tokens


# --- SQL-like expressions: parser and compiler -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Operand:
    kind: str  # "header", "string", "number", "boolean"
    value: str | int | float | bool


_KIND_NAMES: Final = {"string": "a string", "number": "a number", "boolean": "a boolean"}


def _compare(left: _Operand, symbol: str, right: _Operand, pos: int, what: str = "") -> _Pred:
    """Compile ``left symbol right``; a header always ends up on the left when there is one. ``what`` names the
    construct in error messages (default: the operator)."""
    what = what or f"Operator {symbol!r}"
    if symbol in _ORDERING and "boolean" in (left.kind, right.kind):
        raise SelectorError(f"{what} at position {pos} cannot compare TRUE or FALSE; use = or <>.", pos)
    if left.kind != "header" and right.kind != "header":
        if left.kind != right.kind:
            raise SelectorError(
                f"{what} at position {pos} cannot compare {_KIND_NAMES[left.kind]} literal "
                f"with {_KIND_NAMES[right.kind]} literal.",
                pos,
            )
        return _constant(_COMPARISONS[symbol](left.value, right.value))
    if left.kind != "header":
        left, right, symbol = right, left, _MIRRORED[symbol]
    compare = _COMPARISONS[symbol]
    name = cast(str, left.value)
    literal = right.value
    if right.kind == "number":

        def numeric(headers: Mapping[str, str]) -> bool | None:
            raw = headers.get(name)
            if raw is None:
                return None
            number = _to_number(raw)
            return None if number is None else compare(number, literal)

        return numeric
    if right.kind == "string":

        def textual(headers: Mapping[str, str]) -> bool | None:
            raw = headers.get(name)
            return None if raw is None else compare(raw, literal)

        return textual
    if right.kind == "boolean":

        def boolean(headers: Mapping[str, str]) -> bool | None:
            raw = headers.get(name)
            flag = None if raw is None else _to_bool(raw)
            return None if flag is None else compare(flag, literal)

        return boolean
    other = cast(str, literal)

    def two_headers(headers: Mapping[str, str]) -> bool | None:
        first, second = headers.get(name), headers.get(other)
        return None if first is None or second is None else compare(first, second)

    return two_headers


# LIKE is matched without a regex: backtracking regex engines take time exponential in the number of "%" on values
# that nearly match. The pattern is cut at each "%" into segments of fixed length (literal characters and "_"); the
# first must match at the start of the value, the last at its end, and the ones between are each found leftmost after
# the previous one. Leftmost is always right (it leaves the most room for the rest), so there is no backtracking:
# literal segments are found by str.find and segments with "_" by a bit-parallel (shift-and) scan, each once.


@dataclass(frozen=True, slots=True)
class _LikeSegment:
    """A run of a LIKE pattern between two ``%``: literal characters and ``_`` (any one character)."""

    length: int
    literal: str | None  # the whole run when it has no "_": compared with startswith, found with str.find
    chunks: tuple[tuple[int, str], ...]  # otherwise its literal pieces as (offset, text), to check one position
    masks: Mapping[str, int]  # shift-and: bit i is set when item i accepts the character
    wildcards: int  # the bits of the "_" items, which accept a character absent from masks

    @staticmethod
    def of(items: list[str | None]) -> _LikeSegment:
        """The segment of these items: a character each, or None for ``_``."""
        if None not in items:
            return _LikeSegment(len(items), "".join(cast(list[str], items)), (), {}, 0)
        chunks: list[tuple[int, str]] = []
        masks: dict[str, int] = {}
        wildcards = 0
        for index, item in enumerate(items):
            if item is None:
                wildcards |= 1 << index
                continue
            masks[item] = masks.get(item, 0) | 1 << index
            if chunks and chunks[-1][0] + len(chunks[-1][1]) == index:
                chunks[-1] = (chunks[-1][0], chunks[-1][1] + item)
            else:
                chunks.append((index, item))
        return _LikeSegment(
            len(items), None, tuple(chunks), {char: mask | wildcards for char, mask in masks.items()}, wildcards
        )

    def at(self, value: str, start: int) -> bool:
        """Whether the segment matches ``value`` at ``start`` (the caller knows that it fits there)."""
        if self.literal is not None:
            return value.startswith(self.literal, start)
        return all(value.startswith(text, start + offset) for offset, text in self.chunks)

    def find(self, value: str, start: int, end: int) -> int:
        """The leftmost offset at or after ``start`` where the segment matches within ``value[:end]``, or -1."""
        if self.literal is not None:
            return value.find(self.literal, start, end)
        masks, wildcards = self.masks, self.wildcards
        state, last = 0, 1 << (self.length - 1)
        for index in range(start, end):
            state = ((state << 1) | 1) & masks.get(value[index], wildcards)
            if state & last:
                return index - self.length + 1
        return -1


def _like_matcher(pattern: str, escape: str | None, pos: int, budget: _Budget) -> Callable[[str], bool]:
    """A function telling whether a whole value matches the LIKE pattern (see the comment above)."""
    runs: list[list[str | None]] = [[]]
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == escape:
            if index + 1 == len(pattern):
                raise SelectorError(f"LIKE pattern at position {pos} ends with its escape character.", pos)
            runs[-1].append(pattern[index + 1])
            index += 2
            continue
        if char == "%":
            runs.append([])
        else:
            runs[-1].append(None if char == "_" else char)
        index += 1
    first = _LikeSegment.of(runs[0])
    if len(runs) == 1:
        return lambda value: len(value) == first.length and first.at(value, 0)
    last = _LikeSegment.of(runs[-1])
    middle = tuple(_LikeSegment.of(run) for run in runs[1:-1] if run)  # "%%" is one "%"
    if any(segment.literal is None for segment in middle):
        budget.charge(_LIKE_SCAN_COST, f"the LIKE at position {pos}", pos)
    shortest = first.length + sum(segment.length for segment in middle) + last.length

    def like(value: str) -> bool:
        if len(value) < shortest or not first.at(value, 0):
            return False
        end = len(value) - last.length
        if not last.at(value, end):
            return False
        start = first.length
        for segment in middle:
            found = segment.find(value, start, end)
            if found < 0:
                return False
            start = found + segment.length
        return True

    return like


class _Parser:
    """Recursive descent over the tokens; each method returns the compiled predicate of what it parsed."""

    __slots__ = ("_budget", "_index", "_tokens")

    def __init__(self, tokens: list[_Token], budget: _Budget) -> None:
        self._tokens = tokens
        self._index = 0
        self._budget = budget

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _advance(self) -> _Token:
        token = self._tokens[self._index]
        self._index += 1
        return token

    @staticmethod
    def _fail(expected: str, token: _Token) -> NoReturn:
        raise SelectorError(f"Expected {expected} at position {token.pos} but found {token.describe()}.", token.pos)

    def parse(self) -> _Pred:
        predicate = self._or(0)
        token = self._peek()
        if token.kind != "end":
            raise SelectorError(
                f"Unexpected {token.describe()} at position {token.pos} after a complete expression.", token.pos
            )
        return predicate

    def _or(self, depth: int) -> _Pred:
        parts = [self._and(depth)]
        while (token := self._peek()).is_keyword("OR"):
            self._advance()
            parts.append(self._and(depth))
            if len(parts) == 2:
                self._budget.node(token.pos)
        return _any(parts)

    def _and(self, depth: int) -> _Pred:
        parts = [self._not(depth)]
        while (token := self._peek()).is_keyword("AND"):
            self._advance()
            parts.append(self._not(depth))
            if len(parts) == 2:
                self._budget.node(token.pos)
        return _all(parts)

    def _deeper(self, depth: int, token: _Token) -> int:
        if depth >= MAX_SELECTOR_DEPTH:
            raise SelectorError(
                f"Selector nests more than {MAX_SELECTOR_DEPTH} levels deep at position {token.pos}.", token.pos
            )
        return depth + 1

    def _not(self, depth: int) -> _Pred:
        token = self._peek()
        if token.is_keyword("NOT"):
            inner_depth = self._deeper(depth, token)
            self._budget.node(token.pos)
            self._advance()
            return _negate(self._not(inner_depth))
        return self._predicate(depth)

    def _operand(self) -> _Operand:
        token = self._peek()
        if token.kind == "ident":
            operand = _Operand("header", token.value)
        elif token.kind == "string":
            operand = _Operand("string", token.value)
        elif token.kind == "number":
            operand = _Operand("number", _number_from_text(token.value))
        elif token.is_keyword("TRUE", "FALSE"):
            operand = _Operand("boolean", token.value == "TRUE")
        else:
            self._fail("a header name or a literal", token)
        self._advance()
        return operand

    def _header(self, operand: _Operand, token: _Token, what: str) -> str:
        if operand.kind != "header":
            raise SelectorError(f"{what} at position {token.pos} needs a header name on its left.", token.pos)
        return cast(str, operand.value)

    def _predicate(self, depth: int) -> _Pred:
        opening = self._peek()
        if opening.kind == "(":
            inner_depth = self._deeper(depth, opening)
            self._advance()
            inner = self._or(inner_depth)
            closing = self._peek()
            if closing.kind != ")":
                self._fail(f"')' to close the '(' at position {opening.pos}", closing)
            self._advance()
            return inner
        left = self._operand()
        token = self._peek()
        self._budget.node(token.pos)
        if token.kind == "op":
            self._advance()
            return _compare(left, token.value, self._operand(), token.pos)
        negated = token.is_keyword("NOT")
        if negated:
            self._advance()
            token = self._peek()
            if not token.is_keyword("LIKE", "IN", "BETWEEN"):
                self._fail("LIKE, IN or BETWEEN after NOT", token)
        if token.is_keyword("LIKE"):
            predicate = self._like(self._header(left, token, "LIKE"))
        elif token.is_keyword("IN"):
            predicate = self._in(self._header(left, token, "IN"))
        elif token.is_keyword("BETWEEN"):
            predicate = self._between(left, token.pos)
        elif token.is_keyword("IS"):
            return self._is_null(self._header(left, token, "IS NULL"))
        elif left.kind == "boolean":
            return _constant(cast(bool, left.value))
        else:
            self._fail(f"a comparison operator after {opening.describe()}", token)
        return _negate(predicate) if negated else predicate

    def _like(self, name: str) -> _Pred:
        self._advance()
        pattern = self._peek()
        if pattern.kind != "string":
            self._fail("a quoted pattern after LIKE", pattern)
        self._advance()
        escape: str | None = None
        if self._peek().is_keyword("ESCAPE"):
            self._advance()
            token = self._peek()
            if token.kind != "string" or len(token.value) != 1:
                self._fail("a one-character string after ESCAPE", token)
            self._advance()
            escape = token.value
        matches = _like_matcher(pattern.value, escape, pattern.pos, self._budget)

        def like(headers: Mapping[str, str]) -> bool | None:
            raw = headers.get(name)
            return None if raw is None else matches(raw)

        return like

    def _in(self, name: str) -> _Pred:
        self._advance()
        token = self._peek()
        if token.kind != "(":
            self._fail("'(' after IN", token)
        self._advance()
        strings: set[str] = set()
        numbers: set[int | float] = set()
        while True:
            token = self._peek()
            if token.kind == "string":
                strings.add(token.value)
            elif token.kind == "number":
                numbers.add(_number_from_text(token.value))
            else:
                self._fail("a string or number literal in the IN list", token)
            self._advance()
            token = self._advance()
            if token.kind == ")":
                break
            if token.kind != ",":
                self._fail("',' or ')' in the IN list", token)
        frozen_strings, frozen_numbers = frozenset(strings), frozenset(numbers)

        def member(headers: Mapping[str, str]) -> bool | None:
            raw = headers.get(name)
            if raw is None:
                return None
            if raw in frozen_strings:
                return True
            if not frozen_numbers:
                return False
            number = _to_number(raw)
            return None if number is None else number in frozen_numbers

        return member

    def _between(self, left: _Operand, pos: int) -> _Pred:
        self._advance()
        low = self._operand()
        token = self._peek()
        if not token.is_keyword("AND"):
            self._fail("AND between the bounds of BETWEEN", token)
        self._advance()
        high = self._operand()
        return _all([_compare(left, ">=", low, pos, "BETWEEN"), _compare(left, "<=", high, pos, "BETWEEN")])

    def _is_null(self, name: str) -> _Pred:
        self._advance()
        negated = self._peek().is_keyword("NOT")
        if negated:
            self._advance()
        token = self._peek()
        if not token.is_keyword("NULL"):
            self._fail("NULL after IS" + (" NOT" if negated else ""), token)
        self._advance()
        if negated:
            return lambda headers: name in headers
        return lambda headers: name not in headers


# --- MongoDB-style query documents -----------------------------------------------------------------------------------

_MatchPred = Callable[[Mapping[str, str]], bool]
_MONGO_ORDERING: Final[dict[str, _Compare]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}
_REGEX_OPTIONS: Final = frozenset("imsx")
_EXTENDED_WHITESPACE: Final = frozenset(" \t\n\r\v\f")  # what extended mode ignores, as in Python's re and PCRE


def _check_json_depth(text: str) -> None:
    """Refuse deep nesting before json.loads recurses into it (brackets inside JSON strings do not count)."""
    depth = 0
    in_string = escaped = False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
            if depth > MAX_SELECTOR_DEPTH:
                raise SelectorError(
                    f"Query document nests more than {MAX_SELECTOR_DEPTH} levels deep at position {index}.", index
                )
        elif char in "}]":
            depth -= 1


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    document: dict[str, object] = {}
    for key, value in pairs:
        if key in document:
            raise SelectorError(f"Query document repeats the key {key!r}.")
        document[key] = value
    return document


def _refuse_constant(name: str) -> NoReturn:
    raise SelectorError(f"Query document contains {name}, which is not a valid JSON number.")


def _load_document(text: str) -> dict[str, object]:
    _check_json_depth(text)
    try:
        loaded = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise SelectorError(f"Invalid JSON in query document at position {exc.pos}: {exc.msg}.", exc.pos) from None
    # The text starts with "{" and parsed completely, so it is a JSON object.
    return cast(dict[str, object], loaded)


def _always(headers: Mapping[str, str]) -> bool:
    return True


def _match_all(parts: list[_MatchPred]) -> _MatchPred:
    if not parts:
        return _always
    if len(parts) == 1:
        return parts[0]
    preds = tuple(parts)

    def pred(headers: Mapping[str, str]) -> bool:
        for part in preds:
            if not part(headers):
                return False
        return True

    return pred


def _match_any(parts: list[_MatchPred]) -> _MatchPred:
    preds = tuple(parts)

    def pred(headers: Mapping[str, str]) -> bool:
        for part in preds:
            if part(headers):
                return True
        return False

    return pred


def _match_not(inner: _MatchPred) -> _MatchPred:
    return lambda headers: not inner(headers)


def _document(document: Mapping[str, object], budget: _Budget) -> _MatchPred:
    parts: list[_MatchPred] = []
    for key, value in document.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(value, list) or not value:
                raise SelectorError(f"{key} needs a non-empty array of query documents.")
            budget.node()
            subs: list[_MatchPred] = []
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise SelectorError(f"{key} item {index} is not a query document (a JSON object).")
                subs.append(_document(item, budget))
            if key == "$and":
                parts.append(_match_all(subs))
            elif key == "$or":
                parts.append(_match_any(subs))
            else:
                parts.append(_match_not(_match_any(subs)))
        elif key == "$not":
            raise SelectorError('$not is a field operator; write {"header": {"$not": {...}}} instead.')
        elif key.startswith("$"):
            raise SelectorError(f"Unknown top-level query operator {key!r}.")
        else:
            parts.append(_field(key, value, budget))
    return _match_all(parts)


def _field(name: str, condition: object, budget: _Budget) -> _MatchPred:
    if not isinstance(condition, dict):
        budget.node()
        return _equals(name, condition, "$eq")
    operators = [key for key in condition if key.startswith("$")]
    if operators and len(operators) == len(condition):
        return _operators(name, condition, budget)
    if operators:
        raise SelectorError(f"Condition for header {name!r} mixes operators with plain keys.")
    raise SelectorError(f'Condition for header {name!r} is an object without operators; use one such as {{"$eq": 1}}.')


def _operators(name: str, condition: Mapping[str, object], budget: _Budget) -> _MatchPred:
    parts: list[_MatchPred] = []
    for key, operand in condition.items():
        if key != "$options":  # $options belongs to its $regex
            budget.node()
        if key == "$eq":
            parts.append(_equals(name, operand, key))
        elif key == "$ne":
            parts.append(_match_not(_equals(name, operand, key)))
        elif key in _MONGO_ORDERING:
            parts.append(_ordering(name, key, operand))
        elif key == "$in":
            parts.append(_member(name, operand, key))
        elif key == "$nin":
            parts.append(_match_not(_member(name, operand, key)))
        elif key == "$exists":
            parts.append(_exists(name, operand))
        elif key == "$regex":
            parts.append(_regex(name, operand, condition.get("$options", ""), budget))
        elif key == "$options":
            if "$regex" not in condition:
                raise SelectorError(f"$options for header {name!r} needs a $regex beside it.")
        elif key == "$not":
            if not isinstance(operand, dict) or not operand or not all(k.startswith("$") for k in operand):
                raise SelectorError(f'$not for header {name!r} needs an operator document such as {{"$gt": 5}}.')
            parts.append(_match_not(_operators(name, operand, budget)))
        else:
            raise SelectorError(f"Unknown query operator {key!r} for header {name!r}.")
    return _match_all(parts)


def _equals(name: str, operand: object, key: str) -> _MatchPred:
    if operand is None:
        return lambda headers: name not in headers
    if isinstance(operand, bool):
        wanted = operand

        def boolean(headers: Mapping[str, str]) -> bool:
            raw = headers.get(name)
            return raw is not None and _to_bool(raw) is wanted

        return boolean
    if isinstance(operand, int | float):
        number = operand

        def numeric(headers: Mapping[str, str]) -> bool:
            raw = headers.get(name)
            return raw is not None and _to_number(raw) == number

        return numeric
    if isinstance(operand, str):
        text = operand
        return lambda headers: headers.get(name) == text
    raise SelectorError(f"{key} for header {name!r} needs a string, number, boolean or null operand.")


def _ordering(name: str, key: str, operand: object) -> _MatchPred:
    compare = _MONGO_ORDERING[key]
    if isinstance(operand, str):
        text = operand

        def textual(headers: Mapping[str, str]) -> bool:
            raw = headers.get(name)
            return raw is not None and compare(raw, text)

        return textual
    if isinstance(operand, int | float) and not isinstance(operand, bool):
        limit = operand

        def numeric(headers: Mapping[str, str]) -> bool:
            raw = headers.get(name)
            number = None if raw is None else _to_number(raw)
            return number is not None and compare(number, limit)

        return numeric
    raise SelectorError(f"{key} for header {name!r} needs a number or string operand.")


def _member(name: str, operand: object, key: str) -> _MatchPred:
    if not isinstance(operand, list):
        raise SelectorError(f"{key} for header {name!r} needs an array.")
    strings: set[str] = set()
    numbers: set[int | float] = set()
    flags: set[bool] = set()
    missing = False
    for item in operand:
        if item is None:
            missing = True
        elif isinstance(item, bool):
            flags.add(item)
        elif isinstance(item, int | float):
            numbers.add(item)
        elif isinstance(item, str):
            strings.add(item)
        else:
            raise SelectorError(f"{key} for header {name!r} accepts only strings, numbers, booleans and null.")
    frozen_strings, frozen_numbers, frozen_flags = frozenset(strings), frozenset(numbers), frozenset(flags)

    def member(headers: Mapping[str, str]) -> bool:
        raw = headers.get(name)
        if raw is None:
            return missing
        if raw in frozen_strings:
            return True
        if frozen_flags and _to_bool(raw) in frozen_flags:
            return True
        return bool(frozen_numbers) and _to_number(raw) in frozen_numbers

    return member


def _exists(name: str, operand: object) -> _MatchPred:
    if not isinstance(operand, bool | int | float):
        raise SelectorError(f"$exists for header {name!r} needs true or false.")
    if operand:
        return lambda headers: name in headers
    return lambda headers: name not in headers


class _Regex(Protocol):
    """What is used of a compiled ``re2`` pattern."""

    @property
    def programsize(self) -> int: ...

    def search(self, text: bytes) -> object | None: ...


def _strip_extended(pattern: str) -> str:
    """The pattern without the whitespace and ``#`` comments that extended mode (option ``x``) ignores: RE2 has no
    such mode. Escaped characters, ``\\Q...\\E`` quoting and character classes keep their whitespace."""
    out: list[str] = []
    index, length = 0, len(pattern)
    in_class = False
    while index < length:
        char = pattern[index]
        if not in_class and char in _EXTENDED_WHITESPACE:
            index += 1
            continue
        if not in_class and char == "#":
            closing = pattern.find("\n", index)
            index = length if closing < 0 else closing + 1
            continue
        end = index + 1
        if char == "\\":
            end = index + 2
            if pattern.startswith("Q", index + 1):
                closing = pattern.find("\\E", index + 2)
                end = length if closing < 0 else closing + 2
        elif in_class:
            if pattern.startswith("[:", index) and (closing := pattern.find(":]", index + 2)) >= 0:
                end = closing + 2  # a POSIX class such as [:alpha:] does not end the class at its "]"
            in_class = char != "]"
        elif char == "[":
            in_class = True
            end += pattern.startswith("^", end)
            end += pattern.startswith("]", end)  # a "]" first in a class is a member, not its end
        out.append(pattern[index:end])
        index = end
    return "".join(out)


def _regex(name: str, operand: object, options: object, budget: _Budget) -> _MatchPred:
    if not isinstance(operand, str):
        raise SelectorError(f"$regex for header {name!r} needs a string pattern.")
    if not isinstance(options, str):
        raise SelectorError(f"$options for header {name!r} needs a string such as \"i\".")
    for letter in options:
        if letter not in _REGEX_OPTIONS:
            raise SelectorError(f"$options for header {name!r} has unknown option {letter!r}; use i, m, s or x.")
    try:
        operand.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON's "\ud800" can produce
        raise SelectorError(f"$regex for header {name!r} is not valid Unicode.") from None
    budget.regex()
    settings = re2.Options()
    settings.max_mem = _REGEX_MEMORY
    settings.never_capture = True  # only whether it matches is wanted
    settings.log_errors = False  # a client's bad pattern is no news for the gateway's log
    settings.case_sensitive = "i" not in options
    settings.dot_nl = "s" in options
    pattern = _strip_extended(operand) if "x" in options else operand
    if "m" in options:
        pattern = "(?m)" + pattern  # RE2's Perl mode has no option for it, only the flag
    try:
        compiled: _Regex = re2.compile(pattern, settings)
    except re2.error as exc:
        detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise SelectorError(
            f"$regex for header {name!r} is refused: {detail} (patterns run on RE2, which has no backreferences, "
            "lookaround, atomic groups or possessive quantifiers, and limits their size)."
        ) from None
    budget.charge(compiled.programsize, f"the $regex for header {name!r}")
    search = compiled.search

    def regex(headers: Mapping[str, str]) -> bool:
        raw = headers.get(name)
        # surrogatepass: a value that is not valid Unicode (say, read back from a database) cannot match, not raise
        return raw is not None and search(raw.encode("utf-8", "surrogatepass")) is not None

    return regex
