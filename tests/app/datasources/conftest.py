"""The ``datasource`` fixture: every contract test runs once per backend."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

from app.datasources.interface import Datasource, DatasourceOptions
from app.datasources.registry import open_datasource

# Small enough that the Gap test can overrun it quickly, large enough for every other test.
TOPIC_RETENTION = 50


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("sqlite"),
        pytest.param("mongodb", marks=pytest.mark.mongodb),
    ]
)
async def datasource(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> AsyncIterator[Datasource]:
    backend: str = request.param
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
    try:
        yield ds
    finally:
        await ds.close()
