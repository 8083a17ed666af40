"""Shared fixtures. Each helper module owns its fixtures; this file only imports them."""

from tests.mongodb_server import mongodb_url

__all__ = ["mongodb_url"]
