"""Selector scans in claim order, shared by the backends that evaluate a Python selector while they claim.

A subscription with a selector holds a ``ScanMark``; each claim examines at most ``SCAN_BUDGET`` messages after it
(``scan_in_order``) and the backend's ``ScanBook`` says when a mark went stale (a requeue, or a put that sorts before
it), so a deep backlog that does not match costs a bounded amount per claim and a match is never passed over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.datasources.interface import ScanMark

__all__ = ["ScanBook", "Scan", "scan_in_order"]

T = TypeVar("T")


class _Book:
    __slots__ = ("epoch", "puts", "last_put")

    def __init__(self) -> None:
        self.epoch = 0  # bumped by every requeue: a message back at its old place may sort before a mark
        self.puts = 0  # counts puts
        self.last_put = [0] * 10  # by priority: the put count of the latest put of that priority


class ScanBook:
    """What makes a :class:`ScanMark` stale, per destination: a requeue (the message returns to its old place in
    the order) and a put of a higher priority than the mark's (it sorts before the mark). A backend whose claims
    evaluate a Python selector keeps one, and calls it in the same serialized step as its writes and claims."""

    def __init__(self, *, same_priority_puts_stale: bool = False) -> None:
        self._books: dict[str, _Book] = {}
        # Where messages can become visible out of seq order (PostgreSQL: seq is taken at insert, visible at
        # commit), a put of the mark's own priority may sort before the mark too.
        self._from = 0 if same_priority_puts_stale else 1

    def _book(self, destination: str) -> _Book:
        book = self._books.get(destination)
        if book is None:
            book = self._books[destination] = _Book()
        return book

    # A put or requeue matters only to a destination some scan has recorded a mark on (``record`` makes its book):
    # the others keep no book, so puts to any number of destination names cost no memory here.
    def put(self, destination: str, priority: int) -> None:
        book = self._books.get(destination)
        if book is not None:
            book.puts += 1
            book.last_put[max(0, min(priority, 9))] = book.puts

    def requeue(self, destination: str) -> None:
        book = self._books.get(destination)
        if book is not None:
            book.epoch += 1

    def requeue_all(self) -> None:
        """Any destination may have had messages put back (a rolled-back batch of claims)."""
        for book in self._books.values():
            book.epoch += 1

    def resume_after(self, destination: str, mark: ScanMark) -> tuple[int, int] | None:
        """Where a claim with ``mark`` starts: after ``mark.after`` while nothing made it stale, else the beginning."""
        if mark.after is None:
            return None
        book = self._book(destination)
        epoch, puts = mark.version
        if epoch != book.epoch or any(last > puts for last in book.last_put[mark.after[0] + self._from :]):
            return None
        return mark.after

    def record(self, destination: str, mark: ScanMark, last: tuple[int, int] | None, more: bool) -> None:
        """After a scan that examined up to ``last`` (None: nothing at all)."""
        book = self._book(destination)
        mark.after = last
        mark.version = (book.epoch, book.puts)
        mark.more = more


@dataclass(slots=True)
class Scan(Generic[T]):
    """What one scan found: the items taken (in claim order), the last ``(priority, seq)`` examined, and whether it
    stopped at its budget before the end of the backlog."""

    chosen: list[T] = field(default_factory=list)
    last: tuple[int, int] | None = None
    more: bool = False


def scan_in_order(
    rows: Iterable[tuple[int, int, T]],
    matches: Callable[[T], bool],
    *,
    want: int,
    budget: int | None,
    after: tuple[int, int] | None = None,
) -> Scan[T]:
    """Walk ``rows`` (``(priority, seq, item)`` in claim order, starting after ``after``) and take the items
    ``matches`` accepts, until ``want`` are taken, the rows end, or ``budget`` rows were examined (None: no budget).
    It stops at the last item taken, so the mark it leaves never passes a match left unclaimed."""
    scan: Scan[T] = Scan(last=after)
    examined = 0
    for priority, seq, item in rows:
        if budget is not None and examined >= budget:
            scan.more = True
            break
        examined += 1
        scan.last = (priority, seq)
        if matches(item):
            scan.chosen.append(item)
            if len(scan.chosen) == want:
                break
    return scan
