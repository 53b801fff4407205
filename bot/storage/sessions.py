"""Server-side one-use and expiring secrets: console sessions and GitHub setup states."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from bot.storage.db import Database
from bot.storage.models import AuthSession

CONSOLE = "console"
SETUP_STATE = "setup_state"
SETUP_STATE_TTL_S = 3600.0  # GitHub's manifest code itself lives one hour


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def create(db: Database, kind: str, ttl_s: float) -> str:
    """A new random value of `kind` valid for `ttl_s`; only its hash is stored."""
    value = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    async with db.sessions.begin() as session:
        # expired rows are dropped as new ones come: the table stays the size of live sessions
        await session.execute(delete(AuthSession).where(AuthSession.expires_at < now))
        session.add(
            AuthSession(
                id_hash=digest(value),
                kind=kind,
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
            )
        )
    return value


async def is_valid(db: Database, kind: str, value: str) -> bool:
    """True while `value` is a live, unexpired secret of `kind`."""
    if not value or len(value) > 200:
        return False
    async with db.sessions() as session:
        found = (
            await session.execute(
                select(AuthSession.id_hash).where(
                    AuthSession.id_hash == digest(value),
                    AuthSession.kind == kind,
                    AuthSession.expires_at > datetime.now(UTC),
                )
            )
        ).first()
    return found is not None


async def consume(db: Database, kind: str, value: str) -> bool:
    """Use a one-time value: True once if it was live; it is gone afterwards either way."""
    if not value or len(value) > 200:
        return False
    async with db.sessions.begin() as session:
        result = await session.execute(
            delete(AuthSession).where(
                AuthSession.id_hash == digest(value),
                AuthSession.kind == kind,
                AuthSession.expires_at > datetime.now(UTC),
            )
        )
    # a concurrent consumer deletes nothing: only one caller ever sees rowcount 1
    return bool(getattr(result, "rowcount", 0) == 1)


async def revoke(db: Database, kind: str, value: str) -> None:
    async with db.sessions.begin() as session:
        await session.execute(
            delete(AuthSession).where(
                AuthSession.id_hash == digest(value), AuthSession.kind == kind
            )
        )
