"""The ``datasource`` fixture: every contract test runs once per backend."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

from app.datasources.interface import Datasource, DatasourceOptions
from app.datasources.mongodb.topics import MongoTailQueue
from app.datasources.registry import open_datasource

# Small enough that the Gap test can overrun it quickly, large enough for every other test.
TOPIC_RETENTION = 50


BACKENDS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("mongodb", marks=pytest.mark.mongodb),
]


async def _open(backend: str, request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Datasource:
    options = DatasourceOptions(topic_retention=TOPIC_RETENTION, namespace=f"t{uuid.uuid4().hex[:16]}")
    if backend == "memory":
        url = "memory://"
    elif backend == "sqlite":
        url = f"sqlite:///{tmp_path}/contract.db"
    else:
        try:
            url = request.getfixturevalue("mongodb_url")
        except pytest.FixtureLookupError:
            if os.environ.get("CI") == "true":
                raise
            pytest.skip("no mongodb_url fixture yet (tests/conftest.py)")
    ds = await open_datasource(url, options)
    if backend == "mongodb-cursor":
        # the MongoDB way of following the topic log (a tailable awaitData cursor), which the backend uses on
        # FerretDB only when told: without this the CI server (FerretDB) would never run it
        topics = ds.topics
        assert isinstance(topics, MongoTailQueue)
        topics.follow_mode = "cursor"
    return ds


@pytest.fixture(params=BACKENDS)
async def datasource(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> AsyncIterator[Datasource]:
    ds = await _open(request.param, request, tmp_path)
    try:
        yield ds
    finally:
        await ds.close()


@pytest.fixture(params=[*BACKENDS, pytest.param("mongodb-cursor", marks=pytest.mark.mongodb)])
async def tail_datasource(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> AsyncIterator[Datasource]:
    """For the TailQueue rules: every backend, and MongoDB's topic log also followed the way it is on MongoDB."""
    ds = await _open(request.param, request, tmp_path)
    try:
        yield ds
    finally:
        await ds.close()
