"""Tests for app.broker.selectors: table tests per operator and error, plus Hypothesis properties."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.broker.selectors import (
    MAX_SELECTOR_DEPTH,
    MAX_SELECTOR_LENGTH,
    Selector,
    SelectorError,
    compile_selector,
)


def truth(text: str, headers: Mapping[str, str]) -> bool | None:
    """The three-valued result of an SQL-like selector, recovered through NOT: unknown is neither true nor false."""
    if compile_selector(text).matches(headers):
        return True
    if compile_selector(f"NOT ({text})").matches(headers):
        return False
    return None


# --- SQL-like form: operators -----------------------------------------------------------------------------------------

H = {
    "priority": "7",
    "type": "order",
    "price": "12.5",
    "big": "1e3",
    "neg": "-3",
    "word": "abc",
    "flag": "TRUE",
    "off": "False",
}

COMPARISONS = [
    # numeric comparisons read the header as a number
    ("priority = 7", True),
    ("priority = 7.0", True),
    ("priority = 8", False),
    ("priority <> 8", True),
    ("priority != 7", False),
    ("priority > 5", True),
    ("priority > 7", False),
    ("priority >= 7", True),
    ("priority < 10", True),
    ("priority < 7", False),
    ("priority <= 7", True),
    ("price > 12.4", True),
    ("price < 1.25e1", False),
    ("big = 1000", True),
    ("neg < -2", True),
    ("neg = -3", True),
    ("neg > -.5", False),
    ("priority > 10", False),  # numerically, though '7' > '10' as strings
    # string comparisons
    ("type = 'order'", True),
    ("type = 'Order'", False),
    ("type <> 'order'", False),
    ("type < 'p'", True),
    ("type >= 'order'", True),
    ("priority > '10'", True),  # as strings
    ("word = 'it''s'", False),
    # literal on the left is mirrored
    ("5 < priority", True),
    ("7 >= priority", True),
    ("'order' = type", True),
    ("10 <= priority", False),
    # header with header compares strings
    ("type = type", True),
    ("type > word", True),
    ("type <> word", True),
    # booleans
    ("flag = TRUE", True),
    ("flag = false", False),
    ("flag <> FALSE", True),
    ("off = FALSE", True),
    ("off = TRUE", False),
    ("TRUE = flag", True),
    ("TRUE", True),
    ("FALSE", False),
    ("TRUE = TRUE", True),
    ("TRUE <> FALSE", True),
    # literal with literal
    ("1 = 1", True),
    ("1 < 0.5", False),
    ("'a' < 'b'", True),
]


@pytest.mark.parametrize(("text", "expected"), COMPARISONS)
def test_comparisons(text: str, expected: bool) -> None:
    assert truth(text, H) is expected


UNKNOWN = [
    "missing = 1",
    "missing <> 1",
    "missing = 'x'",
    "missing > 'x'",
    "missing = TRUE",
    "word > 5",  # not a number
    "word = 5",
    "word <> 5",
    "type = missing",
    "missing = type",
    "word = TRUE",  # neither true nor false
    "missing LIKE '%'",
    "missing IN ('a')",
    "missing NOT IN ('a')",
    "word IN (1, 2)",
    "word NOT IN (1, 2)",
    "word IN ('x', 1)",
    "missing BETWEEN 1 AND 2",
    "word BETWEEN 1 AND 2",
    "word NOT BETWEEN 1 AND 2",
]


@pytest.mark.parametrize("text", UNKNOWN)
def test_unknown_comparisons(text: str) -> None:
    assert truth(text, H) is None
    assert not compile_selector(text).matches(H)
    assert not compile_selector(f"NOT ({text})").matches(H)
    assert not compile_selector(f"NOT NOT ({text})").matches(H)


PREDICATES = [
    ("type LIKE 'ord%'", True),
    ("type LIKE 'o_der'", True),
    ("type LIKE 'o_er'", False),
    ("type LIKE '%'", True),
    ("type LIKE 'ORD%'", False),
    ("type like '%rde%'", True),
    ("type NOT LIKE 'x%'", True),
    ("type NOT LIKE 'o%'", False),
    ("type IN ('order', 'invoice')", True),
    ("type IN ('invoice')", False),
    ("type NOT IN ('invoice', 'refund')", True),
    ("type NOT IN ('order')", False),
    ("priority IN (1, 7)", True),
    ("priority IN (1, 7.0)", True),
    ("priority IN (1, 2)", False),
    ("priority IN ('7')", True),
    ("priority IN ('x', 7)", True),
    ("type IN ('order', 7)", True),
    ("priority NOT IN (1, 2)", True),
    ("priority BETWEEN 5 AND 7", True),
    ("priority BETWEEN 7 AND 9", True),
    ("priority BETWEEN 8 AND 9", False),
    ("priority NOT BETWEEN 8 AND 9", True),
    ("priority NOT BETWEEN 1 AND 9", False),
    ("type BETWEEN 'a' AND 'p'", True),
    ("6 BETWEEN 5 AND priority", True),
    ("missing IS NULL", True),
    ("type IS NULL", False),
    ("type IS NOT NULL", True),
    ("missing IS NOT NULL", False),
    ("NOT missing IS NULL", False),
]


@pytest.mark.parametrize(("text", "expected"), PREDICATES)
def test_predicates(text: str, expected: bool) -> None:
    assert truth(text, H) is expected


# --- LIKE escaping and quoting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value", "expected"),
    [
        (r"h LIKE '50\%' ESCAPE '\'", "50%", True),
        (r"h LIKE '50\%' ESCAPE '\'", "500", False),
        (r"h LIKE '50\%%' ESCAPE '\'", "50%off", True),
        (r"h LIKE 'a\_b' ESCAPE '\'", "a_b", True),
        (r"h LIKE 'a\_b' ESCAPE '\'", "axb", False),
        (r"h LIKE 'a\\b' ESCAPE '\'", "a\\b", True),
        ("h LIKE 'a!%b' ESCAPE '!'", "a%b", True),
        ("h LIKE 'a!!b' escape '!'", "a!b", True),
        ("h LIKE 'a!xb' ESCAPE '!'", "axb", True),  # an escaped ordinary character is itself
        ("h LIKE 'x%%y' ESCAPE '%'", "x%y", True),  # '%' as the escape character: '%%' is a literal '%'
        ("h LIKE 'x%%y' ESCAPE '%'", "xzy", False),
        (r"h LIKE '50\%'", "50\\anything", True),  # without ESCAPE a backslash is ordinary
        ("h LIKE 'a.c'", "abc", False),  # regex metacharacters are literal
        ("h LIKE 'a.c'", "a.c", True),
        ("h LIKE '(a|b)*'", "(a|b)*", True),
        ("h LIKE 'it''s%'", "it's here", True),
        ("h LIKE '%'", "multi\nline", True),
        ("h LIKE 'a_c'", "a\nc", True),
        ("h LIKE ''", "", True),
        ("h LIKE ''", "x", False),
    ],
)
def test_like(text: str, value: str, expected: bool) -> None:
    assert compile_selector(text).matches({"h": value}) is expected


def test_quoted_identifiers_and_names() -> None:
    headers = {"my header": "1", 'say "hi"': "x", "in": "y", "NOT": "z", "content-type": "text/plain", "a.b_c": "1"}
    assert compile_selector('"my header" = 1').matches(headers)
    assert compile_selector('"say ""hi""" = \'x\'').matches(headers)
    assert compile_selector("\"in\" = 'y' AND \"NOT\" = 'z'").matches(headers)
    assert compile_selector("content-type LIKE 'text/%'").matches(headers)
    assert compile_selector("a.b_c = 1 AND _x IS NULL").matches(headers)
    with pytest.raises(SelectorError):  # an unquoted 'In' is the keyword IN
        compile_selector("In = 'y'")
    # header names are case-sensitive, keywords are not
    assert not compile_selector("Type = 'order'").matches(H)
    assert compile_selector("type = 'order' aNd NoT priority iS nUlL").matches(H)
    assert compile_selector("caf\u00e9 = 'x'").matches({"caf\u00e9": "x"})


