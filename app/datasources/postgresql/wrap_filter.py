"""A ``[[wrap]]`` filter (a MongoDB-style query whose keys are column names) compiled to an SQL condition.

Column names are quoted identifiers (never split on dots), and every value is a bound parameter: the text of the
condition depends only on the filter's shape, never on a value. PostgreSQL infers each parameter's type from the
column it is compared with, so a value of the wrong type fails when the statement first runs (the datasource runs
each once at open, and ``SqlCondition.places`` names the filter entry a failing parameter came from).

MongoDB's matching of a missing field is kept where SQL has a NULL for it: ``$ne``, ``$nin``, ``$not`` and ``$nor``
match a NULL column, as MongoDB's match a missing field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from app.datasources.interface import DatasourceError

__all__ = ["SqlCondition", "compile_filter"]

_COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


@dataclass
class SqlCondition:
    """``sql`` with ``params`` bound as ``$start``, ``$start + 1``, ...; ``places[i]`` says which filter entry
    ``params[i]`` came from; ``columns`` are the column names the condition reads."""

    sql: str
    params: list[object] = field(default_factory=list)
    places: list[str] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)


def compile_filter(query: Mapping[str, object], column: Callable[[str], str], start: int) -> SqlCondition:
    """``query`` as SQL; ``column(name)`` is how the statement refers to a column (quoted, qualified by its alias).
    An empty query is ``true``. Anything outside the supported operators is a ``DatasourceError``."""
    builder = _Builder(column, start)
    sql = builder.query(query, "filter")
    return SqlCondition(sql, builder.params, builder.places, builder.columns)


class _Builder:
    def __init__(self, column: Callable[[str], str], start: int) -> None:
        self._column = column
        self._start = start
        self.params: list[object] = []
        self.places: list[str] = []
        self.columns: set[str] = set()

    def bind(self, value: object, where: str) -> str:
        self.params.append(value)
        self.places.append(where)
        return f"${self._start + len(self.params) - 1}"

    def query(self, query: Mapping[str, object], where: str) -> str:
        parts: list[str] = []
        for key, value in query.items():
            path = f"{where}.{key}"
            if key in ("$and", "$or", "$nor"):
                subs = [self.query(_table(sub, path), f"{path}[{i}]") for i, sub in enumerate(_list(value, path))]
                if not subs:
                    raise DatasourceError(f"{path} must be a non-empty array of tables")
                joined = (" AND " if key == "$and" else " OR ").join(f"({s})" for s in subs)
                parts.append(f"({joined}) IS NOT TRUE" if key == "$nor" else joined)
            elif key.startswith("$"):
                raise DatasourceError(f"{path}: {key} is not an operator a PostgreSQL wrap's filter may use here")
            else:
                self.columns.add(key)
                parts.append(self.condition(self._column(key), value, path))
        return " AND ".join(f"({p})" for p in parts) if parts else "true"

    def condition(self, column: str, value: object, where: str) -> str:
        if not isinstance(value, Mapping):
            return self.equals(column, value, where)
        if not value:
            raise DatasourceError(f"{where}: an empty table of operators")
        return " AND ".join(f"({self.operator(column, op, operand, f'{where}.{op}')})" for op, operand in value.items())

    def equals(self, column: str, value: object, where: str) -> str:
        return f"{column} IS NULL" if value is None else f"{column} = {self.bind(value, where)}"

    def operator(self, column: str, operator: object, operand: object, where: str) -> str:
        if operator == "$eq":
            return self.equals(column, operand, where)
        if operator == "$ne":
            return f"{column} IS NOT NULL" if operand is None else f"{column} IS DISTINCT FROM {self.bind(operand, where)}"
        if isinstance(operator, str) and operator in _COMPARISONS:
            return f"{column} {_COMPARISONS[operator]} {self.bind(operand, where)}"
        if operator in ("$in", "$nin"):
            values = _list(operand, where)
            present = [v for v in values if v is not None]
            with_null = len(present) < len(values)
            array = self.bind(present, where)
            if operator == "$in":
                return f"{column} = ANY({array})" + (f" OR {column} IS NULL" if with_null else "")
            # <> ALL is NULL for a NULL column: $nin matches it unless null is among the values
            if with_null:
                return f"{column} IS NOT NULL AND {column} <> ALL({array})"
            return f"{column} IS NULL OR {column} <> ALL({array})"
        if operator == "$exists":
            return f"{column} IS NOT NULL" if operand else f"{column} IS NULL"
        if operator == "$regex":
            if not isinstance(operand, str):
                raise DatasourceError(f"{where} must be a text (a POSIX regular expression)")
            return f"{column} ~ {self.bind(operand, where)}"
        if operator == "$not":
            return f"({self.condition(column, _table(operand, where), where)}) IS NOT TRUE"
        raise DatasourceError(f"{where}: {operator} is not an operator a PostgreSQL wrap's filter may use")


def _list(value: object, where: str) -> Sequence[object]:
    if not isinstance(value, (list, tuple)):
        raise DatasourceError(f"{where} must be an array")
    return value


def _table(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise DatasourceError(f"{where} must be a table")
    return value
