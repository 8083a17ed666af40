"""Selectors come from clients, so what one costs to compile and to evaluate must be bounded (hardening item 11).

The pathological cases below took seconds to minutes on Python's backtracking ``re``; they are correctness tests run
under a generous limit (a pytest-timeout marker, and a measured bound far above what a linear-time matcher needs), not
benchmarks.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.broker import selectors
from app.broker.selectors import SelectorError, compile_selector

# Far above the microseconds a linear-time matcher needs, far below what the backtracking engine took.
GENEROUS_S = 1.0


def timed_matches(text: str, headers: dict[str, str]) -> tuple[bool, float]:
    selector = compile_selector(text)
    start = time.perf_counter()
    result = selector.matches(headers)
    return result, time.perf_counter() - start


# --- pathological patterns -------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_nested_quantifier_regex_is_linear() -> None:
    text = json.dumps({"h": {"$regex": "(a+)+$"}})
    result, elapsed = timed_matches(text, {"h": "a" * 30 + "!"})
    assert result is False
    assert elapsed < GENEROUS_S
    assert compile_selector(text).matches({"h": "b" + "a" * 30})


@pytest.mark.timeout(10)
def test_many_wildcard_like_is_linear() -> None:
    text = "h LIKE '%a%a%a%a%a%a%a%a%b'"
    result, elapsed = timed_matches(text, {"h": "a" * 5000})
    assert result is False
    assert elapsed < GENEROUS_S
    assert compile_selector(text).matches({"h": "a" * 5000 + "b"})
    result, elapsed = timed_matches("h NOT LIKE '%a%a%a%a%a%a%a%a%b'", {"h": "a" * 5000})
    assert result is True
    assert elapsed < GENEROUS_S


@pytest.mark.timeout(10)
def test_like_with_single_wildcards_is_linear() -> None:
    text = "h LIKE '%a_a_a_a_a_a_a_a_b%'"
    result, elapsed = timed_matches(text, {"h": "a" * 5000})
    assert result is False
    assert elapsed < GENEROUS_S
    assert compile_selector(text).matches({"h": "a" * 5000 + "ax" * 8 + "b"})
    assert compile_selector(text).matches({"h": "ab" * 8 + "b" + "a" * 5000})


def test_selector_module_no_longer_uses_backtracking_re_on_client_patterns() -> None:
    # The package keeps ``re`` only for its own fixed token patterns; nothing client-supplied reaches re.compile.
    source = "".join(path.read_text(encoding="utf-8") for path in Path(selectors.__file__).parent.glob("*.py"))
    compiled = re.findall(r"re\.compile\(([^)]*)\)", source)
    assert compiled, "expected the module's own token patterns"
    assert all(argument.startswith('r"') for argument in compiled), compiled
    assert "re.escape" not in source


# --- refused regexes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [r"(a)\1", r"(?P<x>a)(?P=x)", r"a(?=b)", r"a(?!b)", r"(?<=a)b", r"(?<!a)b", r"(?>a+)b", r"a++"],
)
def test_regex_features_without_linear_match_are_refused(pattern: str) -> None:
    with pytest.raises(SelectorError, match=r"^\$regex for header 'h' is refused: .*RE2.*\.$"):
        compile_selector(json.dumps({"h": {"$regex": pattern}}))


def test_regex_that_is_not_valid_unicode_is_refused() -> None:
    with pytest.raises(SelectorError, match="is not valid Unicode"):
        compile_selector('{"h": {"$regex": "\\ud800"}}')


def test_regex_on_a_value_that_is_not_valid_unicode_does_not_raise() -> None:
    selector = compile_selector('{"h": {"$regex": "^a"}}')
    assert selector.matches({"h": "a\ud800"})
    assert not selector.matches({"h": "\ud800a"})


def test_regex_program_that_is_too_large_is_refused() -> None:
    with pytest.raises(SelectorError, match=r"^\$regex for header 'h' is refused: "):
        compile_selector(json.dumps({"h": {"$regex": r"(\pL{50}){20}"}}))


# --- size limits -----------------------------------------------------------------------------------------------------


def test_too_many_conditions_are_refused() -> None:
    fits = " OR ".join(f"a{i} = 1" for i in range(selectors.MAX_SELECTOR_NODES - 1))  # conditions plus one OR
    assert compile_selector(fits).matches({"a7": "1"})
    too_many = " OR ".join(f"a{i} = 1" for i in range(selectors.MAX_SELECTOR_NODES))
    with pytest.raises(SelectorError, match=rf"more than {selectors.MAX_SELECTOR_NODES} conditions and operators"):
        compile_selector(too_many)
    document = json.dumps({"$or": [{f"a{i}": 1} for i in range(selectors.MAX_SELECTOR_NODES)]})
    with pytest.raises(SelectorError, match=rf"more than {selectors.MAX_SELECTOR_NODES} conditions and operators"):
        compile_selector(document)


def test_too_many_regexes_are_refused() -> None:
    def document(count: int) -> str:
        return json.dumps({"$or": [{f"a{i}": {"$regex": f"^x{i}"}} for i in range(count)]})

    assert compile_selector(document(selectors.MAX_SELECTOR_REGEXES)).matches({"a3": "x3y"})
    with pytest.raises(SelectorError, match=rf"more than {selectors.MAX_SELECTOR_REGEXES} \$regex"):
        compile_selector(document(selectors.MAX_SELECTOR_REGEXES + 1))


def test_too_costly_regexes_are_refused() -> None:
    # each of these compiles on its own, but together they would need too many steps per character of a header
    pattern = "([ab]{1,10}){1,25}c"
    assert compile_selector(json.dumps({"h": {"$regex": pattern}})).matches({"h": "abc"})
    document = json.dumps({"$or": [{f"a{i}": {"$regex": pattern}} for i in range(selectors.MAX_SELECTOR_REGEXES)]})
    with pytest.raises(SelectorError, match=rf"more than the limit of {selectors.MAX_SELECTOR_COST}"):
        compile_selector(document)


def test_too_costly_likes_are_refused() -> None:
    one = "h{i} LIKE '%a_b%'"
    many = " OR ".join(one.format(i=i) for i in range(selectors.MAX_SELECTOR_NODES // 2 - 1))
    with pytest.raises(SelectorError, match=rf"more than the limit of {selectors.MAX_SELECTOR_COST}"):
        compile_selector(many)
    # patterns whose pieces are found by a plain substring search cost nothing against that limit
    plain = " OR ".join(f"h{i} LIKE '%ab%c'" for i in range(selectors.MAX_SELECTOR_NODES // 2 - 1))
    assert compile_selector(plain).matches({"h3": "xxabyc"})


# --- LIKE: the linear matcher agrees with the old regex translation -----------------------------------------------


def old_like_regex(pattern: str, escape: str | None) -> re.Pattern[str]:
    """The translation selectors.py used before: LIKE to a Python regex (a backtracking engine)."""
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == escape:
            parts.append(re.escape(pattern[index + 1]))
            index += 2
            continue
        parts.append(".*" if char == "%" else "." if char == "_" else re.escape(char))
        index += 1
    return re.compile("".join(parts), re.DOTALL)


def ends_with_escape(pattern: str, escape: str) -> bool:
    index = 0
    while index < len(pattern):
        if pattern[index] == escape:
            if index + 1 == len(pattern):
                return True
            index += 2
        else:
            index += 1
    return False


@given(
    pattern=st.text(alphabet="ab%_", max_size=9),
    value=st.text(alphabet="ab%_\n", max_size=12),
    escape=st.sampled_from([None, "%", "_", "a", "\\"]),
)
def test_like_agrees_with_old_regex_translation(pattern: str, value: str, escape: str | None) -> None:
    text = f"h LIKE '{pattern}'" + ("" if escape is None else f" ESCAPE '{escape}'")
    if escape is not None and ends_with_escape(pattern, escape):
        with pytest.raises(SelectorError, match="ends with its escape character"):
            compile_selector(text)
        return
    expected = old_like_regex(pattern, escape).fullmatch(value) is not None
    assert compile_selector(text).matches({"h": value}) is expected


def test_a_document_with_a_regex_is_never_handed_to_the_database() -> None:
    assert compile_selector('{"a": {"$gt": "1"}}').native == {"a": {"$gt": "1"}}
    cases = {'{"a": {"$regex": "^x"}}': True, '{"$or": [{"b": 1}, {"a": {"$not": {"$regex": "^x"}}}]}': False}
    for text, expected in cases.items():
        selector = compile_selector(text)
        assert selector.native is None  # evaluated on RE2 by the gateway, not on the database's backtracking engine
        assert selector.matches({"a": "xyz", "b": "2"}) is expected


def test_only_documents_the_database_evaluates_the_same_way_are_handed_to_it() -> None:
    """Headers are stored as strings: MongoDB's {"amount": {"$gt": 10}} matched nothing, $ne matched no message
    missing the header, while this module says otherwise. Those are evaluated by the gateway."""
    handed_over = ['{"region": "eu"}', '{"region": {"$in": ["eu", "us"]}, "tier": {"$gte": "b"}}',
                   '{"$or": [{"a": "1"}, {"b": {"$exists": true}}]}']  # fmt: skip
    kept_here = ['{"amount": {"$gt": 10}}', '{"a": {"$ne": "x"}}', '{"a": {"$exists": false}}', '{"a": true}',
                 '{"a": null}', '{"a": {"$nin": ["x"]}}', '{"$and": [{"a": "1"}, {"n": 2}]}']  # fmt: skip
    for text in handed_over:
        assert compile_selector(text).native is not None, text
    for text in kept_here:
        assert compile_selector(text).native is None, text
    assert compile_selector('{"amount": {"$gt": 10}}').matches({"amount": "20"})
