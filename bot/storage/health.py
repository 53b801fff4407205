"""What /readyz checks beyond "the database answers": can it take writes? (issue 20, point 14)"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from bot.storage.db import Database, sqlite_file

# Below this much free space a commit (and its WAL, a mirror fetch, a worktree) will fail soon.
MIN_FREE_BYTES = 16 * 1024 * 1024


def free_bytes(path: Path) -> int:
    """Free space for unprivileged writes on the file system holding `path` (or its parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _sqlite_write_lock(path: str, timeout_s: float) -> str | None:
    """Take SQLite's write lock and give it back at once: None, or why it could not."""
    try:
        conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    except sqlite3.Error as exc:
        return f"cannot open: {exc}"
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return None
    except sqlite3.OperationalError as exc:
        return "locked by another process" if "locked" in str(exc) else str(exc)
    finally:
        conn.close()


async def write_problems(db: Database, data_dir: Path, timeout_s: float = 1.0) -> dict[str, str]:
    """{"database"|"disk": reason} for each way a write would fail now; empty when fine."""
    problems: dict[str, str] = {}
    path = sqlite_file(db)
    places = [data_dir] + ([Path(path)] if path else [])
    for place in places:
        try:
            if free_bytes(place) < MIN_FREE_BYTES:
                problems["disk"] = f"less than {MIN_FREE_BYTES // (1024 * 1024)} MB free"
        except OSError as exc:
            problems["disk"] = type(exc).__name__
    if path is not None:
        reason = await asyncio.to_thread(_sqlite_write_lock, path, timeout_s)
        if reason:
            problems["database"] = f"cannot take writes: {reason}"
    elif not db.is_sqlite:
        try:
            async with asyncio.timeout(timeout_s * 2), db.engine.connect() as conn:
                read_only = (await conn.execute(text("SHOW transaction_read_only"))).scalar()
            if read_only == "on":
                problems["database"] = "cannot take writes: read-only (a replica, or in recovery)"
        except (SQLAlchemyError, TimeoutError) as exc:
            problems["database"] = type(exc).__name__
    return problems
