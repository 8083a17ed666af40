"""Version negotiation: no ``accept-version`` means 1.0; otherwise the numerically highest common version."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ProtocolError

__all__ = ["SUPPORTED_VERSIONS", "negotiate_version"]

SUPPORTED_VERSIONS: tuple[str, ...] = ("1.0", "1.1", "1.2")


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def negotiate_version(accept_version: str | None, supported: Sequence[str] = SUPPORTED_VERSIONS) -> str:
    """The version to speak. A missing or blank header means 1.0 (when supported); unknown entries are ignored.

    No version in common is ``ProtocolError("Version mismatch")`` carrying the ERROR frame's ``version`` header.
    """
    if accept_version is None or not accept_version.strip():
        offered = {"1.0"}
    else:
        offered = {part.strip() for part in accept_version.split(",")}
    common = [v for v in supported if v in offered]
    if not common:
        listed = ",".join(supported)
        raise ProtocolError(
            "Version mismatch", f"Supported protocol versions are {listed}", headers={"version": listed}
        )
    return max(common, key=_key)
