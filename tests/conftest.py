"""Shared fixtures. Each helper module owns its fixtures; this file imports them, and sets Hypothesis up."""

from hypothesis import settings

from tests.mongodb_server import mongodb_url

__all__ = ["mongodb_url"]

# Properties, not timings: Hypothesis's default 200 ms deadline per example fails a correct test on a loaded 2-core
# CI machine (seen on the selector properties while other suites ran). Timing targets belong in `stompgate bench`.
settings.register_profile("stompgate", deadline=None)
settings.load_profile("stompgate")
