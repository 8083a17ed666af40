import pytest

from stomp_core.errors import ProtocolError, UsageError
from stomp_core.escaping import escape, unescape


@pytest.mark.parametrize(
    ("version", "wire", "value"),
    [
        ("1.0", "a\\nb\\c", "a\\nb\\c"),  # 1.0 has no escapes
        ("1.1", "a\\nb\\cc\\\\d", "a\nb:c\\d"),
        ("1.2", "a\\rb\\n\\c\\\\", "a\rb\n:\\"),
        ("1.2", "plain", "plain"),
    ],
)
def test_unescape(version: str, wire: str, value: str) -> None:
    assert unescape(wire, version) == value


@pytest.mark.parametrize(("version", "wire"), [("1.1", "a\\rb"), ("1.2", "a\\tb"), ("1.2", "trailing\\"), ("1.1", "\\x")])
def test_undefined_escape_is_invalid_header(version: str, wire: str) -> None:
    with pytest.raises(ProtocolError) as info:
        unescape(wire, version)
    assert info.value.message == "Invalid header"


def test_unescape_fast_path_returns_same_object() -> None:
    value = "no-backslash:here"
    assert unescape(value, "1.2") is value
    assert escape("plain", "1.2") == "plain"


@pytest.mark.parametrize(
    ("version", "value", "wire"),
    [
        ("1.0", "a:b\\c", "a:b\\c"),
        ("1.1", "a:b\\c\nd", "a\\cb\\\\c\\nd"),
        ("1.1", "plain", "plain"),
        ("1.2", "a:b\\c\nd\re", "a\\cb\\\\c\\nd\\re"),
    ],
)
def test_escape(version: str, value: str, wire: str) -> None:
    assert escape(value, version) == wire
    assert unescape(wire, version) == value


@pytest.mark.parametrize(("version", "value"), [("1.0", "a\nb"), ("1.0", "a\rb"), ("1.1", "a\rb")])
def test_unrepresentable_value_is_usage_error(version: str, value: str) -> None:
    with pytest.raises(UsageError):
        escape(value, version)
