"""`serve`'s start-up warning names the part that is really down, and only that part."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from bot.web.serving import log_quick_checks
from tests.conftest import make_settings


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_stopped_redis_is_named_and_the_database_is_not(
    tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        tmp_path, db_url=sqlite_url, redis_url=f"redis://127.0.0.1:{closed_port()}/0"
    )
    with caplog.at_level(logging.INFO):
        await log_quick_checks(settings)
    warned = warnings_of(caplog)
    assert any(w.startswith("✘ queue") and "Redis" in w for w in warned), warned
    assert not any("database" in w for w in warned), warned
    assert any(r.getMessage().startswith("✔ database") for r in caplog.records)


async def test_an_unreachable_database_is_named_and_redis_is_not(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere"
    settings = make_settings(tmp_path, db_url=url, redis_url=redis_url)
    with caplog.at_level(logging.INFO):
        await log_quick_checks(settings)
    warned = warnings_of(caplog)
    assert any(w.startswith("✘ database") and "DEKSDENFLOW_DB_URL" in w for w in warned), warned
    assert not any("queue" in w or "Redis" in w for w in warned), warned