def test_whitespace_and_unicode_values() -> None:
    assert compile_selector("\t(a\n=\r'\u00fc')  ").matches({"a": "\u00fc"})
    assert compile_selector("a=1AND b=2".replace("1AND", "1 AND")).matches({"a": "1", "b": "2"})
    assert compile_selector("a<>-5").matches({"a": "1"})


# --- numbers in headers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", True),
        ("+7", True),
        ("7.", True),
        ("7.0", True),
        ("0.7e1", True),
        ("70E-1", True),
        (".7e1", True),
        ("007", True),
        (" 7", None),
        ("7 ", None),
        ("7_0", None),
        ("0x7", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        ("\u0667", None),  # ARABIC-INDIC DIGIT SEVEN is not a plain decimal
        ("6", False),
    ],
)
def test_header_numbers(value: str, expected: bool | None) -> None:
    assert truth("n = 7", {"n": value}) is expected


def test_header_with_more_digits_than_int_accepts() -> None:
    huge = "9" * 5000
    assert truth("n > 1e300", {"n": huge}) is True
    assert compile_selector('{"n": {"$gt": 1}}').matches({"n": huge})


def test_exact_integer_comparison() -> None:
    assert truth("n = 9007199254740993", {"n": "9007199254740993"}) is True
    assert truth("n = 9007199254740992", {"n": "9007199254740993"}) is False


# --- precedence and three-valued logic -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("t = 1 OR t = 0 AND f = 1", True),  # OR(t, AND(t0, f)) -- AND binds tighter
        ("(t = 1 OR t = 0) AND f = 1", False),
        ("f = 1 AND t = 0 OR t = 1", True),
        ("NOT t = 1 AND f = 1", False),  # (NOT t) AND f
        ("NOT t = 0 AND t = 1", True),
        ("NOT f = 1 OR f = 1", True),  # (NOT f) OR f
        ("NOT (f = 1 OR t = 1)", False),
        ("NOT NOT t = 1", True),
        ("t = 1 AND t = 1 AND t = 1 AND f = 1", False),
        ("f = 1 OR f = 1 OR t = 1", True),
        ("((((t = 1))))", True),
        ("t = 1 AND (f = 1 OR (t = 1 AND NOT f = 1))", True),
    ],
)
def test_precedence(text: str, expected: bool) -> None:
    assert truth(text, {"t": "1", "f": "0"}) is expected


