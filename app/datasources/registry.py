"""Map a datasource URL's scheme to a backend module, imported only when chosen (uvicorn's habit)."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from app.datasources.interface import Datasource, DatasourceError, DatasourceOptions

__all__ = ["BACKENDS", "open_datasource", "DEFAULT_URL"]

DEFAULT_URL = "sqlite:///./data/stompgate.db"

# scheme -> module providing ``async def open_datasource(url: str, options: DatasourceOptions) -> Datasource``
BACKENDS: dict[str, str] = {
    "memory": "app.datasources.memory",
    "sqlite": "app.datasources.sqlite",
    "mongodb": "app.datasources.mongodb",
    "mongodb+srv": "app.datasources.mongodb",
    "postgresql": "app.datasources.postgresql",
    "postgres": "app.datasources.postgresql",
    "redis": "app.datasources.redis",
    "rediss": "app.datasources.redis",
}


# the pyproject extra that brings a scheme's driver, where it is not named like the scheme
_EXTRAS = {"mongodb+srv": "mongodb", "postgres": "postgresql", "rediss": "redis"}


async def open_datasource(url: str, options: DatasourceOptions | None = None) -> Datasource:
    scheme = urlsplit(url).scheme.lower()
    module_name = BACKENDS.get(scheme)
    if module_name is None:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
        raise DatasourceError(f"unknown datasource URL scheme {scheme + '://' if scheme else repr(url)}; use one of {known}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DatasourceError(
            f"the {scheme}:// datasource needs an optional dependency that is not installed ({exc.name}); "
            f"install it with: pip install 'stompgate[{_EXTRAS.get(scheme, scheme)}]'"
        ) from exc
    datasource: Datasource = await module.open_datasource(url, options or DatasourceOptions())
    return datasource
