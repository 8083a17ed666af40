"""ScanBook keeps what makes a selector's scan mark stale only for destinations a scan has looked at: puts to any
other destination (a client may send to millions of names, and on PostgreSQL every gateway hears of every put) cost
no memory."""

from __future__ import annotations

from app.datasources.interface import ScanMark
from app.datasources.scanning import ScanBook


def test_puts_and_requeues_elsewhere_keep_no_book() -> None:
    book = ScanBook()
    for n in range(1000):
        book.put(f"/queue/q{n}", 4)
        book.requeue(f"/queue/r{n}")
    assert book._books == {}


def test_a_scanned_destination_still_sees_what_makes_its_mark_stale() -> None:
    book = ScanBook()
    mark = ScanMark()
    assert book.resume_after("/queue/a", mark) is None
    book.record("/queue/a", mark, (4, 10), more=False)
    assert book.resume_after("/queue/a", mark) == (4, 10)
    book.put("/queue/a", 3)  # sorts after the mark
    assert book.resume_after("/queue/a", mark) == (4, 10)
    book.put("/queue/a", 5)  # sorts before it
    assert book.resume_after("/queue/a", mark) is None
    book.record("/queue/a", mark, (4, 10), more=False)
    book.requeue("/queue/a")
    assert book.resume_after("/queue/a", mark) is None