# atoms for the three truth values, given the headers {"x": "yes"}
ATOMS = {True: "x = 'yes'", False: "x = 'no'", None: "missing = 'yes'"}
VALUES = [True, False, None]


def kleene_and(a: bool | None, b: bool | None) -> bool | None:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def kleene_or(a: bool | None, b: bool | None) -> bool | None:
    if a is True or b is True:
        return True
    if a is None or b is None:
        return None
    return False


@pytest.mark.parametrize("a", VALUES)
@pytest.mark.parametrize("b", VALUES)
def test_three_valued_truth_tables(a: bool | None, b: bool | None) -> None:
    headers = {"x": "yes"}
    assert truth(f"{ATOMS[a]} AND {ATOMS[b]}", headers) is kleene_and(a, b)
    assert truth(f"{ATOMS[a]} OR {ATOMS[b]}", headers) is kleene_or(a, b)
    assert truth(f"NOT {ATOMS[a]}", headers) is (None if a is None else not a)
    three = f"{ATOMS[a]} AND {ATOMS[b]} AND {ATOMS[a]}"
    assert truth(three, headers) is kleene_and(kleene_and(a, b), a)
    assert truth(f"{ATOMS[a]} OR {ATOMS[b]} OR {ATOMS[b]}", headers) is kleene_or(a, b)


def test_is_null_is_never_unknown() -> None:
    assert truth("missing IS NULL OR missing > 5", {}) is True
    assert truth("NOT (missing > 5)", {}) is None
    assert compile_selector("missing IS NULL OR NOT missing > 5").matches({})
    assert compile_selector("missing IS NULL OR NOT missing > 5").matches({"missing": "3"})
    assert not compile_selector("missing IS NULL OR NOT missing > 5").matches({"missing": "9"})


# --- errors -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "position"),
    [
        ("", "Selector is empty.", 0),
        ("   ", "Selector is empty.", 0),
        ("a = 'abc", "Unterminated string literal starting at position 4.", 4),
        ("a = 'it''s", "Unterminated string literal starting at position 4.", 4),
        ('"abc = 1', "Unterminated quoted identifier starting at position 0.", 0),
        ('"" = 1', "Empty quoted identifier at position 0.", 0),
        ("a == 1", "Unknown operator '==' at position 2.", 2),
        ("a => 1", "Unknown operator '=>' at position 2.", 2),
        ("a && b", "Unknown operator '&&' at position 2.", 2),
        ("a - b", "Unknown operator '-' at position 2.", 2),
        ("a ~ 'x'", "Unknown operator '~' at position 2.", 2),
        ("a = 1 b", "Unexpected 'b' at position 6 after a complete expression.", 6),
        ("a = 1)", "Unexpected ')' at position 5 after a complete expression.", 5),
        ("a = 1 2", "Unexpected '2' at position 6 after a complete expression.", 6),
        ("a = 5abc", "Malformed number starting at position 4.", 4),
        ("a = 1.2.3", "Malformed number starting at position 4.", 4),
        ("a = 1e", "Malformed number starting at position 4.", 4),
        ("a = #", "Unexpected character '#' at position 4.", 4),
        ("a = .", "Unexpected character '.' at position 4.", 4),
        ("a", "Expected a comparison operator after 'a' at position 1 but found the end of the selector.", 1),
        ("'x' AND a = 1", "Expected a comparison operator after \"'x'\" at position 4 but found 'AND'.", 4),
        ("a =", "Expected a header name or a literal at position 3 but found the end of the selector.", 3),
        ("a = NULL", "Expected a header name or a literal at position 4 but found 'NULL'.", 4),
        ("AND a = 1", "Expected a header name or a literal at position 0 but found 'AND'.", 0),
        ("(a = 1", "Expected ')' to close the '(' at position 0 at position 6 but found the end of the selector.", 6),
        ("a NOT = 1", "Expected LIKE, IN or BETWEEN after NOT at position 6 but found '='.", 6),
        ("a IS 1", "Expected NULL after IS at position 5 but found '1'.", 5),
        ("a IS NOT 1", "Expected NULL after IS NOT at position 9 but found '1'.", 9),
        ("'a' IS NULL", "IS NULL at position 4 needs a header name on its left.", 4),
        ("1 LIKE 'x'", "LIKE at position 2 needs a header name on its left.", 2),
        ("1 NOT IN ('x')", "IN at position 6 needs a header name on its left.", 6),
        ("a LIKE b", "Expected a quoted pattern after LIKE at position 7 but found 'b'.", 7),
        (
            "a LIKE 'x' ESCAPE 'ab'",
            "Expected a one-character string after ESCAPE at position 18 but found \"'ab'\".",
            18,
        ),
        ("a LIKE 'x' ESCAPE 1", "Expected a one-character string after ESCAPE at position 18 but found '1'.", 18),
        (r"a LIKE 'x\' ESCAPE '\'", "LIKE pattern at position 7 ends with its escape character.", 7),
        ("a IN 'x'", "Expected '(' after IN at position 5 but found \"'x'\".", 5),
        ("a IN ()", "Expected a string or number literal in the IN list at position 6 but found ')'.", 6),
        ("a IN ('x',)", "Expected a string or number literal in the IN list at position 10 but found ')'.", 10),
        ("a IN (b)", "Expected a string or number literal in the IN list at position 6 but found 'b'.", 6),
        ("a IN ('x' 'y')", "Expected ',' or ')' in the IN list at position 10 but found \"'y'\".", 10),
        ("a IN ('x'", "Expected ',' or ')' in the IN list at position 9 but found the end of the selector.", 9),
        ("a BETWEEN 1 OR 2", "Expected AND between the bounds of BETWEEN at position 12 but found 'OR'.", 12),
        ("a < TRUE", "Operator '<' at position 2 cannot compare TRUE or FALSE; use = or <>.", 2),
        ("FALSE >= a", "Operator '>=' at position 6 cannot compare TRUE or FALSE; use = or <>.", 6),
        ("1 = 'a'", "Operator '=' at position 2 cannot compare a number literal with a string literal.", 2),
        ("TRUE = 1", "Operator '=' at position 5 cannot compare a boolean literal with a number literal.", 5),
        ("'x' BETWEEN 1 AND 2", "BETWEEN at position 4 cannot compare a string literal with a number literal.", 4),
        ("a BETWEEN 1 AND TRUE", "BETWEEN at position 2 cannot compare TRUE or FALSE; use = or <>.", 2),
    ],
)
def test_expression_errors(text: str, message: str, position: int | None) -> None:
    with pytest.raises(SelectorError) as info:
        compile_selector(text)
    assert str(info.value) == message
    assert info.value.position == position
    assert isinstance(info.value, ValueError)


