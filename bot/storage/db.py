"""Database access: the async engine, sessions, and SQLite tuning for durable group commit."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import select
import sqlite3
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from psycopg.types.json import set_json_dumps, set_json_loads
from sqlalchemy import event, exc, make_url, text
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bot.core import jsoncodec
from bot.core.settings import Settings

# How long any one database operation may take before the request gets a 503 (issue 20): the
# forges give a delivery 10 s, an operator should not stare at a hung page.
DEFAULT_DB_TIMEOUT_S = 2.5
# A pooled connection idle longer than this is pinged (a round trip) before it is handed out;
# one used more recently is only checked for a message the server sent while it sat in the pool.
PING_AFTER_IDLE_S = 5.0
_LAST_USED = "deksdenflow_last_used"  # in a pool record's info: monotonic time of its last checkin


def _sqlite_pragmas(
    dbapi_connection: Any, _record: Any, timeout_s: float = DEFAULT_DB_TIMEOUT_S
) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; FULL keeps every acknowledged delivery on disk
    # (the intake answers `accepted` only after its commit), busy_timeout absorbs the short
    # write lock held by a concurrent worker, and no more: a file locked by another process
    # must give a prompt 503, not a request that waits past the forge's timeout.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def sqlite_file(database: Database) -> str | None:
    """The file behind a SQLite database, or None (Postgres, in-memory, URI options)."""
    url = database.engine.url
    if not database.is_sqlite or url.query or url.database in (None, "", ":memory:"):
        return None
    return url.database


def connect_sqlite(path: str, timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> sqlite3.Connection:
    """A plain sqlite3 connection with the engine's PRAGMAs, in autocommit mode (explicit BEGIN).

    For the intake's dedicated writer thread: one thread hop per group commit instead of
    aiosqlite's hop per statement, and no SQL compilation on the event loop.
    """
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    _sqlite_pragmas(conn, None, timeout_s)
    return conn


@dataclass
class Database:
    """The engine plus a session factory; one per process."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    timeout_s: float = DEFAULT_DB_TIMEOUT_S
    # For work that is one statement (a read, an upsert): on Postgres in autocommit, so the
    # statement is its own transaction without a BEGIN and a ROLLBACK/COMMIT round trip each (a
    # step runs a dozen of these). Never for several statements that must be atomic.
    autocommit: AsyncEngine | None = None
    autocommit_sessions: async_sessionmaker[AsyncSession] | None = None

    @property
    def single(self) -> async_sessionmaker[AsyncSession]:
        """ORM sessions for one statement: autocommit ones where there are, else the usual."""
        return self.autocommit_sessions or self.sessions

    def one_statement(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A Core connection for one statement, committed when the block ends (a no-op in
        autocommit): no ORM session around a plain read or upsert."""
        return (self.autocommit or self.engine).begin()

    def one_read(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """one_statement() for a read: nothing to commit."""
        return (self.autocommit or self.engine).connect()

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def create_database(url: str, timeout_s: float = DEFAULT_DB_TIMEOUT_S) -> Database:
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": timeout_s}
        # on Postgres the driver decodes JSON columns (postgres_connector sets the codec there)
        kwargs.update(json_serializer=jsoncodec.dumps_text, json_deserializer=jsoncodec.loads)
    else:
        kwargs.update(
            pool_size=10,
            max_overflow=10,
            # pinged on checkout when idle, or when the server hung up (ping_when_idle)
            pool_timeout=timeout_s,  # waiting for a free connection counts too
            async_creator=postgres_connector(url, timeout_s),
        )
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(
            engine.sync_engine,
            "connect",
            lambda conn, record: _sqlite_pragmas(conn, record, timeout_s),
        )
    autocommit = None
    if not url.startswith("sqlite"):
        ping_when_idle(engine.sync_engine.pool, cast(DefaultDialect, engine.sync_engine.dialect))
        autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    return Database(
        engine=engine,
        sessions=async_sessionmaker(engine, expire_on_commit=False),
        timeout_s=timeout_s,
        autocommit=autocommit,
        autocommit_sessions=(
            None if autocommit is None else async_sessionmaker(autocommit, expire_on_commit=False)
        ),
    )


def _server_hung_up(dbapi_connection: Any) -> bool:
    """The server closed or ended this idle connection: its socket is readable (a FATAL
    message, or end of file) though we sent nothing. Costs one poll, no round trip."""
    try:
        fd = dbapi_connection.driver_connection.pgconn.socket
        readable, _, _ = select.select([fd], [], [], 0)
    except Exception:  # closed already, or no socket: ask the server
        return True
    return bool(readable)


def ping_when_idle(pool: Any, dialect: DefaultDialect, idle_s: float = PING_AFTER_IDLE_S) -> None:
    """The pool's pre-ping, with a round trip only where one can tell something.

    A step checks out a connection some twenty times, each within a second of the last use:
    SQLAlchemy's `pool_pre_ping` sent a round trip before every one. A server that restarts or
    ends a connection says so on its socket (a FATAL message, or end of file), seen here
    without a round trip; only a connection idle for `idle_s` (a proxy or a network may have
    dropped it without a word) is pinged. Either way a dead connection is replaced before use,
    as the pre-ping did.
    """

    def on_connect(_dbapi_connection: Any, record: Any) -> None:
        record.info[_LAST_USED] = time.monotonic()

    def on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_LAST_USED] = time.monotonic()

    def on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        used = record.info.get(_LAST_USED)
        hung_up = _server_hung_up(dbapi_connection)
        if not hung_up and used is not None and time.monotonic() - used < idle_s:
            return
        # the pre-ping's own call: a disconnect error reads as False, anything else raises
        if hung_up or not dialect._do_ping_w_event(dbapi_connection):
            # the pool replaces the connection and tries again (as after a failed pre-ping)
            raise exc.DisconnectionError("the pooled connection is gone")

    event.listen(pool, "connect", on_connect)
    event.listen(pool, "checkin", on_checkin)
    event.listen(pool, "checkout", on_checkout)


def database_from_settings(settings: Settings) -> Database:
    return create_database(settings.async_database_url, settings.db_timeout_s)


class DatabaseTimeout(psycopg.OperationalError):
    """The database did not answer in time; the connection was closed (SQLAlchemy drops it)."""


def _bounded(timeout_s: float) -> Any:
    return asyncio.timeout(timeout_s)


def _swallow(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as lost


def _wake(waiter: asyncio.Future[None], _: object = None) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _within(
    conn: psycopg.AsyncConnection[Any], work: Any, timeout_s: float, what: str
) -> Any:
    """Await `work` for at most `timeout_s`; past that close `conn` and raise DatabaseTimeout.

    Not `asyncio.timeout()` around the call: cancelling psycopg mid-query makes it send the
    server a cancel request and wait for that too, through the same dead network (seconds
    more). The work runs as a task that is abandoned (cancelled, never awaited) instead.

    One future woken by the task's end or by one timer, not `asyncio.wait`, which builds sets,
    a waiter and per-call callbacks around the same two events: the wrapper's own CPU goes
    from about 7.5 to 5 µs a statement on uvloop (the intake pays it once per commit).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    waiter: asyncio.Future[None] = loop.create_future()
    task.add_done_callback(functools.partial(_wake, waiter))
    timer = loop.call_later(timeout_s, _wake, waiter)
    try:
        await waiter
    except asyncio.CancelledError:  # our caller gave up: so does the statement
        task.add_done_callback(_swallow)
        task.cancel()
        raise
    finally:
        timer.cancel()
    if task.done():
        return task.result()
    task.add_done_callback(_swallow)
    task.cancel()
    with contextlib.suppress(Exception):
        # drop the socket now: the pool sees a closed connection and discards it
        conn.pgconn.finish()
    raise DatabaseTimeout(f"the database did not {what} within {timeout_s:g} s")


class TimedCursor(psycopg.AsyncCursor[Any]):
    """A cursor whose every statement has a client-side deadline.

    The server's statement_timeout cannot help when the server (or a proxy before it) stops
    answering: the client would wait for the TCP connection forever. Past the deadline the
    connection is closed, so the pool discards it, and the caller gets an OperationalError.
    """

    timeout_s: float = DEFAULT_DB_TIMEOUT_S

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        await _within(
            self.connection, super().execute(query, params, **kwargs), self.timeout_s, "answer"
        )
        return self

    async def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        await _within(
            self.connection,
            super().executemany(query, params_seq, **kwargs),
            self.timeout_s,
            "answer",
        )


class TimedConnection(psycopg.AsyncConnection[Any]):
    """Commit and rollback with the same deadline as statements."""

    timeout_s: float = DEFAULT_DB_TIMEOUT_S

    async def commit(self) -> None:
        await _within(self, super().commit(), self.timeout_s, "confirm a commit")

    async def rollback(self) -> None:
        await _within(self, super().rollback(), self.timeout_s, "roll back")


def postgres_connector(url: str, timeout_s: float) -> Any:
    """An `async_creator` for SQLAlchemy: psycopg connections with deadlines everywhere.

    Connect (libpq's connect_timeout, plus an outer bound), each statement and each commit
    (client-side, see TimedCursor), and on the server a statement_timeout and a lock_timeout so
    a query stuck behind a lock gives up there too.
    """
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    ms = int(timeout_s * 1000)
    cursor_class = type("BoundTimedCursor", (TimedCursor,), {"timeout_s": timeout_s})
    connection_class: type[TimedConnection] = type(
        "BoundTimedConnection", (TimedConnection,), {"timeout_s": timeout_s}
    )

    # A connection comes up in milliseconds when the server is well; the pool's ping of an idle
    # connection (ping_when_idle) may spend one statement deadline on a dead connection before
    # it connects anew, and the two together must stay within what a request may wait.
    connect_s = min(1.5, timeout_s)

    async def connect() -> psycopg.AsyncConnection[Any]:
        try:
            async with _bounded(connect_s):
                conn: psycopg.AsyncConnection[Any] = await connection_class.connect(
                    conninfo,
                    connect_timeout=2,  # libpq's own floor; the bound above comes first
                    options=f"-c statement_timeout={ms} -c lock_timeout={ms}",
                    cursor_factory=cursor_class,
                )
                # psycopg reads and writes the JSON columns itself: with the faster codec
                set_json_loads(jsoncodec.loads, conn)
                set_json_dumps(jsoncodec.dumps, conn)
                return conn
        except TimeoutError:
            raise DatabaseTimeout(
                f"could not connect to the database within {connect_s:g} s"
            ) from None

    return connect
