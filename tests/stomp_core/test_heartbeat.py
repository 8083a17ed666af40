import pytest

from stomp_core.errors import ProtocolError
from stomp_core.heartbeat import GRACE_MS, HeartbeatPlan, negotiate, parse_heartbeat


@pytest.mark.parametrize(
    ("client", "server", "send", "expect"),
    [
        ((0, 0), (10000, 10000), 0, 0),
        ((1000, 2000), (500, 3000), 2000, 3000),  # send=max(sx,cy), expect=max(cx,sy)
        ((1000, 0), (500, 500), 0, 1000),
        ((0, 1000), (500, 500), 1000, 0),
        ((1000, 1000), (0, 0), 0, 0),
        ((4000, 4000), (10000, 10000), 10000, 10000),
    ],
)
def test_negotiate(client: tuple[int, int], server: tuple[int, int], send: int, expect: int) -> None:
    assert negotiate(client, server) == HeartbeatPlan(send, expect)
    assert negotiate(client, server, role="client") == HeartbeatPlan(expect, send)


def test_send_due_and_peer_dead() -> None:
    plan = HeartbeatPlan(send_every_ms=1000, expect_every_ms=2000)
    assert not plan.send_due(10.0, 10.999)
    assert plan.send_due(10.0, 11.0)
    limit = (2 * 2000 + GRACE_MS) / 1000
    assert not plan.peer_dead(10.0, 10.0 + limit)
    assert plan.peer_dead(10.0, 10.0 + limit + 0.001)


def test_disabled_plan_never_fires() -> None:
    plan = HeartbeatPlan()
    assert not plan.send_due(0.0, 1e9)
    assert not plan.peer_dead(0.0, 1e9)


@pytest.mark.parametrize(("value", "parsed"), [(None, (0, 0)), ("0,0", (0, 0)), ("1000, 2000", (1000, 2000))])
def test_parse_heartbeat(value: str | None, parsed: tuple[int, int]) -> None:
    assert parse_heartbeat(value) == parsed


@pytest.mark.parametrize("value", ["", "1000", "a,b", "-1,0", "1,2,3", "1.5,2", "١,2"])
def test_parse_heartbeat_rejects(value: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_heartbeat(value)
    assert info.value.message == "Invalid header"
