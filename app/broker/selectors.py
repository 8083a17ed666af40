r"""Message selectors: the ``selector`` header of a STOMP SUBSCRIBE frame.

A selector filters the messages delivered to a subscription by looking at their headers. Header values are always
strings; header names are case-sensitive. A selector is compiled once, when the subscription is made, by
:func:`compile_selector`; :meth:`Selector.matches` then runs on every delivery without re-parsing anything. A bad
selector raises :class:`SelectorError` (a ``ValueError``) whose message is one sentence naming the problem and, where
there is one, the 0-based character position. Selectors are at most :data:`MAX_SELECTOR_LENGTH` characters and nest
at most :data:`MAX_SELECTOR_DEPTH` levels deep.

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
  (``true``/``false``), ``$regex`` (a Python ``re`` pattern that may match anywhere, with optional ``$options`` of
  ``i``, ``m``, ``s``, ``x``) and ``$not`` (an operator document to negate). Several operators on one field must all
  hold.
* Top level: ``$and``, ``$or``, ``$nor``, each a non-empty array of query documents; several keys must all hold.
  As in MongoDB, ``$not`` is a field operator, not a top-level one.

A number operand compares numerically with the header read as a number; a string operand compares as a string; a
boolean operand matches a header reading ``true``/``false`` (any case); ``null`` matches a missing header. A missing
header, or one that is not a number where a number is needed, fails ``$eq``, ``$gt``... and ``$in``; as in MongoDB,
the negations ``$ne``, ``$nin`` and ``$not`` then *match* (this form is two-valued). Duplicate keys, ``NaN`` and
``Infinity`` are refused. The parsed document is kept as :attr:`Selector.native` so that a database backend can
evaluate it itself.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, cast

__all__ = ["MAX_SELECTOR_DEPTH", "MAX_SELECTOR_LENGTH", "Selector", "SelectorError", "compile_selector"]

# Selectors come from clients. These bounds keep compiling cheap and keep the recursive-descent parser and the JSON
# decoder far from Python's recursion limit.
MAX_SELECTOR_LENGTH: Final = 4096  # characters of selector text
MAX_SELECTOR_DEPTH: Final = 32  # nested parentheses/NOTs, or nested JSON objects/arrays

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
    if stripped.startswith("{"):
        document = _load_document(text)
        return Selector(text, document, _document(document))
    return Selector(text, None, _Parser(_tokenize(text)).parse())


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


def _like_regex(pattern: str, escape: str | None, pos: int) -> re.Pattern[str]:
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == escape:
            if index + 1 == len(pattern):
                raise SelectorError(f"LIKE pattern at position {pos} ends with its escape character.", pos)
            parts.append(re.escape(pattern[index + 1]))
            index += 2
            continue
        parts.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
        index += 1
    return re.compile("".join(parts), re.DOTALL)


class _Parser:
    """Recursive descent over the tokens; each method returns the compiled predicate of what it parsed."""

    __slots__ = ("_tokens", "_index")

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._index = 0

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
        while self._peek().is_keyword("OR"):
            self._advance()
            parts.append(self._and(depth))
        return _any(parts)

    def _and(self, depth: int) -> _Pred:
        parts = [self._not(depth)]
        while self._peek().is_keyword("AND"):
            self._advance()
            parts.append(self._not(depth))
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
        fullmatch = _like_regex(pattern.value, escape, pattern.pos).fullmatch

        def like(headers: Mapping[str, str]) -> bool | None:
            raw = headers.get(name)
            return None if raw is None else fullmatch(raw) is not None

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
_REGEX_OPTIONS: Final = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


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


def _document(document: Mapping[str, object]) -> _MatchPred:
    parts: list[_MatchPred] = []
    for key, value in document.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(value, list) or not value:
                raise SelectorError(f"{key} needs a non-empty array of query documents.")
            subs: list[_MatchPred] = []
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    raise SelectorError(f"{key} item {index} is not a query document (a JSON object).")
                subs.append(_document(item))
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
            parts.append(_field(key, value))
    return _match_all(parts)


def _field(name: str, condition: object) -> _MatchPred:
    if not isinstance(condition, dict):
        return _equals(name, condition, "$eq")
    operators = [key for key in condition if key.startswith("$")]
    if operators and len(operators) == len(condition):
        return _operators(name, condition)
    if operators:
        raise SelectorError(f"Condition for header {name!r} mixes operators with plain keys.")
    raise SelectorError(f'Condition for header {name!r} is an object without operators; use one such as {{"$eq": 1}}.')


def _operators(name: str, condition: Mapping[str, object]) -> _MatchPred:
    parts: list[_MatchPred] = []
    for key, operand in condition.items():
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
            parts.append(_regex(name, operand, condition.get("$options", "")))
        elif key == "$options":
            if "$regex" not in condition:
                raise SelectorError(f"$options for header {name!r} needs a $regex beside it.")
        elif key == "$not":
            if not isinstance(operand, dict) or not operand or not all(k.startswith("$") for k in operand):
                raise SelectorError(f'$not for header {name!r} needs an operator document such as {{"$gt": 5}}.')
            parts.append(_match_not(_operators(name, operand)))
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


def _regex(name: str, operand: object, options: object) -> _MatchPred:
    if not isinstance(operand, str):
        raise SelectorError(f"$regex for header {name!r} needs a string pattern.")
    if not isinstance(options, str):
        raise SelectorError(f"$options for header {name!r} needs a string such as \"i\".")
    flags = 0
    for letter in options:
        if letter not in _REGEX_OPTIONS:
            raise SelectorError(f"$options for header {name!r} has unknown option {letter!r}; use i, m, s or x.")
        flags |= _REGEX_OPTIONS[letter]
    try:
        search = re.compile(operand, flags).search
    except (re.error, FutureWarning) as exc:  # FutureWarning is raised only where warnings are errors
        raise SelectorError(f"$regex for header {name!r} is not a valid regular expression: {exc}.") from None

    def regex(headers: Mapping[str, str]) -> bool:
        raw = headers.get(name)
        return raw is not None and search(raw) is not None

    return regex
