"""Secrets at rest: Fernet with DEKSDENFLOW_SECRET_KEY (or a generated key file), stored rows."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select

from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.storage.db import Database
from bot.storage.models import StoredSecret

KEY_FILE = "secret.key"
# a stored project secret value starts with this; anything else is a clear value from before
SEALED = "fernet:"
GITHUB_APP = "github_app"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) as 0700; tighten an existing one we own."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(PermissionError):
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by the service user only (0600 from its first byte)."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def key_from(settings: Settings) -> bytes:
    """The Fernet key: DEKSDENFLOW_SECRET_KEY, else `<data_dir>/secret.key`, made once (0600).

    The generated key suits one machine (serve with its embedded worker, or processes sharing
    the data volume); separate machines must share DEKSDENFLOW_SECRET_KEY.
    """
    if settings.secret_key is not None:
        key = settings.secret_key.get_secret_value().encode()
    else:
        path = settings.data_dir / KEY_FILE
        private_dir(settings.data_dir)
        try:
            # O_EXCL: two processes starting together agree on whichever key was written first
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes().strip()
        else:
            key = Fernet.generate_key()
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
    try:
        Fernet(key)
    except ValueError:
        raise ConfigError(
            "DEKSDENFLOW_SECRET_KEY must be a Fernet key (32 url-safe base64-encoded bytes)"
        ) from None
    return key


def fernet_of(settings: Settings) -> Fernet:
    return Fernet(key_from(settings))


def seal(fernet: Fernet, value: str) -> str:
    return SEALED + fernet.encrypt(value.encode()).decode()


def unseal(fernet: Fernet, value: str) -> str:
    """The clear value of a sealed one (a legacy clear value passes unchanged)."""
    if not value.startswith(SEALED):
        return value
    try:
        return fernet.decrypt(value[len(SEALED) :].encode()).decode()
    except InvalidToken:
        raise ConfigError(
            "a stored secret does not decrypt: DEKSDENFLOW_SECRET_KEY changed?"
        ) from None


def seal_all(fernet: Fernet, values: dict[str, Any]) -> dict[str, Any]:
    """Every value sealed (already sealed ones kept as they are)."""
    return {
        k: v if isinstance(v, str) and v.startswith(SEALED) else seal(fernet, str(v))
        for k, v in values.items()
    }


async def put_secret(db: Database, fernet: Fernet, name: str, value: dict[str, Any]) -> None:
    sealed = seal(fernet, json.dumps(value))
    async with db.sessions.begin() as session:
        row = await session.get(StoredSecret, name, with_for_update=True)
        if row is None:
            session.add(StoredSecret(name=name, value=sealed))
        else:
            row.value = sealed


async def get_secret(db: Database, fernet: Fernet, name: str) -> dict[str, Any] | None:
    async with db.sessions() as session:
        value = (
            await session.execute(select(StoredSecret.value).where(StoredSecret.name == name))
        ).scalar()
    if value is None:
        return None
    data: dict[str, Any] = json.loads(unseal(fernet, value))
    return data
