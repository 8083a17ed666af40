"""The delivery rules every backend applies, each defined once, with the form each kind of store evaluates next to it.

A backend is storage: it keeps messages, claims them atomically and keeps a log. What a message's state means is
decided here, and nowhere else:

* **claimable**: ready (never claimed, or given back), or claimed with its lease lapsed (``lease_until <= now``); and
  not expired (``expires_at`` unset or ``> now``). An expired message is never delivered and may be deleted.
* **claim order**: priority descending, then the order messages were stored (``seq``); a requeued message keeps its
  place, because neither changes.
* **a claim**: sets the holder and ``lease_until = now + lease_ms``, counts one more delivery, and takes a new lease
  token (a number that grows with every claim and is never reused). ACK and release act only under that token.
* **requeue**: back to ready, keeping its place and its delivery count; the lease token is not reset.
* **dead-letter**: to ``<destination>.DLQ``, ready, its delivery count reset, ``original_destination`` kept from the
  first dead-lettering; when is the broker's decision (``--max-deliveries``), how is this one.
* **gap**: a topic follower that asked for ``after + 1`` and finds the log begins later is told, once, with a ``Gap``.

Memory evaluates the Python forms; SQLite (and the SQL stores that follow) the ``SQL_`` forms; MongoDB the ``mongo_``
forms. The model-based test (``tests/app/datasources/test_model.py``) holds every backend to the Python forms.
"""

from __future__ import annotations

import uuid

from typing import Any

from app.datasources.interface import DatasourceError, Gap

__all__ = [
    "DLQ_SUFFIX",
    "dead_letter_destination",
    "lease_until",
    "expired",
    "claimable",
    "delivery_order",
    "gap_before",
    "topic_trim_every",
    "SQL_NOT_EXPIRED",
    "SQL_CLAIMABLE",
    "SQL_CLAIM_SET",
    "SQL_REQUEUE_SET",
    "SQL_DEAD_LETTER_SET",
    "SQL_CLAIM_ORDER",
    "mongo_claimable",
    "mongo_claim_update",
    "MONGO_REQUEUE_SET",
    "mongo_dead_letter_pipeline",
    "MONGO_CLAIM_ORDER",
]

DLQ_SUFFIX = ".DLQ"


def dead_letter_destination(destination: str) -> str:
    return destination + DLQ_SUFFIX


def wrapped_dead_letter_id(message_id: str) -> str:
    """The id of a wrapped document's or row's copy in its ``.DLQ``: a message of the gateway's own queue, so its id
    must not carry the wrapped prefix (its ACK would be routed to the wrapped collection or table, and delete nothing
    there); and each dead-lettering is a message of its own (a key may be deleted, inserted and dead-lettered again)."""
    return f"dead:{uuid.uuid4().hex}:{message_id}"


def lease_until(now_ms: int, lease_ms: int) -> int:
    return now_ms + lease_ms


def expired(expires_at: int | None, now_ms: int) -> bool:
    return expires_at is not None and expires_at <= now_ms


def claimable(*, leased: bool, lease_until: int, expires_at: int | None, now_ms: int) -> bool:
    return (not leased or lease_until <= now_ms) and not expired(expires_at, now_ms)


def delivery_order(priority: int, seq: int) -> tuple[int, int]:
    """The sort key of claim order: smaller first."""
    return (-priority, seq)


def gap_before(oldest: int | None, after: int) -> Gap | None:
    """The ``Gap`` a follower that has seen ``after`` reports when the log's oldest retained position is ``oldest``
    (None: nothing retained, or nothing trimmed yet). The follower then goes on from ``oldest``."""
    if oldest is None or oldest <= after + 1:
        return None
    return Gap(expected=after + 1, oldest=oldest)


def topic_trim_every(retention: int) -> int:
    """How many publishes a store that keeps its topic log in a table lets pass between trims of it to ``retention``
    messages: a tenth of the window, between 1 and 1,000 (the log holds at least ``retention`` messages)."""
    if retention < 1:
        raise DatasourceError("topic_retention must be at least 1")
    return max(1, min(1000, retention // 10))


# -- SQL forms: a table with columns state (0 ready, 1 leased), owner, lease_until, lease, deliveries, destination,
# original_destination, priority, seq, expires_at. ``{now}`` and the other names in braces are the store's placeholder.

SQL_NOT_EXPIRED = "(expires_at IS NULL OR expires_at > {now})"
SQL_CLAIMABLE = "(state = 0 OR lease_until <= {now}) AND " + SQL_NOT_EXPIRED
SQL_CLAIM_SET = "state = 1, owner = {owner}, lease_until = {lease_until}, deliveries = deliveries + 1, lease = lease + 1"
SQL_REQUEUE_SET = "state = 0, owner = NULL, lease_until = NULL"
SQL_DEAD_LETTER_SET = (
    f"destination = destination || '{DLQ_SUFFIX}', original_destination = coalesce(original_destination, destination), "
    "deliveries = 0, " + SQL_REQUEUE_SET
)
SQL_CLAIM_ORDER = "priority DESC, seq"


# -- MongoDB forms: a document with state ("ready" | "leased"), owner, lease_until, claims (the lease token),
# deliveries, destination, original_destination, priority, seq, and expires_at stored as a large number when unset.

MONGO_CLAIM_ORDER: list[tuple[str, int]] = [("priority", -1), ("seq", 1)]
MONGO_REQUEUE_SET: dict[str, Any] = {"state": "ready", "lease_until": 0, "owner": None}


def mongo_claimable(now_ms: int) -> dict[str, Any]:
    return {
        "expires_at": {"$gt": now_ms},
        "$or": [{"state": "ready"}, {"state": "leased", "lease_until": {"$lte": now_ms}}],
    }


def mongo_claim_update(owner: str, lease_until: int) -> dict[str, Any]:
    return {
        "$set": {"state": "leased", "lease_until": lease_until, "owner": owner},
        "$inc": {"deliveries": 1, "claims": 1},
    }


def mongo_dead_letter_pipeline() -> list[dict[str, Any]]:
    """One pipeline update per document: atomic on MongoDB (FerretDB v1 has no pipeline updates and sets the same
    fields from the document it read, see ``mongodb.queues``)."""
    return [
        {
            "$set": {
                "original_destination": {"$ifNull": ["$original_destination", "$destination"]},
                "destination": {"$concat": ["$destination", DLQ_SUFFIX]},
                "deliveries": 0,
                **MONGO_REQUEUE_SET,
            }
        }
    ]
