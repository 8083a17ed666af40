"""The shared delivery rules: each store's form of a rule says what the Python form says.

The SQL forms are checked here on SQLite over every combination of the values that matter; the MongoDB forms run in
the contract and model-based tests against a server (FerretDB in CI).
"""

from __future__ import annotations

import itertools
import sqlite3

import pytest

from app.datasources import rules
from app.datasources.interface import Gap
from app.datasources.scanning import scan_in_order

NOW = 1_000
TIMES = (None, NOW - 1, NOW, NOW + 1)


@pytest.fixture
def table() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute(
        "CREATE TABLE m (seq INTEGER PRIMARY KEY, state INTEGER, owner TEXT, lease_until INTEGER, lease INTEGER, "
        "deliveries INTEGER, destination TEXT, original_destination TEXT, priority INTEGER, expires_at INTEGER)"
    )
    return conn


def test_sql_claimable_is_the_rule(table: sqlite3.Connection) -> None:
    cases = list(itertools.product((0, 1), (NOW - 1, NOW, NOW + 1), TIMES))
    for state, lease_until, expires_at in cases:
        table.execute(
            "INSERT INTO m (state, lease_until, expires_at, lease, deliveries, destination, priority) "
            "VALUES (?, ?, ?, 0, 0, '/queue/a', 4)",
            (state, lease_until, expires_at),
        )
    sql = f"SELECT state, lease_until, expires_at, {rules.SQL_CLAIMABLE.format(now='?')} FROM m ORDER BY seq"
    rows = table.execute(sql, (NOW, NOW)).fetchall()
    assert len(rows) == len(cases)
    for state, lease_until, expires_at, claimable in rows:
        expected = rules.claimable(leased=state == 1, lease_until=lease_until, expires_at=expires_at, now_ms=NOW)
        assert bool(claimable) is expected, (state, lease_until, expires_at)


def test_sql_claim_requeue_and_dead_letter_change_what_the_rules_say(table: sqlite3.Connection) -> None:
    table.execute(
        "INSERT INTO m (state, lease, deliveries, destination, priority) VALUES (0, 7, 2, '/queue/a', 4)"
    )
    claim = rules.SQL_CLAIM_SET.format(owner="?", lease_until="?")
    table.execute(f"UPDATE m SET {claim}", ("gw-1", rules.lease_until(NOW, 500)))
    assert table.execute("SELECT state, owner, lease_until, lease, deliveries FROM m").fetchone() == (
        1, "gw-1", NOW + 500, 8, 3,
    )
    table.execute(f"UPDATE m SET {rules.SQL_REQUEUE_SET}")
    # requeue keeps the delivery count and never reuses a lease token
    assert table.execute("SELECT state, owner, lease_until, lease, deliveries FROM m").fetchone() == (0, None, None, 8, 3)
    table.execute(f"UPDATE m SET {rules.SQL_DEAD_LETTER_SET}")
    table.execute(f"UPDATE m SET {rules.SQL_DEAD_LETTER_SET}")  # dead-lettered again: the first origin stays
    assert table.execute("SELECT state, destination, original_destination, deliveries FROM m").fetchone() == (
        0, rules.dead_letter_destination(rules.dead_letter_destination("/queue/a")), "/queue/a", 0,
    )


def test_claim_order_is_priority_then_arrival(table: sqlite3.Connection) -> None:
    for priority in (4, 9, 4, 0, 9):
        table.execute("INSERT INTO m (state, priority, destination) VALUES (0, ?, '/queue/a')", (priority,))
    by_sql = table.execute(f"SELECT priority, seq FROM m ORDER BY {rules.SQL_CLAIM_ORDER}").fetchall()
    assert by_sql == sorted(by_sql, key=lambda row: rules.delivery_order(*row))
    assert [row[0] for row in by_sql] == [9, 9, 4, 4, 0]


def test_a_gap_is_reported_only_when_the_log_begins_after_the_next_position() -> None:
    assert rules.gap_before(None, 10) is None
    assert rules.gap_before(11, 10) is None
    assert rules.gap_before(5, 10) is None
    assert rules.gap_before(14, 10) == Gap(expected=11, oldest=14)


def test_a_scan_stops_at_its_budget_and_never_passes_a_match_it_left() -> None:
    rows = [(4, seq, seq) for seq in range(1, 11)]
    found = scan_in_order(rows, lambda seq: seq % 3 == 0, want=2, budget=None)
    assert (found.chosen, found.last, found.more) == ([3, 6], (4, 6), False)  # stops at the second match
    found = scan_in_order(rows, lambda seq: seq > 8, want=5, budget=4)
    assert (found.chosen, found.last, found.more) == ([], (4, 4), True)
    found = scan_in_order([], lambda seq: True, want=1, budget=4, after=(4, 7))
    assert (found.chosen, found.last, found.more) == ([], (4, 7), False)  # nothing examined: the mark stays
