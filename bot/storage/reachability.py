"""One line naming what is down: the database (DB_URL) or the queue (REDIS_URL), never a
traceback."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from bot.core.settings import ENV_PREFIX, Settings
from bot.storage.db import database_from_settings


def shown_url(url: str) -> str:
    """A database URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1]


def _cause(exc: BaseException) -> str:
    # the driver's own first line ("connection refused", "unable to open database file")
    inner: BaseException = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    return text[:300]


def database_error(settings: Settings, exc: BaseException) -> str:
    """The one line shown when the database cannot be reached."""
    where = settings.db_url and f"{ENV_PREFIX}DB_URL={shown_url(settings.db_url)}"
    where = where or f"the SQLite file {settings.sqlite_path} ({ENV_PREFIX}DB_URL is unset)"
    return f"cannot reach the database at {where}: {_cause(exc)}"


def is_database_error(exc: BaseException) -> bool:
    """True for the errors a database that is down or unreachable raises."""
    return isinstance(exc, OperationalError | DBAPIError) or (
        type(exc).__module__.split(".")[0] in ("psycopg", "sqlite3", "aiosqlite")
        and type(exc).__name__ in ("OperationalError", "InterfaceError")
    )


async def ping_database(settings: Settings, timeout: float = 5.0) -> str | None:
    """None when the database answers, else the line that says why not."""

    db = database_from_settings(settings)
    try:
        await asyncio.wait_for(db.ping(), timeout=timeout)
    except TimeoutError as exc:
        return database_error(settings, exc).replace(
            ": TimeoutError", f": no answer in {timeout:g} s"
        )
    except Exception as exc:
        if is_database_error(exc) or isinstance(exc, OSError):
            return database_error(settings, exc)
        raise
    finally:
        await db.dispose()
    return None


async def which_is_down(db: Any, redis: Any, settings: Settings) -> str:
    """For serve's start-up warning: which of the database and the queue did not answer."""
    down: list[str] = []
    try:
        await asyncio.wait_for(db.ping(), timeout=2)
    except Exception as exc:
        down.append(database_error(settings, exc))
    try:
        await asyncio.wait_for(redis.ping(), timeout=2)
    except Exception as exc:
        down.append(f"the queue at {ENV_PREFIX}REDIS_URL is unreachable ({type(exc).__name__})")
    return "; ".join(down) or "relaying pending deliveries failed"
