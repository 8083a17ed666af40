"""The README's "Wrapping an existing collection", end to end: documents inserted with pymongo into a collection the
gateway never created, a real gateway configured by a TOML file with a ``[[wrap]]`` table, a stomp.py consumer with
``ack:client-individual``. An ACK deletes the document; an unacked one goes back when its consumer leaves."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo import MongoClient
from pymongo.collection import Collection

from tests.gateway_process import Gateway, start_gateway
from tests.integration.stomppy_helpers import Client, Received, connect

pytestmark = [pytest.mark.mongodb, pytest.mark.timeout(180)]

DESTINATION = "/queue/jobs.video"


def database_url(mongodb_url: str, database: str) -> str:
    base, _, query = mongodb_url.partition("?")
    return f"{base.rstrip('/')}/{database}" + (f"?{query}" if query else "")


@pytest.fixture
def jobs(mongodb_url: str) -> Iterator[tuple[str, Collection[dict[str, object]]]]:
    """A fresh database holding one existing collection: three video jobs and one audio job."""
    database = f"wrap{uuid.uuid4().hex[:10]}"
    client: MongoClient[dict[str, object]] = MongoClient(mongodb_url)
    try:
        collection = client[database]["jobs"]
        collection.insert_many(
            [{"_id": f"v{n}", "kind": "video", "n": n} for n in range(3)] + [{"_id": "a0", "kind": "audio", "n": 9}]
        )
        yield database_url(mongodb_url, database), collection
        client.drop_database(database)
    finally:
        client.close()


@pytest.fixture
def gateway(tmp_path: Path, jobs: tuple[str, Collection[dict[str, object]]]) -> Iterator[Gateway]:
    store, _ = jobs
    config = tmp_path / "stompgate.toml"
    config.write_text(
        f'[stompgate]\nstore = "{store}"\n\n'
        f'[[wrap]]\ndestination = "{DESTINATION}"\ncollection = "jobs"\nfilter = {{ kind = "video" }}\n'
    )
    gw = start_gateway(tmp_path, store, ["--config", str(config), "--poll-interval", "0.1"])
    try:
        yield gw
    finally:
        gw.stop()


def receive(client: Client, count: int) -> list[Received]:
    return [client.get(timeout=20) for _ in range(count)]


def test_documents_are_delivered_as_json_and_an_ack_deletes_them(
    gateway: Gateway, jobs: tuple[str, Collection[dict[str, object]]]
) -> None:
    _, collection = jobs
    consumer = connect(gateway.stomp_port)
    consumer.conn.subscribe(DESTINATION, id="s1", ack="client-individual")
    messages = receive(consumer, 3)
    bodies = {json.loads(m.body)["_id"]: json.loads(m.body) for m in messages}
    assert bodies == {f"v{n}": {"_id": f"v{n}", "kind": "video", "n": n} for n in range(3)}  # no lease fields
    assert all(m.headers["content-type"] == "application/json" for m in messages)
    assert all(m.headers["mongodb-collection"] == "jobs" for m in messages)

    by_id = {json.loads(m.body)["_id"]: m for m in messages}
    for doc_id in ("v0", "v1"):
        receipt = consumer.receipt()
        consumer.ack(by_id[doc_id], receipt=receipt)
        consumer.wait_receipt(receipt)  # the RECEIPT of an ACK comes once the document is deleted
    assert sorted(str(d["_id"]) for d in collection.find({}, {"_id": 1})) == ["a0", "v2"]
    # the audio job does not match the filter: never leased (no _sg_ fields), never delivered
    assert collection.find_one({"_id": "a0"}) == {"_id": "a0", "kind": "audio", "n": 9}
    leased = collection.find_one({"_id": "v2"})
    assert leased is not None and leased["_sg_state"] == "leased"  # delivered, not acked: still there, leased

    consumer.disconnect()  # the unacked document goes back, as any queue message does
    second = connect(gateway.stomp_port)
    second.conn.subscribe(DESTINATION, id="s2", ack="client-individual")
    (again,) = receive(second, 1)
    assert json.loads(again.body)["_id"] == "v2"
    assert again.headers.get("redelivered") == "true"
    receipt = second.receipt()
    second.ack(again, receipt=receipt)
    second.wait_receipt(receipt)
    assert [d["_id"] for d in collection.find({})] == ["a0"]
    second.disconnect()
