"""Shared fixtures: settings, real SQLite/Postgres databases built by migrations, real Redis."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import create_engine, text

from bot.core.settings import Settings
from bot.storage.migrate import upgrade_head

PG_ADMIN_URL = os.environ.get(
    "DEKSDENFLOW_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TEST_REDIS_URL = os.environ.get("DEKSDENFLOW_TEST_REDIS", "redis://127.0.0.1:6379/15")
GITHUB_SECRET = "gh-test-secret-0123456789"
GITLAB_SECRET = "gl-test-secret-0123456789"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build Settings explicitly; a developer's DEKSDENFLOW_* must not leak in."""
    for name in list(os.environ):
        if name.startswith("DEKSDENFLOW_") and not name.startswith("DEKSDENFLOW_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _restore_umask() -> Iterator[None]:
    """`serve` and `worker` set umask 077 for their process; a test that runs them in-process must
    not leave it to the next (an engine user could not read the directories later tests make)."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


# Settings a test may set that do not change what the product does, only where it runs and with
# what it signs: the plumbing every test needs. An end-to-end world differs from `Settings()` in
# these alone (tests/github_e2e and tests/gitlab_e2e check it); anything else is a behaviour the
# product would not ship with.
PLUMBING_SETTINGS = frozenset(
    {
        "data_dir",  # the test's tmp_path, not the user's ~/.local/share
        "db_url",  # the test's SQLite file or Postgres database
        "redis_url",  # the test's Redis db (memory:// is the product default)
        "api_token",  # the API's bearer token the tests send
        "github_webhook_secret",  # what the tests sign GitHub deliveries with
        "gitlab_webhook_secret",  # … and GitLab's X-Gitlab-Token
        "github_app_id",  # the fake GitHub's App
        "github_private_key",
        "github_app_slug",
        "gitlab_url",  # the fake GitLab's address
        "gitlab_token",
        "engine",  # the scripted engine instead of codex: no model, no network
        "scripted_script",  # … and the script it plays
    }
)


def make_settings(tmp_path: Path, *, product_defaults: bool = False, **overrides: Any) -> Settings:
    """Settings for a test: the plumbing, then `overrides`.

    Unless `product_defaults`, two speed-ups the product does not ship with: a shorter worker
    poll, and no spare worktree checked out in the background after a protocol starts (a git
    process that would outlive many a short test's assertions). End-to-end tests pass
    `product_defaults=True`: they run as the product ships.
    """
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "github_webhook_secret": GITHUB_SECRET,
        "gitlab_webhook_secret": GITLAB_SECRET,
        "api_token": "api-test-token-0123456789",
        "engine": "scripted",
    }
    if not product_defaults:
        values.update(worker_poll_delay_s=0.02, warm_worktrees=False)
    values.update(overrides)
    return Settings(**values)


def behaviour_overrides(settings: Settings) -> dict[str, tuple[Any, Any]]:
    """{field: (value, product default)} of every setting off its default that is no plumbing."""
    shipped = Settings()
    found: dict[str, tuple[Any, Any]] = {}
    for name in type(settings).model_fields:
        if name in PLUMBING_SETTINGS:
            continue
        value, default = getattr(settings, name), getattr(shipped, name)
        if value != default:
            found[name] = (value, default)
    return found


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A fresh Postgres database for the session, dropped at the end."""
    name = f"df_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> str:
    upgrade_head(postgres_server)
    return postgres_server


def _truncate_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE webhook_deliveries, events, forge_records, step_runs, protocol_runs, "
                "projects, auth_sessions, stored_secrets, transcript_chunks "
                "RESTART IDENTITY CASCADE"
            )
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database: SQLite in tmp, or the session's Postgres database emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
        upgrade_head(url)
        return url
    url = str(request.getfixturevalue("postgres_url"))
    _truncate_postgres(url)
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade_head(url)
    return url


@pytest.fixture
def redis_url() -> Iterator[str]:
    import redis as redis_sync

    client = redis_sync.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    try:
        yield TEST_REDIS_URL
    finally:
        client.flushdb()
        client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """Runs an ASGI app under a real uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            loop="asyncio",
            http="h11",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def live_server() -> type[LiveServer]:
    return LiveServer