def test_nesting_limits() -> None:
    depth = MAX_SELECTOR_DEPTH
    assert compile_selector("(" * depth + "a = 1" + ")" * depth).matches({"a": "1"})
    assert compile_selector("NOT " * depth + "a = 1").matches({"a": "1"})
    assert compile_selector("NOT (" * (depth // 2) + "a = 1" + ")" * (depth // 2)).matches({"a": "1"})
    with pytest.raises(SelectorError, match=r"^Selector nests more than 32 levels deep at position 32\.$"):
        compile_selector("(" * (depth + 1) + "a = 1" + ")" * (depth + 1))
    with pytest.raises(SelectorError, match=r"nests more than 32 levels deep at position 128\.$"):
        compile_selector("NOT " * (depth + 1) + "a = 1")
    with pytest.raises(SelectorError, match="nests more than 32 levels"):
        compile_selector("NOT (" * (depth // 2) + "NOT a = 1" + ")" * (depth // 2))
    # long flat chains are not nesting
    chain = " AND ".join(f"a{i} IS NULL" for i in range(200))
    assert compile_selector(chain).matches({})


def test_length_limit() -> None:
    text = "a = '" + "x" * (MAX_SELECTOR_LENGTH - 7) + "'"
    assert len(text) == MAX_SELECTOR_LENGTH - 1
    assert compile_selector(text + " ").matches({"a": "x" * (MAX_SELECTOR_LENGTH - 7)})
    with pytest.raises(SelectorError, match=r"^Selector is 4097 characters long, more than the limit of 4096\.$"):
        compile_selector(text + "  ")


# --- the Selector value -----------------------------------------------------------------------------------------------


def test_selector_value() -> None:
    first = compile_selector("a = 1")
    assert first == compile_selector("a = 1")
    assert first != compile_selector("a = 2")
    assert hash(first) == hash(compile_selector("a = 1"))
    assert first.text == "a = 1"
    assert first.native is None
    assert repr(first) == "Selector(text='a = 1', native=None)"
    document = compile_selector(' {"a": {"$gt": "1"}} ')
    assert document.native == {"a": {"$gt": "1"}}
    assert hash(document) == hash(compile_selector(' {"a": {"$gt": "1"}} '))
    with pytest.raises(AttributeError):
        first.text = "b"  # type: ignore[misc]


# --- MongoDB-style query documents ---------------------------------------------------------------------------------


def mongo(document: object, headers: Mapping[str, str]) -> bool:
    return compile_selector(json.dumps(document)).matches(headers)


MONGO = [
    ({}, True),
    ({"type": "order"}, True),
    ({"type": "invoice"}, False),
    ({"priority": 7}, True),
    ({"priority": 7.0}, True),
    ({"priority": "7"}, True),
    ({"priority": "7.0"}, False),
    ({"price": 12.5}, True),
    ({"word": 5}, False),
    ({"missing": "x"}, False),
    ({"missing": None}, True),
    ({"type": None}, False),
    ({"flag": True}, True),
    ({"flag": False}, False),
    ({"off": False}, True),
    ({"word": True}, False),
    ({"missing": True}, False),
    ({"type": "order", "priority": 7}, True),
    ({"type": "order", "priority": 8}, False),
    ({"type": {"$eq": "order"}}, True),
    ({"type": {"$ne": "order"}}, False),
    ({"type": {"$ne": "x"}}, True),
    ({"missing": {"$ne": "x"}}, True),  # MongoDB: $ne matches a missing field
    ({"word": {"$ne": 5}}, True),
    ({"missing": {"$ne": None}}, False),
    ({"type": {"$ne": None}}, True),
    ({"priority": {"$gt": 5}}, True),
    ({"priority": {"$gt": 7}}, False),
    ({"priority": {"$gte": 7}}, True),
    ({"priority": {"$lt": 10}}, True),
    ({"priority": {"$lte": 6.9}}, False),
    ({"priority": {"$gt": 5, "$lt": 10}}, True),
    ({"priority": {"$gt": 5, "$lt": 6}}, False),
    ({"priority": {"$gt": "10"}}, True),  # string operand: string comparison
    ({"type": {"$lt": "p"}}, True),
    ({"type": {"$gte": "p"}}, False),
    ({"word": {"$gt": 1}}, False),
    ({"missing": {"$gt": 1}}, False),
    ({"missing": {"$lt": "z"}}, False),
    ({"type": {"$in": ["order", "invoice"]}}, True),
    ({"type": {"$in": ["invoice"]}}, False),
    ({"type": {"$in": []}}, False),
    ({"priority": {"$in": [1, 7]}}, True),
    ({"priority": {"$in": [1, 2]}}, False),
    ({"word": {"$in": [1, 2]}}, False),
    ({"flag": {"$in": [True]}}, True),
    ({"flag": {"$in": [False, "x"]}}, False),
    ({"missing": {"$in": [None, "x"]}}, True),
    ({"missing": {"$in": ["x"]}}, False),
    ({"type": {"$nin": ["invoice"]}}, True),
    ({"type": {"$nin": ["order"]}}, False),
    ({"missing": {"$nin": ["order"]}}, True),
    ({"type": {"$exists": True}}, True),
    ({"type": {"$exists": False}}, False),
    ({"missing": {"$exists": False}}, True),
    ({"missing": {"$exists": 1}}, False),
    ({"missing": {"$exists": 0}}, True),
    ({"type": {"$regex": "^ord"}}, True),
    ({"type": {"$regex": "rde"}}, True),
    ({"type": {"$regex": "^ORD"}}, False),
    ({"type": {"$regex": "^ORD", "$options": "i"}}, True),
    ({"type": {"$options": "ix", "$regex": "^ O R D"}}, True),
    ({"missing": {"$regex": ".*"}}, False),
    ({"priority": {"$not": {"$gt": 5}}}, False),
    ({"priority": {"$not": {"$gt": 9}}}, True),
    ({"missing": {"$not": {"$gt": 9}}}, True),
    ({"$and": [{"type": "order"}, {"priority": 7}]}, True),
    ({"$and": [{"type": "order"}, {"priority": 8}]}, False),
    ({"$or": [{"type": "x"}, {"priority": 7}]}, True),
    ({"$or": [{"type": "x"}, {"priority": 8}]}, False),
    ({"$nor": [{"type": "x"}, {"priority": 8}]}, True),
    ({"$nor": [{"type": "x"}, {"priority": 7}]}, False),
    ({"$or": [{"$and": [{"type": "order"}, {"missing": None}]}, {"x": 1}], "word": "abc"}, True),
    ({"$and": [{}], "$or": [{}]}, True),
]


@pytest.mark.parametrize(("document", "expected"), MONGO)
def test_query_documents(document: dict[str, object], expected: bool) -> None:
    assert mongo(document, H) is expected


def test_query_document_names_are_not_paths() -> None:
    assert mongo({"a.b": "1", "my header": 2}, {"a.b": "1", "my header": "2"})
    assert not mongo({"a.b": "1"}, {"a": "1"})
    assert compile_selector('{"a": 1e999}').matches({"a": "1e999"})  # inf equals inf


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": ', "Invalid JSON in query document at position 6: Expecting value."),
        ('{"a": 1', "Invalid JSON in query document at position 7: Expecting ',' delimiter."),
        ("{a: 1}", "Invalid JSON in query document at position 1: Expecting property name enclosed in double quotes."),
        ('{"a": 1} x', "Invalid JSON in query document at position 9: Extra data."),
        ('{"a": NaN}', "Query document contains NaN, which is not a valid JSON number."),
        ('{"a": -Infinity}', "Query document contains -Infinity, which is not a valid JSON number."),
        ('{"a": 1, "a": 2}', "Query document repeats the key 'a'."),
        ('{"a": {"$foo": 1}}', "Unknown query operator '$foo' for header 'a'."),
        ('{"$where": "1"}', "Unknown top-level query operator '$where'."),
        ('{"$not": {"a": 1}}', '$not is a field operator; write {"header": {"$not": {...}}} instead.'),
        ('{"$and": []}', "$and needs a non-empty array of query documents."),
        ('{"$or": {"a": 1}}', "$or needs a non-empty array of query documents."),
        ('{"$nor": [{"a": 1}, 2]}', "$nor item 1 is not a query document (a JSON object)."),
        ('{"$and": [{"a": {"$bad": 1}}]}', "Unknown query operator '$bad' for header 'a'."),
        ('{"a": {}}', "Condition for header 'a' is an object without operators; use one such as {\"$eq\": 1}."),
        ('{"a": {"b": 1}}', "Condition for header 'a' is an object without operators; use one such as {\"$eq\": 1}."),
        ('{"a": {"$eq": 1, "b": 1}}', "Condition for header 'a' mixes operators with plain keys."),
        ('{"a": [1]}', "$eq for header 'a' needs a string, number, boolean or null operand."),
        ('{"a": {"$eq": {"$gt": 1}}}', "$eq for header 'a' needs a string, number, boolean or null operand."),
        ('{"a": {"$ne": []}}', "$ne for header 'a' needs a string, number, boolean or null operand."),
        ('{"a": {"$gt": null}}', "$gt for header 'a' needs a number or string operand."),
        ('{"a": {"$lte": true}}', "$lte for header 'a' needs a number or string operand."),
        ('{"a": {"$in": "x"}}', "$in for header 'a' needs an array."),
        ('{"a": {"$nin": [[1]]}}', "$nin for header 'a' accepts only strings, numbers, booleans and null."),
        ('{"a": {"$exists": "yes"}}', "$exists for header 'a' needs true or false."),
        ('{"a": {"$regex": 1}}', "$regex for header 'a' needs a string pattern."),
        ('{"a": {"$regex": "x", "$options": 1}}', "$options for header 'a' needs a string such as \"i\"."),
        (
            '{"a": {"$regex": "x", "$options": "q"}}',
            "$options for header 'a' has unknown option 'q'; use i, m, s or x.",
        ),
        ('{"a": {"$options": "i"}}', "$options for header 'a' needs a $regex beside it."),
        (
            '{"a": {"$regex": "(x"}}',
            "$regex for header 'a' is refused: missing ): (x (patterns run on RE2, which has no backreferences, "
            "lookaround, atomic groups or possessive quantifiers, and limits their size).",
        ),
        ('{"a": {"$not": 5}}', '$not for header \'a\' needs an operator document such as {"$gt": 5}.'),
        ('{"a": {"$not": {}}}', '$not for header \'a\' needs an operator document such as {"$gt": 5}.'),
        ('{"a": {"$not": {"b": 1}}}', '$not for header \'a\' needs an operator document such as {"$gt": 5}.'),
        ('{"a": {"$not": {"$bad": 1}}}', "Unknown query operator '$bad' for header 'a'."),
    ],
)
def test_query_document_errors(text: str, message: str) -> None:
    with pytest.raises(SelectorError) as info:
        compile_selector(text)
    assert str(info.value) == message


def test_query_document_error_positions() -> None:
    with pytest.raises(SelectorError) as info:
        compile_selector('  {"a": ')
    assert info.value.position == 8
    with pytest.raises(SelectorError) as info:
        compile_selector('{"a": {"$foo": 1}}')
    assert info.value.position is None


def test_regex_syntax_is_re2() -> None:
    # "[[a]" is a class of "[" and "a" (Python's re would warn about a possible nested set)
    assert mongo({"a": {"$regex": "^[[a]$"}}, {"a": "["})
    assert not mongo({"a": {"$regex": "^[[a]$"}}, {"a": "]"})
    # \d is ASCII-only, as in MongoDB; $ without "m" is the very end of the value
    assert not mongo({"a": {"$regex": "^\\d$"}}, {"a": "\u0663"})
    assert not mongo({"a": {"$regex": "x$"}}, {"a": "x\n"})
    assert mongo({"a": {"$regex": "x$", "$options": "m"}}, {"a": "x\ny"})
    assert mongo({"a": {"$regex": "x.y", "$options": "s"}}, {"a": "x\ny"})
    assert not mongo({"a": {"$regex": "x.y"}}, {"a": "x\ny"})
    assert mongo({"a": {"$regex": "É", "$options": "i"}}, {"a": "café"})


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("a b  c", "abc", True),
        ("a\\ b", "a b", True),
        ("a[ ]b", "a b", True),
        ("a[] ]b", "a b", True),
        ("a[^] ]b", "a b", False),
        ("a[[:alpha:] ]b", "a b", True),
        ("a\\Q b\\Eb", "a bb", True),
        ("a # a comment\n b", "ab", True),
        ("a#b", "a", True),
        ("a\\#b", "a#b", True),
    ],
)
def test_regex_extended_option(pattern: str, value: str, expected: bool) -> None:
    assert mongo({"a": {"$regex": "^" + pattern + "$", "$options": "x"}}, {"a": value}) is expected


