from stomp_core.frame import CLIENT_COMMANDS
from stomp_core.states import TRANSITIONS, State, next_state


def test_server_path() -> None:
    state = State.AWAITING_CONNECT
    for command, expected in [
        ("STOMP", State.CONNECTING),
        ("CONNECTED", State.OPEN),
        ("SEND", State.OPEN),
        ("MESSAGE", State.OPEN),
        ("DISCONNECT", State.CLOSING),
        ("RECEIPT", State.CLOSING),
        ("close", State.CLOSED),
    ]:
        new = next_state(state, command)
        assert new is expected, command
        state = new


def test_out_of_order() -> None:
    assert next_state(State.AWAITING_CONNECT, "SEND") is None
    assert next_state(State.OPEN, "CONNECT") is None
    assert next_state(State.CONNECTING, "MESSAGE") is None
    assert next_state(State.CLOSED, "ERROR") is None


def test_every_open_state_can_fail_and_close() -> None:
    for state in State:
        assert TRANSITIONS[(state, "close")] is State.CLOSED
        if state is not State.CLOSED:
            assert TRANSITIONS[(state, "ERROR")] is State.CLOSED
    for command in CLIENT_COMMANDS - {"CONNECT", "STOMP"}:
        assert (State.OPEN, command) in TRANSITIONS
