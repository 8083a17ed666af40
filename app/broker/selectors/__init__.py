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
evaluate it itself only when the database's answer is this package's for every message (string comparisons; see
``documents._database_agrees``): one selector means the same on every store, for queues and topics alike.
"""


from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from app.broker.selectors.documents import compile_document
from app.broker.selectors.shared import (
    MAX_SELECTOR_COST,
    MAX_SELECTOR_DEPTH,
    MAX_SELECTOR_LENGTH,
    MAX_SELECTOR_NODES,
    MAX_SELECTOR_REGEXES,
    Budget,
    Pred,
    SelectorError,
)
from app.broker.selectors.sql import compile_sql

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


@dataclass(frozen=True, slots=True)
class Selector:
    """A compiled selector. Two selectors are equal when their texts are."""

    text: str
    native: Mapping[str, object] | None = field(compare=False)  # the parsed query document (form 2), else None
    _predicate: Pred = field(repr=False, compare=False)

    def matches(self, headers: Mapping[str, str]) -> bool:
        """Whether a message with these headers should be delivered (the selector is true, not false or unknown)."""
        return self._predicate(headers) is True


def compile_selector(text: str) -> Selector:
    """Compile selector text (either form, see the package documentation); raises :class:`SelectorError`."""
    if len(text) > MAX_SELECTOR_LENGTH:
        raise SelectorError(f"Selector is {len(text)} characters long, more than the limit of {MAX_SELECTOR_LENGTH}.")
    stripped = text.strip()
    if not stripped:
        raise SelectorError("Selector is empty.", 0)
    budget = Budget()
    if stripped.startswith("{"):
        predicate, native = compile_document(text, budget)
        return Selector(text, native, predicate)
    return Selector(text, None, compile_sql(text, budget))
