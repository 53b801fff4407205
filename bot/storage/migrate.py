"""Run the Alembic migrations (`upgrade head`) against the configured database."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, pool, text

from bot.core.fsperm import ensure_private_dir, restrict_sqlite

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# pg_advisory_lock key: "DKSF" as an int. Every pod of a Kubernetes rollout runs `migrate` as its
# init step; the lock makes them take turns, so each migration is applied once and the others
# find the schema already at head.
MIGRATION_LOCK_KEY = 0x444B5346


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' must be doubled for configparser interpolation (passwords in URLs)
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade_head(database_url: str) -> None:
    sqlite_path = None
    if database_url.startswith("sqlite:///") and not database_url.endswith(":memory:"):
        sqlite_path = Path(database_url[len("sqlite:///") :].split("?", 1)[0])
        private_sqlite_file(sqlite_path)
    cfg = alembic_config(database_url)
    if not database_url.startswith("postgresql"):
        command.upgrade(cfg, "head")
        if sqlite_path is not None:
            # the database holds deliveries, tokens' effects and settings: no other user reads it
            # (this also covers the -wal and -shm files SQLite made)
            restrict_sqlite(sqlite_path)
        return
    engine = create_engine(database_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            # session-level lock: held across alembic's own transaction, released on close
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


def private_sqlite_file(path: Path) -> None:
    """The SQLite file (it holds tokens' hashes and sealed secrets) readable by its owner only.

    Created here, before SQLite opens it, so it is never world-readable even for a moment.
    """
    if str(path) in ("", ":memory:"):
        return
    if not path.parent.exists():
        ensure_private_dir(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    with contextlib.suppress(PermissionError):
        os.chmod(path, 0o600)
