"""The MongoDB-style query document form: loading the JSON safely, compiling each operator, RE2 regexes, and the
rule for when a database may evaluate a document itself. The language is documented in the package docstring."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Mapping
from typing import Final, NoReturn, Protocol, cast

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

from app.broker.selectors.shared import (
    MAX_SELECTOR_DEPTH,
    REGEX_MEMORY,
    Budget,
    Compare,
    Pred,
    SelectorError,
    to_bool,
    to_number,
)

__all__ = ["compile_document"]

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


# --- MongoDB-style query documents -----------------------------------------------------------------------------------

_MatchPred = Callable[[Mapping[str, str]], bool]
_MONGO_ORDERING: Final[dict[str, Compare]] = {
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


def _document(document: Mapping[str, object], budget: Budget) -> _MatchPred:
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


def _field(name: str, condition: object, budget: Budget) -> _MatchPred:
    if not isinstance(condition, dict):
        budget.node()
        return _equals(name, condition, "$eq")
    operators = [key for key in condition if key.startswith("$")]
    if operators and len(operators) == len(condition):
        return _operators(name, condition, budget)
    if operators:
        raise SelectorError(f"Condition for header {name!r} mixes operators with plain keys.")
    raise SelectorError(f'Condition for header {name!r} is an object without operators; use one such as {{"$eq": 1}}.')


def _operators(name: str, condition: Mapping[str, object], budget: Budget) -> _MatchPred:
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
            return raw is not None and to_bool(raw) is wanted

        return boolean
    if isinstance(operand, int | float):
        number = operand

        def numeric(headers: Mapping[str, str]) -> bool:
            raw = headers.get(name)
            return raw is not None and to_number(raw) == number

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
            number = None if raw is None else to_number(raw)
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
        if frozen_flags and to_bool(raw) in frozen_flags:
            return True
        return bool(frozen_numbers) and to_number(raw) in frozen_numbers

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


def _regex(name: str, operand: object, options: object, budget: Budget) -> _MatchPred:
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
    settings.max_mem = REGEX_MEMORY
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


def compile_document(text: str, budget: Budget) -> tuple[Pred, Mapping[str, object] | None]:
    """Compile a MongoDB-style query document: its predicate, and the parsed document when a database may
    evaluate it instead (``_database_agrees``), else None."""
    document = _load_document(text)
    return _document(document, budget), (document if _database_agrees(document) else None)
