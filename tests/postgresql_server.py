"""PostgreSQL for the PostgreSQL datasource's tests: the private cluster the FerretDB tests already start
(``tests.mongodb_server.shared_postgres``: initdb into a temp dir, 127.0.0.1 only, trust auth, stopped at exit), one
new database per fixture use. Without the PostgreSQL binaries the tests are skipped, or fail when ``CI=true``.

``postgresql_url`` (session) is one database for a whole run; ``fresh_postgresql_url`` makes a new one per test.
Set ``POSTGRESQL_URL`` to run the same tests against a server of your own instead (each use then shares it, and the
tests keep apart by table namespace).
"""

from __future__ import annotations

import os

import pytest

from tests.mongodb_server import _unavailable, postgres_bin_dir, shared_postgres

__all__ = ["postgresql_url", "fresh_postgresql_url", "new_postgresql_url"]


def new_postgresql_url() -> str:
    if os.environ.get("POSTGRESQL_URL"):
        return os.environ["POSTGRESQL_URL"]
    if postgres_bin_dir() is None:
        _unavailable("PostgreSQL binaries not found (run .ci/services.sh: Debian package postgresql, or set POSTGRESQL_URL)")
    cluster = shared_postgres()
    return f"postgresql://postgres@127.0.0.1:{cluster.port}/{cluster.new_database('stompgate')}"


@pytest.fixture(scope="session")
def postgresql_url() -> str:
    return new_postgresql_url()


@pytest.fixture
def fresh_postgresql_url() -> str:
    return new_postgresql_url()
