import pytest

from stomp_core.errors import ProtocolError
from stomp_core.negotiation import SUPPORTED_VERSIONS, negotiate_version


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, "1.0"),
        ("", "1.0"),
        ("1.0", "1.0"),
        ("1.1", "1.1"),
        ("1.0,1.1,1.2", "1.2"),
        ("1.2, 1.0", "1.2"),
        ("1.1,2.0,banana", "1.1"),
    ],
)
def test_negotiate_version(accept: str | None, chosen: str) -> None:
    assert negotiate_version(accept) == chosen


def test_numeric_comparison() -> None:
    assert negotiate_version("1.9,1.10", ("1.9", "1.10")) == "1.10"


def test_mismatch() -> None:
    with pytest.raises(ProtocolError) as info:
        negotiate_version("2.0,3.0")
    assert info.value.message == "Version mismatch"
    assert info.value.detail == "Supported protocol versions are 1.0,1.1,1.2"
    assert info.value.headers == {"version": "1.0,1.1,1.2"}
    assert SUPPORTED_VERSIONS == ("1.0", "1.1", "1.2")


def test_missing_header_without_10_support_is_mismatch() -> None:
    with pytest.raises(ProtocolError):
        negotiate_version(None, ("1.2",))
