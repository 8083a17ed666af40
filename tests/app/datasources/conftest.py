"""The ``datasource`` fixture: every contract test runs once per backend."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

from app.datasources.interface import Datasource, DatasourceOptions
from app.datasources.mongodb.topics import MongoTailQueue
from app.datasources.registry import open_datasource
from tests.mongodb_server import SERVER_FIXTURES, mongodb_servers

# Small enough that the Gap test can overrun it quickly, large enough for every other test.
TOPIC_RETENTION = 50


# MongoDB once per test server (tests/mongodb_server.py): "mongodb:ferretdb" takes the backend's FerretDB paths,
# "mongodb:mongo-java-server" MongoDB's own; with MONGODB_URL set, "mongodb:env" is that server.
MONGODB = [pytest.param(f"mongodb:{server}", marks=pytest.mark.mongodb) for server in mongodb_servers()]
POSTGRESQL = [pytest.param("postgresql", marks=pytest.mark.postgresql)]
# "redis:cluster": the same on a Redis Cluster of three masters (the namespace's slot on one of them)
REDIS = [pytest.param("redis", marks=pytest.mark.redis), pytest.param("redis:cluster", marks=pytest.mark.redis)]
BACKENDS = [pytest.param("memory"), pytest.param("sqlite"), *POSTGRESQL, *REDIS, *MONGODB]


async def _open(backend: str, request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Datasource:
    options = DatasourceOptions(topic_retention=TOPIC_RETENTION, namespace=f"t{uuid.uuid4().hex[:16]}")
    mode = ""  # MongoDB only: "cursor" or "poll" to follow the topic log the other way than the server's own
    if backend == "memory":
        url = "memory://"
    elif backend == "sqlite":
        url = f"sqlite:///{tmp_path}/contract.db"
    elif backend == "postgresql":
        url = request.getfixturevalue("postgresql_url")  # one database; each test its own namespace
    elif backend == "redis":
        url = request.getfixturevalue("redis_url")  # one server; each test its own key namespace
    elif backend == "redis:cluster":
        url = request.getfixturevalue("redis_cluster_url")
    else:
        name, _, mode = backend.partition("/")
        url = request.getfixturevalue(SERVER_FIXTURES[name.partition(":")[2]])
    ds = await open_datasource(url, options)
    if mode:
        # the other way of following the topic log than the server's own: a tailable awaitData cursor on FerretDB,
        # block reads ("poll") on the other servers, so that every server runs both
        topics = ds.topics
        assert isinstance(topics, MongoTailQueue)
        topics.follow_mode = "cursor" if mode == "cursor" else "poll"
    return ds


@pytest.fixture(params=BACKENDS)
async def datasource(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> AsyncIterator[Datasource]:
    ds = await _open(request.param, request, tmp_path)
    try:
        yield ds
    finally:
        await ds.close()


OTHER_FOLLOW_MODE = [
    pytest.param(f"mongodb:{server}/{'cursor' if server == 'ferretdb' else 'poll'}", marks=pytest.mark.mongodb)
    for server in mongodb_servers()
]


@pytest.fixture(params=[*BACKENDS, *OTHER_FOLLOW_MODE])
async def tail_datasource(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> AsyncIterator[Datasource]:
    """For the TailQueue rules: every backend, and on each MongoDB server its topic log also followed the other way."""
    ds = await _open(request.param, request, tmp_path)
    try:
        yield ds
    finally:
        await ds.close()