def test_query_document_nesting() -> None:
    def nested(levels: int) -> str:
        # levels of JSON containers: {"$and": [ ... {"a": 1} ... ]}
        text = '{"a": 1}'
        for _ in range((levels - 1) // 2):
            text = '{"$and": [' + text + "]}"
        return text

    assert compile_selector(nested(MAX_SELECTOR_DEPTH - 1)).matches({"a": "1"})
    assert compile_selector('{"a": {"$in": ' + "[" * 1 + '"x"' + "]" * 1 + "}}").matches({"a": "x"})
    with pytest.raises(SelectorError, match=r"^Query document nests more than 32 levels deep at position \d+\.$"):
        compile_selector(nested(MAX_SELECTOR_DEPTH + 3))
    # brackets inside strings (including escaped quotes) do not count
    text = '{"a": "' + '\\"[{' * 40 + '"}'
    assert compile_selector(text).matches({"a": '"[{' * 40})
    # far deeper than Python's recursion limit: refused before json.loads sees it
    with pytest.raises(SelectorError, match=r"nests more than 32 levels deep at position 37\.$"):
        compile_selector('{"a": ' + "[" * 4000)


# --- Hypothesis: reference evaluation --------------------------------------------------------------------------------

NAMES = ["a", "b", "price", "content-type"]
NUMBER_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")

header_values = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["", "abc", "7", "07", "7.0", "1e3", " 5", "true", "FALSE", "x'y", "-0", ".5", "5.", "nan"]),
    st.text(max_size=4),
)
header_dicts = st.dictionaries(st.sampled_from(NAMES), header_values, max_size=len(NAMES))
number_literals = st.one_of(st.integers(-1000, 1000), st.floats(allow_nan=False, allow_infinity=False))
string_literals = st.one_of(st.text(max_size=4), st.sampled_from(["7", "abc", "1e3", ""]))
literals = st.one_of(number_literals, string_literals, st.booleans())
ORDER_OPS = ["<", "<=", ">", ">="]
OPS = ["=", "<>", "!=", *ORDER_OPS]


