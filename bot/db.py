"""Database access: the async engine, sessions, and SQLite tuning for durable group commit."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bot.settings import Settings


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; FULL keeps every acknowledged delivery on disk
    # (the intake answers `accepted` only after its commit), busy_timeout absorbs the short
    # write lock held by a concurrent worker.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def sqlite_file(database: Database) -> str | None:
    """The file behind a SQLite database, or None (Postgres, in-memory, URI options)."""
    url = database.engine.url
    if not database.is_sqlite or url.query or url.database in (None, "", ":memory:"):
        return None
    return url.database


def connect_sqlite(path: str) -> sqlite3.Connection:
    """A plain sqlite3 connection with the engine's PRAGMAs, in autocommit mode (explicit BEGIN).

    For the intake's dedicated writer thread: one thread hop per group commit instead of
    aiosqlite's hop per statement, and no SQL compilation on the event loop.
    """
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    _sqlite_pragmas(conn, None)
    return conn


@dataclass
class Database:
    """The engine plus a session factory; one per process."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def create_database(url: str) -> Database:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs.update(pool_size=10, max_overflow=10, pool_pre_ping=True)
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return Database(engine=engine, sessions=async_sessionmaker(engine, expire_on_commit=False))


def database_from_settings(settings: Settings) -> Database:
    return create_database(settings.async_database_url)
