"""What is down, in one line: the database (naming DB_URL, without its password) or the queue."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from bot.core.settings import Settings
from bot.storage.db import create_database
from bot.storage.reachability import database_error, ping_database, shown_url, which_is_down


def test_shown_url_hides_the_password() -> None:
    assert shown_url("postgresql://bot:s3cret@db:5432/df") == "postgresql://bot:***@db:5432/df"


async def test_ping_names_db_url_or_the_sqlite_file(tmp_path: Path) -> None:
    down = Settings(db_url="postgresql://bot:s3cret@127.0.0.1:1/df", data_dir=tmp_path)
    line = await ping_database(down)
    assert line is not None and "DEKSDENFLOW_DB_URL=postgresql://bot:***@127.0.0.1:1/df" in line
    assert "s3cret" not in line
    up = Settings(data_dir=tmp_path)
    assert await ping_database(up) is None
    assert "SQLite file" in database_error(up, OSError("disk I/O error"))


async def test_serve_warning_names_the_queue_when_only_the_queue_is_down(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    db = create_database(settings.async_database_url)
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=1)
    try:
        text = await which_is_down(db, redis, settings)
    finally:
        await redis.aclose()
        await db.dispose()
    assert text.startswith("the queue at DEKSDENFLOW_REDIS_URL is unreachable")
    assert "database" not in text
