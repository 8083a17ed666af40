from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.gateway_process import Gateway, run_gateway
from tests.raw_stomp import RawClient


GATEWAY_ARGS = ["--heartbeat-ms", "1000", "--lease-ms", "5000"]

# The STOMP behaviour suites (test_tcp_raw, test_stomppy) run on every SQL store, and on Redis: they take ``gateway``
# over these.
SQL_STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql), pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One real gateway process on the embedded SQLite store, shared by a module's tests."""
    tmp: Path = tmp_path_factory.mktemp("gateway")
    with run_gateway(tmp, extra=GATEWAY_ARGS) as gw:
        yield gw


def gateway_on(store: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A module's gateway on ``store`` ("sqlite"; "postgresql" or "redis": the session's server, a namespace of its
    own)."""
    tmp: Path = tmp_path_factory.mktemp("gateway")
    if store in ("postgresql", "redis"):
        url = request.getfixturevalue(f"{store}_url")
        extra = [*GATEWAY_ARGS, "--namespace", f"g{uuid.uuid4().hex[:12]}"]
        with run_gateway(tmp, url, extra=extra) as gw:
            yield gw
    else:
        with run_gateway(tmp, extra=GATEWAY_ARGS) as gw:
            yield gw


@pytest.fixture
def raw(gateway: Gateway) -> Iterator[Callable[[], RawClient]]:
    """Make raw socket clients to the module's gateway; all are closed after the test."""
    clients: list[RawClient] = []

    def make() -> RawClient:
        client = RawClient(gateway.stomp_port)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(autouse=True)
def close_stomp_clients() -> Iterator[None]:
    from tests.integration.stomppy_helpers import Client

    yield
    while Client.opened:
        Client.opened.pop().force_close()