def render(literal: object) -> str:
    if isinstance(literal, bool):
        return "TRUE" if literal else "FALSE"
    if isinstance(literal, str):
        return "'" + literal.replace("'", "''") + "'"
    return repr(literal)


def plain_number(text: str) -> int | float | None:
    if NUMBER_TEXT.fullmatch(text) is None:
        return None
    if "." in text or "e" in text or "E" in text:
        return float(text)
    return int(text)


def plain_compare(a: Any, op: str, b: Any) -> bool:
    if op == "=":
        return bool(a == b)
    if op in ("<>", "!="):
        return bool(a != b)
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


def reference(raw: str | None, op: str, literal: object) -> bool | None:
    """SQL-like ``header op literal`` evaluated plainly: None stands for unknown."""
    if raw is None:
        return None
    if isinstance(literal, bool):
        if raw.lower() == "true":
            value = True
        elif raw.lower() == "false":
            value = False
        else:
            return None
        return plain_compare(value, op, literal)
    if isinstance(literal, str):
        return plain_compare(raw, op, literal)
    number = plain_number(raw)
    if number is None:
        return None
    return plain_compare(number, op, literal)


MIRROR = {"=": "=", "<>": "<>", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


@given(
    headers=header_dicts,
    name=st.sampled_from(NAMES),
    op=st.sampled_from(OPS),
    literal=literals,
    literal_first=st.booleans(),
    negate=st.booleans(),
)
def test_simple_comparison_matches_reference(
    headers: dict[str, str], name: str, op: str, literal: object, literal_first: bool, negate: bool
) -> None:
    if isinstance(literal, bool) and op in ORDER_OPS:
        op = "="
    if literal_first:
        text = f"{render(literal)} {MIRROR[op]} {name}"
    else:
        text = f"{name} {op} {render(literal)}"
    expected = reference(headers.get(name), op, literal)
    if negate:
        text = f"NOT ({text})"
        expected = None if expected is None else not expected
    assert compile_selector(text).matches(headers) is (expected is True)


@given(
    headers=header_dicts,
    name=st.sampled_from(NAMES),
    items=st.lists(st.one_of(number_literals, string_literals), min_size=1, max_size=4),
    negate=st.booleans(),
)
def test_in_matches_reference(headers: dict[str, str], name: str, items: list[object], negate: bool) -> None:
    results = [reference(headers.get(name), "=", item) for item in items]
    expected: bool | None = True if True in results else None if None in results else False
    text = f"{name} {'NOT ' if negate else ''}IN ({', '.join(render(item) for item in items)})"
    if negate:
        expected = None if expected is None else not expected
    assert compile_selector(text).matches(headers) is (expected is True)


@given(headers=header_dicts, name=st.sampled_from(NAMES), low=number_literals, high=number_literals)
def test_between_matches_reference(headers: dict[str, str], name: str, low: float, high: float) -> None:
    first, second = reference(headers.get(name), ">=", low), reference(headers.get(name), "<=", high)
    expected = first is True and second is True
    assert compile_selector(f"{name} BETWEEN {render(low)} AND {render(high)}").matches(headers) is expected


def plain_like(value: str, pattern: str, escape: str | None) -> bool:
    items: list[str | None] = []  # a literal character, "%" as None for any run, "" for any one character
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == escape:
            items.append(pattern[index + 1])
            index += 2
        else:
            items.append(None if char == "%" else "" if char == "_" else char)
            index += 1

    def match(i: int, j: int) -> bool:
        if i == len(items):
            return j == len(value)
        item = items[i]
        if item is None:
            return any(match(i + 1, k) for k in range(j, len(value) + 1))
        if j == len(value):
            return False
        return (item == "" or item == value[j]) and match(i + 1, j + 1)

    return match(0, 0)


@given(
    value=st.text(alphabet="ab%_!\n", max_size=6),
    pattern=st.text(alphabet="ab%_!", max_size=6),
    use_escape=st.booleans(),
)
def test_like_matches_reference(value: str, pattern: str, use_escape: bool) -> None:
    escape = "!" if use_escape else None
    text = f"h LIKE {render(pattern)}" + (" ESCAPE '!'" if use_escape else "")
    if escape is not None and re.search(r"(^|[^!])(!!)*!$", pattern):
        with pytest.raises(SelectorError, match="ends with its escape character"):
            compile_selector(text)
        return
    assert compile_selector(text).matches({"h": value}) is plain_like(value, pattern, escape)


MONGO_ORDER = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


@given(
    headers=header_dicts,
    name=st.sampled_from(NAMES),
    op=st.sampled_from(["$eq", "$ne", *MONGO_ORDER]),
    operand=st.one_of(number_literals, string_literals),
)
def test_query_document_matches_reference(headers: dict[str, str], name: str, op: str, operand: object) -> None:
    raw = headers.get(name)
    if op in ("$eq", "$ne"):
        if raw is None:
            equal = False
        elif isinstance(operand, str):
            equal = raw == operand
        else:
            equal = plain_number(raw) == operand
        expected = equal if op == "$eq" else not equal
    else:
        found = reference(raw, MONGO_ORDER[op], operand)
        expected = found is True
    assert mongo({name: {op: operand}}, headers) is expected
    if op == "$eq":
        assert mongo({name: operand}, headers) is expected


# --- Hypothesis: robustness ------------------------------------------------------------------------------------------

TOKENS = [
    "a", "b", "price", '"x y"', "'x'", "'%'", "''", "'it''s'", "5", "-2.5", "1e3", ".5", "TRUE", "false", "NULL",
    "=", "<>", "!=", "<", "<=", ">", ">=", "==", "AND", "OR", "NOT", "(", ")", ",", "LIKE", "ESCAPE", "'!'", "IN",
    "BETWEEN", "IS", "'", '"', "-", "#", "{", "}",
]
token_soup = st.lists(st.sampled_from(TOKENS), max_size=14).map(" ".join)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["x", "7", "^a", "(", "abc"]),
)
json_keys = st.sampled_from(
    ["a", "b", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$regex", "$options", "$not",
     "$and", "$or", "$nor", "$bad", "i"]
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(json_keys, children, max_size=3)),
    max_leaves=12,
)
json_documents = st.dictionaries(json_keys, json_values, max_size=3).map(json.dumps)


