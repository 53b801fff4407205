"""The pool's ping (bot/storage/db.py, ping_when_idle): a connection used a moment ago goes out
without a round trip, an idle one is pinged, and one the server ended is replaced before use."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bot.storage.db import create_database, ping_when_idle, postgres_connector


def _count_pings(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    dialect = engine.sync_engine.dialect
    pings: list[int] = []
    ping = dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(1)
        return bool(ping(dbapi_connection))

    monkeypatch.setattr(dialect, "do_ping", counted)
    return pings


async def _pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT pg_backend_pid()")))


async def test_recently_used_connection_is_not_pinged_an_idle_one_is(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_async_engine(url, async_creator=postgres_connector(url, 2.5))
    assert isinstance(engine.sync_engine.dialect, DefaultDialect)
    ping_when_idle(engine.sync_engine.pool, engine.sync_engine.dialect, idle_s=0.3)
    pings = _count_pings(engine, monkeypatch)
    try:
        first = await _pid(engine)
        assert await _pid(engine) == first and pings == []  # the same connection, no ping
        await asyncio.sleep(0.4)
        assert await _pid(engine) == first and pings == [1]  # idle: pinged, and alive
    finally:
        await engine.dispose()


async def test_connection_the_server_ended_is_replaced_before_use(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    db = create_database(url)
    pings = _count_pings(db.engine, monkeypatch)
    try:
        first = await _pid(db.engine)
        admin = create_engine(url.replace("+psycopg", "", 1), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:  # as a server restart or an operator would
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        admin.dispose()
        await asyncio.sleep(0.2)  # the server's FATAL message reaches the idle socket
        # the pooled connection was used a moment ago: no ping, and still no error
        async with db.one_read() as conn:
            assert await conn.scalar(text("SELECT 1")) == 1
        assert await _pid(db.engine) != first
        assert pings == []
    finally:
        await db.dispose()
