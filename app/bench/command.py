"""``stompgate bench`` (placeholder until the load generator lands)."""

from __future__ import annotations

import typer


def bench() -> None:
    """Load-generate against a gateway and report msgs/s, latency, lost and duplicated messages."""
    typer.echo("not yet implemented")
    raise typer.Exit(2)
