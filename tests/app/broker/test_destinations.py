"""Destination names: the one parser both STOMP and REST use refuses names that could mean another destination."""

from __future__ import annotations

import pytest

from app.broker.destinations import InvalidDestination, parse_destination


@pytest.mark.parametrize(
    "text",
    [
        "/queue/orders/../reports",  # would be matched by an orders* permission, yet "means" reports
        "/queue/orders/./x",
        "/queue/orders/..",
        "/queue/orders/.",
        "/topic/a//b",  # an empty segment
        "/queue/orders/",
        "/queue/..",
        "/queue/.",
        "/queue/orders\x00x",
        "/queue/orders\nx",
        "/queue/orders\x1fx",
        "/queue/orders\x7fx",
        "/queue/\x00",
    ],
)
def test_dot_segments_empty_segments_and_control_characters_are_refused(text: str) -> None:
    with pytest.raises(InvalidDestination):
        parse_destination(text)


@pytest.mark.parametrize("text", ["/queue/orders/..x/y", "/queue/a.b.c", "/queue/orders...", "/topic/eu/orders.DLQ"])
def test_dots_inside_a_segment_are_fine(text: str) -> None:
    assert str(parse_destination(text)) == text


def test_the_error_names_the_segment() -> None:
    with pytest.raises(InvalidDestination, match=r"'\.\.'"):
        parse_destination("/queue/orders/../reports")
