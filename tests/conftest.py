"""Shared fixtures. Each helper module owns its fixtures; this file imports them, and sets Hypothesis up."""

from hypothesis import settings

from tests.mongodb_server import env_mongodb_url, ferretdb_url, mongo_java_server_url, mongodb_url
from tests.postgresql_server import fresh_postgresql_url, postgresql_url
from tests.redis_server import redis_cluster_url, redis_url

__all__ = ["env_mongodb_url", "ferretdb_url", "mongo_java_server_url", "mongodb_url", "postgresql_url", "fresh_postgresql_url", "redis_url", "redis_cluster_url"]

# Properties, not timings: Hypothesis's default 200 ms deadline per example fails a correct test on a loaded 2-core
# CI machine (seen on the selector properties while other suites ran). Timing targets belong in `stompgate bench`.
settings.register_profile("stompgate", deadline=None)
settings.load_profile("stompgate")