def compiles_or_selector_error(text: str) -> Selector | None:
    try:
        return compile_selector(text)
    except SelectorError as exc:
        assert str(exc).endswith(".")
        assert exc.position is None or 0 <= exc.position <= len(text)
        return None


@settings(max_examples=300)
@given(
    text=st.one_of(st.text(max_size=40), token_soup, json_documents, st.text(max_size=40).map(lambda t: "{" + t)),
    headers=header_dicts,
)
def test_any_text_compiles_or_raises_selector_error(text: str, headers: dict[str, str]) -> None:
    selector = compiles_or_selector_error(text)
    if selector is not None:
        assert selector.matches(headers) in (True, False)


VALID_SELECTORS = [
    "a = 1 OR b <> 'x' AND NOT price > 2.5",
    "a LIKE '%x_' OR b NOT LIKE 'a!%' ESCAPE '!'",
    "a IN ('x', 1, -2.5) AND b NOT IN (3) OR price BETWEEN a AND b",
    "a IS NULL OR b IS NOT NULL OR a = b OR a = TRUE OR NOT (b < price)",
    "content-type = 'text/plain' OR price NOT BETWEEN 1 AND 'z'",
    '{"a": {"$in": [1, "x", null, true], "$nin": [2]}, '
    '"$or": [{"b": {"$regex": "^x", "$options": "is"}}, {"price": {"$gt": 1}}]}',
    '{"$nor": [{"a": {"$not": {"$lte": "m"}}}], "b": {"$exists": true, "$ne": false}, "price": 2.5}',
]


@pytest.mark.parametrize("text", VALID_SELECTORS)
@given(headers=st.dictionaries(st.sampled_from(NAMES), st.text(), max_size=4))
def test_matches_never_raises(text: str, headers: dict[str, str]) -> None:
    assert compile_selector(text).matches(headers) in (True, False)
