"""A users file for tests: cheap bcrypt (4 rounds), three users, three roles."""

from __future__ import annotations

import hashlib
from pathlib import Path

from app.security import hash_secret

__all__ = ["write_users_file", "ALICE_TOKEN", "BOB_TOKEN", "ROOT_TOKEN"]

ALICE_TOKEN = "alice-token-0123456789"
BOB_TOKEN = "bob-token-0123456789"
ROOT_TOKEN = "root-token-0123456789"


def write_users_file(directory: Path) -> Path:
    path = directory / "users.toml"
    path.write_text(
        f"""
[[users]]
name = "alice"
passcode_hash = "{hash_secret("alice-secret", rounds=4)}"
token_hashes = ["{hash_secret(ALICE_TOKEN, rounds=4)}"]
roles = ["producer"]

[[users]]
name = "bob"
passcode_hash = "{hash_secret("bob-secret", rounds=4)}"
token_hashes = ["sha256:{hashlib.sha256(BOB_TOKEN.encode()).hexdigest()}"]
roles = ["consumer"]

[[users]]
name = "root"
passcode_hash = "{hash_secret("root-secret", rounds=4)}"
token_hashes = ["{hash_secret(ROOT_TOKEN, rounds=4)}"]
roles = ["admin"]

[[permissions]]
role = "producer"
write = ["/queue/orders*", "/topic/*"]
read = ["/topic/*"]

[[permissions]]
role = "consumer"
read = ["/queue/orders*"]
"""
    )
    return path
