"""The SQL-like selector form (the JMS / ActiveMQ subset): tokenizer, recursive-descent parser, three-valued
comparisons and a linear-time LIKE matcher. The language is documented in the package docstring."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, NoReturn, cast

from app.broker.selectors.shared import (
    MAX_SELECTOR_DEPTH,
    LIKE_SCAN_COST,
    Budget,
    Compare,
    Pred,
    SelectorError,
    all_of,
    any_of,
    constant,
    negate,
    number_from_text,
    to_bool,
    to_number,
)

__all__ = ["compile_sql"]

# --- SQL-like expressions: tokens -------------------------------------------------------------------------------------

_KEYWORDS: Final = frozenset({"AND", "OR", "NOT", "LIKE", "ESCAPE", "IN", "BETWEEN", "IS", "NULL", "TRUE", "FALSE"})
_COMPARISONS: Final[dict[str, Compare]] = {
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


def _compare(left: _Operand, symbol: str, right: _Operand, pos: int, what: str = "") -> Pred:
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
        return constant(_COMPARISONS[symbol](left.value, right.value))
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
            number = to_number(raw)
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
            flag = None if raw is None else to_bool(raw)
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


def _like_matcher(pattern: str, escape: str | None, pos: int, budget: Budget) -> Callable[[str], bool]:
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
        budget.charge(LIKE_SCAN_COST, f"the LIKE at position {pos}", pos)
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

    def __init__(self, tokens: list[_Token], budget: Budget) -> None:
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

    def parse(self) -> Pred:
        predicate = self._or(0)
        token = self._peek()
        if token.kind != "end":
            raise SelectorError(
                f"Unexpected {token.describe()} at position {token.pos} after a complete expression.", token.pos
            )
        return predicate

    def _or(self, depth: int) -> Pred:
        parts = [self._and(depth)]
        while (token := self._peek()).is_keyword("OR"):
            self._advance()
            parts.append(self._and(depth))
            if len(parts) == 2:
                self._budget.node(token.pos)
        return any_of(parts)

    def _and(self, depth: int) -> Pred:
        parts = [self._not(depth)]
        while (token := self._peek()).is_keyword("AND"):
            self._advance()
            parts.append(self._not(depth))
            if len(parts) == 2:
                self._budget.node(token.pos)
        return all_of(parts)

    def _deeper(self, depth: int, token: _Token) -> int:
        if depth >= MAX_SELECTOR_DEPTH:
            raise SelectorError(
                f"Selector nests more than {MAX_SELECTOR_DEPTH} levels deep at position {token.pos}.", token.pos
            )
        return depth + 1

    def _not(self, depth: int) -> Pred:
        token = self._peek()
        if token.is_keyword("NOT"):
            inner_depth = self._deeper(depth, token)
            self._budget.node(token.pos)
            self._advance()
            return negate(self._not(inner_depth))
        return self._predicate(depth)

    def _operand(self) -> _Operand:
        token = self._peek()
        if token.kind == "ident":
            operand = _Operand("header", token.value)
        elif token.kind == "string":
            operand = _Operand("string", token.value)
        elif token.kind == "number":
            operand = _Operand("number", number_from_text(token.value))
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

    def _predicate(self, depth: int) -> Pred:
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
            return constant(cast(bool, left.value))
        else:
            self._fail(f"a comparison operator after {opening.describe()}", token)
        return negate(predicate) if negated else predicate

    def _like(self, name: str) -> Pred:
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

    def _in(self, name: str) -> Pred:
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
                numbers.add(number_from_text(token.value))
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
            number = to_number(raw)
            return None if number is None else number in frozen_numbers

        return member

    def _between(self, left: _Operand, pos: int) -> Pred:
        self._advance()
        low = self._operand()
        token = self._peek()
        if not token.is_keyword("AND"):
            self._fail("AND between the bounds of BETWEEN", token)
        self._advance()
        high = self._operand()
        return all_of([_compare(left, ">=", low, pos, "BETWEEN"), _compare(left, "<=", high, pos, "BETWEEN")])

    def _is_null(self, name: str) -> Pred:
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




def compile_sql(text: str, budget: Budget) -> Pred:
    """Compile an SQL-like selector (its grammar is in the package documentation)."""
    return _Parser(_tokenize(text), budget).parse()
