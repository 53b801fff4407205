"""Run the Alembic migrations (`upgrade head`) against the configured database."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' must be doubled for configparser interpolation (passwords in URLs)
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade_head(database_url: str) -> None:
    if database_url.startswith("sqlite:///"):
        private_sqlite_file(Path(database_url[len("sqlite:///") :]))
    command.upgrade(alembic_config(database_url), "head")


def private_sqlite_file(path: Path) -> None:
    """The SQLite file (it holds tokens' hashes and sealed secrets) readable by its owner only.

    Created here, before SQLite opens it, so it is never world-readable even for a moment;
    SQLite gives its -wal and -shm files the same mode.
    """
    if str(path) in ("", ":memory:"):
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    with contextlib.suppress(PermissionError):
        os.chmod(path, 0o600)
