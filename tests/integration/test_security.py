"""Security against a real gateway process: STOMP login/passcode and permissions, REST bearer tokens, login
lockouts, TLS on the TCP listener (stomp.py over TLS), and refusing a public address with no users."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import stomp

from app.security import hash_secret
from tests.app.api.users import ALICE_TOKEN, BOB_TOKEN, write_users_file
from tests.gateway_process import Gateway, free_port, start_gateway
from tests.integration.stomppy_helpers import Client
from tests.raw_stomp import RawClient


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("secured")
    users = write_users_file(tmp)
    gateway = start_gateway(tmp, "memory://", extra=["--users-file", str(users), "--login-lockout-seconds", "30"])
    yield gateway
    gateway.stop()


def stomp_client(gateway: Gateway) -> Client:
    return Client(gateway.stomp_port, "1.2")


def refused(client: Client, login: str, passcode: str) -> bool:
    try:
        client.connect(login=login, passcode=passcode)
    except stomp.exception.ConnectFailedException:
        return True
    finally:
        client.disconnect()
    return not client.conn.is_connected() and bool(client.errors)


def test_stomp_login_and_permissions(secured: Gateway) -> None:
    producer = stomp_client(secured).connect(login="alice", passcode="alice-secret")
    consumer = stomp_client(secured).connect(login="bob", passcode="bob-secret")
    try:
        consumer.conn.subscribe("/queue/orders.eu", id="1", ack="auto")
        producer.send("/queue/orders.eu", "allowed")
        assert consumer.get().body == "allowed"
        producer.conn.send(destination="/queue/elsewhere", body="not allowed")
        deadline = time.monotonic() + 5
        while not producer.errors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert producer.errors and "may not write" in producer.errors[0].body
    finally:
        producer.disconnect()
        consumer.disconnect()
    reader = stomp_client(secured).connect(login="alice", passcode="alice-secret")
    try:
        reader.conn.subscribe("/queue/orders.eu", id="1")
        deadline = time.monotonic() + 5
        while not reader.errors and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reader.errors and "may not read" in reader.errors[0].body
    finally:
        reader.disconnect()


def test_wrong_passcode_is_refused_and_not_logged(secured: Gateway) -> None:
    assert refused(stomp_client(secured), "alice", "not-the-passcode")
    assert refused(stomp_client(secured), "nobody", "whatever")
    log = secured.log()
    assert "login failed for user 'alice'" in log
    assert "not-the-passcode" not in log


def test_repeated_failures_lock_the_login_out(secured: Gateway) -> None:
    for _ in range(5):
        assert refused(stomp_client(secured), "root", "guess")
    assert refused(stomp_client(secured), "root", "root-secret")  # even the right passcode, for a while
    assert "locked out" in secured.log()


def raw_from(address: str, gateway: Gateway) -> RawClient:
    """A raw STOMP client whose connection comes from ``address`` (any 127.x.y.z is loopback on Linux)."""
    client = RawClient.__new__(RawClient)
    client.sock = socket.create_connection(("127.0.0.1", gateway.stomp_port), timeout=5, source_address=(address, 0))
    client.buffer = b""
    return client


def connect_reply(address: str, gateway: Gateway, login: str, passcode: str) -> str:
    client = raw_from(address, gateway)
    try:
        client.frame("CONNECT", {"accept-version": "1.2", "host": "/", "login": login, "passcode": passcode})
        return client.read(timeout=10).command
    finally:
        client.close()


def test_a_lockout_is_per_login_and_address(secured: Gateway) -> None:
    """Guesses from one address lock that address out of the login, not everyone else."""
    for _ in range(5):
        assert connect_reply("127.0.0.2", secured, "bob", "guess") == "ERROR"
    assert connect_reply("127.0.0.2", secured, "bob", "bob-secret") == "ERROR"  # locked out from there
    assert connect_reply("127.0.0.1", secured, "bob", "bob-secret") == "CONNECTED"  # not from here
    assert "from 127.0.0.2" in secured.log()


def test_rest_bearer_tokens(secured: Gateway) -> None:
    with httpx.Client(base_url=secured.http_url) as http:
        missing = http.post("/destinations/queue/orders", content=b"x")
        assert missing.status_code == 401
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        ok = http.post("/destinations/queue/orders", content=b"x", headers={"Authorization": f"Bearer {ALICE_TOKEN}"})
        assert ok.status_code == 201, ok.text
        forbidden = http.delete("/messages/queue/orders", headers={"Authorization": f"Bearer {BOB_TOKEN}"})
        assert forbidden.status_code == 403
        peek = http.get("/messages/queue/orders", headers={"Authorization": f"Bearer {BOB_TOKEN}"})
        assert [m["body"] for m in peek.json()] == ["x"]


# ---- TLS ----


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_stomp_over_tls(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    users = write_users_file(tmp_path)
    gateway = start_gateway(
        tmp_path, "memory://", extra=["--users-file", str(users), "--tls-certfile", str(cert), "--tls-keyfile", str(key)]
    )
    try:
        client = stomp_client(gateway)
        client.conn = stomp.Connection12([("127.0.0.1", gateway.stomp_port)], reconnect_attempts_max=1)
        client.conn.set_listener("test", client)
        client.conn.set_ssl(for_hosts=[("127.0.0.1", gateway.stomp_port)], ca_certs=str(cert), ssl_version=ssl.PROTOCOL_TLS_CLIENT)
        client.connect(login="alice", passcode="alice-secret")
        try:
            client.conn.subscribe("/topic/prices", id="1")
            time.sleep(0.2)
            client.send("/topic/prices", "42 over TLS")
            assert client.get().body == "42 over TLS"
        finally:
            client.disconnect()
        plain = RawClient(gateway.stomp_port)  # no TLS: the handshake fails, nothing is served in clear text
        try:
            plain.frame("CONNECT", {"accept-version": "1.2", "host": "/", "login": "alice", "passcode": "alice-secret"})
            assert plain.closed_by_peer()
            assert b"CONNECTED" not in plain.buffer
        finally:
            plain.close()
    finally:
        gateway.stop()


# ---- refusing to expose an open gateway ----


def serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--store", "memory://",
         "--stomp-port", str(free_port()), "--http-port", str(free_port()), *args],
        capture_output=True, text=True, timeout=30, cwd=cwd, env=dict(os.environ),
    )  # fmt: skip


def test_refuses_a_public_address_without_users(tmp_path: Path) -> None:
    result = serve("--host", "0.0.0.0", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "refusing to listen on 0.0.0.0 with no users configured" in result.stderr
    assert "--allow-anonymous" in result.stderr
    # A container is configured through its environment: the sentence names the variables too.
    assert "STOMPGATE_USERS_FILE" in result.stderr and "STOMPGATE_ALLOW_ANONYMOUS=true" in result.stderr


def test_a_bad_users_file_or_tls_file_is_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "users.toml"
    bad.write_text("[[users]]\nname = 'a'\npasscode_hash = 'plaintext'\n")
    result = serve("--users-file", str(bad), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "users file" in result.stderr and "bcrypt" in result.stderr
    result = serve("--tls-certfile", str(tmp_path / "missing.pem"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "missing.pem" in result.stderr


def test_allow_anonymous_on_a_public_address(tmp_path: Path) -> None:
    http_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--store", "memory://", "--host", "0.0.0.0",
         "--allow-anonymous", "--stomp-port", str(free_port()), "--http-port", str(http_port), "--log-level", "warning"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, "the gateway exited"
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            pytest.fail("the gateway did not start")
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_a_first_login_is_checked_off_the_event_loop(tmp_path: Path) -> None:
    """bcrypt at cost 13 takes ~0.5 s. While one client's first login is being checked, another connected client is
    served at once (the check runs in a worker thread), and the frames pipelined behind the CONNECT wait for it and
    are then answered in order."""
    users = tmp_path / "users.toml"
    users.write_text(
        f'[[users]]\nname = "slow"\npasscode_hash = "{hash_secret("slow-secret", rounds=13)}"\nroles = ["admin"]\n'
        f'[[users]]\nname = "fast"\npasscode_hash = "{hash_secret("fast-secret", rounds=4)}"\nroles = ["admin"]\n'
    )
    gateway = start_gateway(tmp_path, "memory://", extra=["--users-file", str(users)])
    working, arriving = RawClient(gateway.stomp_port), RawClient(gateway.stomp_port)
    try:
        working.connect(login="fast", passcode="fast-secret")
        arriving.send(
            b"CONNECT\naccept-version:1.2\nhost:/\nlogin:slow\npasscode:slow-secret\n\n\x00"
            b"SEND\ndestination:/queue/pipelined\nreceipt:r1\n\nafter connect\x00"
            b"DISCONNECT\nreceipt:bye\n\n\x00"
        )
        time.sleep(0.05)  # the gateway has the CONNECT and is checking it
        served: list[tuple[float, str]] = []

        def serve_meanwhile() -> None:
            working.frame("SEND", {"destination": "/queue/other", "receipt": "w1"}, b"meanwhile")
            receipt = working.read(timeout=10).headers["receipt-id"]
            served.append((time.monotonic(), receipt))

        thread = threading.Thread(target=serve_meanwhile)
        thread.start()
        connected = arriving.read(timeout=10)
        connected_at = time.monotonic()
        replies = [connected, arriving.read(timeout=10), arriving.read(timeout=10)]
        thread.join(10)
        assert [r.command for r in replies] == ["CONNECTED", "RECEIPT", "RECEIPT"]
        assert [r.headers.get("receipt-id") for r in replies[1:]] == ["r1", "bye"]
        assert served and served[0][1] == "w1"
        assert served[0][0] < connected_at  # the other client did not wait for the bcrypt
        assert arriving.closed_by_peer()
    finally:
        working.close()
        arriving.close()
        gateway.stop()


def test_a_durable_subscription_belongs_to_its_login_not_to_a_client_id(secured: Gateway) -> None:
    """Another login that borrows root's client-id reaches a subscription of its own, never root's messages."""
    source = "127.0.0.9"  # an address of its own: the lockout tests above fail many logins from 127.0.0.1
    topic = f"/topic/durable-owner-{time.monotonic_ns()}"
    clients: list[RawClient] = []

    def connected(login: str, passcode: str, **headers: str) -> RawClient:
        client = raw_from(source, secured)
        clients.append(client)
        client.connect(login=login, passcode=passcode, **headers)
        return client

    def durable(login: str, passcode: str) -> RawClient:
        client = connected(login, passcode, **{"client-id": "rootapp"})
        client.frame("SUBSCRIBE", {"id": "1", "destination": topic, "durable": "true", "ack": "client", "receipt": "s"})
        assert client.read().headers["receipt-id"] == "s"
        return client

    try:
        owner = durable("root", "root-secret")
        owner.frame("DISCONNECT", {"receipt": "bye"})
        assert owner.read().headers["receipt-id"] == "bye"
        producer = connected("alice", "alice-secret")
        for i in range(5):
            producer.frame("SEND", {"destination": topic, "receipt": f"r{i}"}, f"for root {i}".encode())
            assert producer.read().headers["receipt-id"] == f"r{i}"
        thief = durable("alice", "alice-secret")
        producer.frame("SEND", {"destination": topic, "receipt": "m"}, b"marker")
        assert producer.read().headers["receipt-id"] == "m"
        assert thief.read().body == b"marker"  # her own, new subscription: root's five are not hers
        thief.close()
        owner = durable("root", "root-secret")
        assert [owner.read().body for _ in range(6)] == [f"for root {i}".encode() for i in range(5)] + [b"marker"]
    finally:
        for client in clients:
            client.close()
