"""Durable intake: group-commit verified deliveries, answer, then enqueue.

The outbox relay is the backstop for deliveries stored but never enqueued.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import orjson
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.handlers.sansio import IncomingDelivery
from bot.storage.db import Database, connect_sqlite, postgres_connector, sqlite_file
from bot.storage.intake_pg import PostgresWriter
from bot.storage.models import WebhookDelivery, utcnow
from bot.storage.queue import JobSpec, delivery_job, enqueue_many

if TYPE_CHECKING:
    from arq.connections import ArqRedis

log = logging.getLogger(__name__)

StoreStatus = Literal["accepted", "duplicate"]
# (row id, True when this commit inserted it) per stored delivery, in batch order
Stored = list[tuple[int, bool]]


@dataclass(slots=True)
class _Pending:
    delivery: IncomingDelivery
    status: str
    future: asyncio.Future[tuple[StoreStatus, int]] = field(repr=False)
    # the loop time after which its request gets a 503 instead of waiting on (see _expire)
    deadline: float = float("inf")


def split_batch(items: Sequence[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
    """First copy of each delivery in the batch, and the later copies (duplicates).

    A copy has the same (provider, delivery key) or the same (provider, semantic key).
    """
    seen: set[tuple[str, str]] = set()
    firsts: list[_Pending] = []
    repeats: list[_Pending] = []
    for item in items:
        d = item.delivery
        ident = (d.provider, d.key)
        semantic = ("\0" + d.provider, d.semantic_key) if d.semantic_key else None
        if ident in seen or (semantic is not None and semantic in seen):
            repeats.append(item)
            continue
        firsts.append(item)
        seen.add(ident)
        if semantic is not None:
            seen.add(semantic)
    return firsts, repeats


def first_of(
    repeat: IncomingDelivery, ids: dict[tuple[str, str], int], semantic: dict[tuple[str, str], int]
) -> int:
    """The row id a batch-internal duplicate shares with its first copy."""
    found = ids.get((repeat.provider, repeat.key))
    if found is None and repeat.semantic_key:
        found = semantic.get((repeat.provider, repeat.semantic_key))
    return found or 0


# provider, delivery key, event, action, status, payload, headers JSON, semantic key
_Row = tuple[str, str, str, str | None, str, str, str, str | None]


class SqliteWriter:
    """Group commits on SQLite from one dedicated thread with its own sqlite3 connection.

    Through SQLAlchemy + aiosqlite a commit costs a thread hop (and a GIL hand-off) per
    statement plus compiling a multi-row INSERT on the event loop; here a whole batch is one
    hop. sqlite3 releases the GIL while it writes and fsyncs, so the loop keeps serving
    requests meanwhile. Values are encoded as the ORM would (same datetime format, JSON
    text), so rows read back exactly as if it had written them.

    Every sqlite3 call drops and retakes the GIL, and retaking it while the event loop is busy
    can wait a whole switch interval, so a batch is one call: a multi-row INSERT … ON CONFLICT
    DO NOTHING in autocommit mode. New rows of a rowid table get consecutive ids under the
    write lock, so when every row went in, the ids follow from `lastrowid`; only a batch that
    met stored keys pays for one more statement to look their ids up.
    """

    _TABLE = WebhookDelivery.__tablename__
    _COLUMNS = (
        "provider, delivery_key, event, action, status, payload, headers, semantic_key, outcome,"
        " attempts, received_at"
    )
    _ROW = "(?, ?, ?, ?, ?, ?, ?, ?, '{}', 0, ?)"
    _CHUNK = 500  # rows per statement: 9 variables each, far under SQLite's 32766

    CHECKPOINT_EVERY_S = 0.5

    def __init__(self, path: str, timeout_s: float = 3.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delivery-writer")
        self._conn: sqlite3.Connection | None = None
        # WAL checkpoints (copying the log into the database file, with an fsync) run on their
        # own thread and connection: done by the committing connection, as SQLite does by
        # default, one commit in a few hundred waits tens of milliseconds and so do the
        # deliveries behind it.
        self._checkpointer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="delivery-checkpoint"
        )
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpoint_pending = False
        self._last_checkpoint = 0.0
        self._closing = threading.Event()  # a checkpoint waiting for its turn gives up
        dialect = sqlite.dialect()
        self._datetime = WebhookDelivery.__table__.c.received_at.type.dialect_impl(
            dialect
        ).bind_processor(dialect)

    async def write(self, items: Sequence[_Pending]) -> Stored:
        rows: list[_Row] = [
            (
                p.delivery.provider,
                p.delivery.key,
                p.delivery.event,
                p.delivery.action,
                p.status,
                p.delivery.body,
                orjson.dumps(p.delivery.headers).decode(),
                p.delivery.semantic_key,
            )
            for p in items
        ]
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._write, rows)

    def _ids(
        self, cur: sqlite3.Cursor, provider: str, column: str, keys: Sequence[str]
    ) -> dict[str, int]:
        """{key: id} of the stored keys among `keys` in `column` (delivery_key or semantic_key)."""
        found: dict[str, int] = {}
        for i in range(0, len(keys), self._CHUNK):
            chunk = keys[i : i + self._CHUNK]
            marks = ", ".join("?" * len(chunk))
            # one aggregated row instead of one step (and one GIL round trip) per key
            (pairs,) = cur.execute(
                f"SELECT json_group_array(json_array({column}, id)) FROM {self._TABLE}"
                f" WHERE provider = ? AND {column} IN ({marks})",
                (provider, *chunk),
            ).fetchone()
            found.update((key, int(row_id)) for key, row_id in json.loads(pairs))
        return found

    def _checkpoint(self, due: float) -> None:
        # Waits for its turn on the checkpoint thread, so the frames of a burst's last writes
        # are copied within CHECKPOINT_EVERY_S even when no write follows: left for the first
        # write after a quiet spell, a burst's backlog (megabytes) was checkpointed just as
        # deliveries arrived one by one again, and their commits' fsyncs waited behind it
        # (bench/intake.py: p99 of 50-260 ms at 100 req/s after the throughput phase).
        if self._closing.wait(max(0.0, due - time.monotonic())):
            self._checkpoint_pending = False
            return
        # a write from here on schedules the next round (this one may not see its frames)
        self._checkpoint_pending = False
        self._last_checkpoint = time.monotonic()
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = connect_sqlite(self.path)
            # PASSIVE: copies what no reader still needs, never blocks the writer
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # a later round retries; the WAL just grows meanwhile
            log.warning("WAL checkpoint failed: %s", exc)

    def _maybe_checkpoint(self) -> None:
        """After a write: a checkpoint at most CHECKPOINT_EVERY_S after the last one."""
        if not self._checkpoint_pending:
            self._checkpoint_pending = True
            self._checkpointer.submit(
                self._checkpoint, self._last_checkpoint + self.CHECKPOINT_EVERY_S
            )

    def _write(self, rows: list[_Row]) -> Stored:
        if self._conn is None:
            self._conn = connect_sqlite(self.path, self.timeout_s)
            self._conn.execute("PRAGMA wal_autocheckpoint=0")  # see _checkpoint
        now = utcnow()
        received = self._datetime(now) if self._datetime else now
        cur = self._conn.cursor()
        out: Stored = []
        try:
            for i in range(0, len(rows), self._CHUNK):
                chunk = rows[i : i + self._CHUNK]
                # One statement in autocommit mode is one transaction: it takes the write lock
                # (busy_timeout waits out a worker's write), inserts, and returns only once
                # the commit is durable (synchronous=FULL). Nothing else inserts meanwhile,
                # so the rows it added got consecutive ids.
                cur.execute(
                    f"INSERT INTO {self._TABLE} ({self._COLUMNS})"
                    f" VALUES {', '.join([self._ROW] * len(chunk))}"
                    # either unique key: the delivery id, or the semantic key of a replay
                    " ON CONFLICT DO NOTHING",
                    [value for row in chunk for value in (*row, received)],
                )
                inserted = cur.rowcount
                first_new = (cur.lastrowid or 0) - inserted + 1
                if inserted == len(chunk):
                    out.extend((first_new + n, True) for n in range(len(chunk)))
                    continue
                # Some keys were stored before: look their ids up (rows are never re-keyed,
                # so reading after the commit is as good as inside it). The batch holds no two
                # rows with one key (split_batch), so a row found by its own keys at or past
                # `first_new` is one this statement inserted.
                by_provider: dict[str, list[str]] = {}
                by_semantic: dict[str, list[str]] = {}
                for row in chunk:
                    by_provider.setdefault(row[0], []).append(row[1])
                    if row[7]:
                        by_semantic.setdefault(row[0], []).append(row[7])
                ids = {
                    (p, k): i
                    for p, keys in by_provider.items()
                    for k, i in self._ids(cur, p, "delivery_key", keys).items()
                }
                semantic = {
                    (p, k): i
                    for p, keys in by_semantic.items()
                    for k, i in self._ids(cur, p, "semantic_key", keys).items()
                }
                for row in chunk:
                    row_id = ids.get((row[0], row[1]), 0)
                    own = (
                        row_id >= first_new
                        and semantic.get((row[0], row[7] or ""), row_id) == row_id
                    )
                    if not row_id and row[7]:
                        row_id = semantic.get((row[0], row[7]), 0)
                    out.append((row_id, inserted > 0 and own))
        finally:
            cur.close()
        self._maybe_checkpoint()
        return out

    def close(self) -> None:
        self._closing.set()
        # each connection is closed on the thread that used it
        for executor, name in ((self._executor, "_conn"), (self._checkpointer, "_checkpoint_conn")):
            executor.submit(self._close_connection, name).result()
            executor.shutdown(wait=True)

    def _close_connection(self, name: str) -> None:
        conn: sqlite3.Connection | None = getattr(self, name)
        if conn is not None:
            conn.close()
            setattr(self, name, None)


class DeliveryStore:
    """Batches concurrent deliveries into one INSERT … ON CONFLICT DO NOTHING per commit.

    Each request awaits the commit that made its row durable, so `accepted` is only ever
    answered for a stored delivery. While a commit runs, new arrivals queue up and go in the
    next one: throughput grows with load instead of paying one fsync per request.

    SQLite has one writer, so one commit runs at a time. On Postgres a commit's time is mostly
    the wait for its WAL flush, when neither this process nor the server has work to do; with
    `PG_COMMITS_IN_FLIGHT` batches on as many held connections, the next batch is inserted
    while the previous one waits (and the server flushes both with one write when it can), as
    long as it is large enough to be worth a commit of its own (`PG_SECOND_BATCH_MIN`).
    """

    # Two: enough to overlap one batch's WAL flush with the next batch's insert. Each slot more
    # makes batches smaller, and a commit costs the server about 300 µs of CPU (its WAL flush)
    # whatever its size, against about 30 µs per 4 KB row (measured on the 2-core VM).
    PG_COMMITS_IN_FLIGHT = 2
    # Under load the second slot used to start a commit for whatever had arrived, often one or
    # two deliveries: a server commit each. Now a batch smaller than this waits for the commit
    # under way and goes with the next arrivals in one larger batch (on the uvloop bench ~8 → ~10
    # rows a commit, the server's and the app's CPU per delivery both ~10 % less). It waits
    # at most PG_SECOND_BATCH_WAIT_S, so a commit stuck on another transaction's key lock does
    # not hold up the deliveries behind it.
    PG_SECOND_BATCH_MIN = 16
    PG_SECOND_BATCH_WAIT_S = 0.01

    def __init__(
        self,
        db: Database,
        on_stored: Callable[[list[JobSpec]], Awaitable[None]],
        batch_max: int = 256,
        enqueue_interval_s: float = 0.02,
    ) -> None:
        self.db = db
        self.on_stored = on_stored
        self.batch_max = batch_max
        self.enqueue_interval_s = enqueue_interval_s
        self._last_enqueue = float("-inf")
        # a plain list plus an event: cheaper per request than asyncio.Queue's put/get
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._commits: set[asyncio.Task[None]] = set()
        # the batch each commit slot is storing, for the deadline watchdog
        self._in_flight: dict[int, list[_Pending]] = {}
        # when each slot's commit started (loop time), and the timer that ends a wait for it
        self._started: dict[int, float] = {}
        self._hold_timer: asyncio.TimerHandle | None = None
        # one timer for every waiting request (see _expire) instead of an asyncio.timeout each
        self._watchdog: asyncio.TimerHandle | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._enqueue_buffer: list[JobSpec] = []
        self._sqlite_path = sqlite_file(db)
        self._writer: SqliteWriter | None = None
        # one held connection per commit slot; a slot is free while its index is in the list
        self._pg_writers: list[PostgresWriter] = []
        self._free_slots: list[int] = [0]
        # what a request waits for its commit at most (then 503): the database's own deadline
        # and a second more for the batch ahead of it, well within the forges' 10 s
        self.deadline_s = db.timeout_s + 1.0

    def start(self) -> None:
        if self._task is None:
            if self._sqlite_path is not None:
                self._writer = SqliteWriter(self._sqlite_path, self.db.timeout_s)
            elif not self.db.is_sqlite:
                url = self.db.engine.url.render_as_string(hide_password=False)
                connect = postgres_connector(url, self.db.timeout_s)
                self._pg_writers = [
                    PostgresWriter(connect) for _ in range(self.PG_COMMITS_IN_FLIGHT)
                ]
                self._free_slots = list(range(self.PG_COMMITS_IN_FLIGHT))
            self._task = asyncio.create_task(self._run(), name="delivery-store")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._commits:  # let the commits under way finish: their waiters get answered
            await asyncio.wait(set(self._commits), timeout=self.deadline_s)
        for item in self._pending:  # never answered: the forge redelivers
            if not item.future.done():
                item.future.set_exception(RuntimeError("the intake is shutting down"))
        self._pending.clear()
        if self._drainer is not None:
            await asyncio.gather(self._drainer, return_exceptions=True)
        if self._enqueue_buffer:  # committed after the drainer's last round
            await self._drain_enqueues()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)
            self._writer = None
        for writer in self._pg_writers:
            await writer.close()

    async def store(
        self, delivery: IncomingDelivery, status: str = "pending"
    ) -> tuple[StoreStatus, int]:
        """Make the delivery durable; `status="ignored"` stores it without enqueueing.

        Raises TimeoutError when its commit has not ended within `deadline_s` (the caller
        answers 503; the row may still be committed later, and the redelivery is a duplicate).
        """
        if self._task is None:
            raise RuntimeError("DeliveryStore.start() was not called")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[StoreStatus, int]] = loop.create_future()
        deadline = loop.time() + self.deadline_s
        self._pending.append(_Pending(delivery, status, future, deadline))
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._expire)
        # Wake the batching loop only when it can start a commit now: with every slot busy,
        # a commit's end wakes it; while a small batch waits for the commit under way, the
        # hold's timer does. Otherwise an arrival that found the loop idle woke it (a task
        # switch) only for it to find nothing to do: on the uvloop Postgres bench 0.107 wakes
        # per delivery before, 0.078 after.
        if self._free_slots and (
            self._hold_timer is None
            or not self._in_flight
            or len(self._pending) >= self.PG_SECOND_BATCH_MIN
        ):
            self._wakeup.set()
        return await future

    def _expire(self) -> None:
        """Fail the waiters whose deadline passed, then sleep until the next deadline.

        A request used to wrap its wait in `asyncio.timeout`, which costs a timer, a context
        manager and a reschedule per request: on the uvloop server that was about as much CPU
        as the request's whole share of the commit. One timer for all of them does the same:
        deadlines come in arrival order, and waiters sit in the pending list (oldest first)
        or in a commit slot's batch.
        """
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        following = float("inf")
        for batch in (self._pending, *self._in_flight.values()):
            for item in batch:
                if item.future.done():
                    continue
                if item.deadline > now:
                    following = min(following, item.deadline)
                    break  # the rest of this batch came later
                item.future.set_exception(TimeoutError(f"not stored within {self.deadline_s:g} s"))
        if following != float("inf"):
            self._watchdog = loop.call_at(following, self._expire)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Everything that arrived while the commits under way ran goes into the next one;
            # a commit that ends sets the event again when deliveries are waiting.
            while self._pending and self._free_slots and not self._wait_for_commit():
                slot = self._free_slots.pop()
                batch = self._pending[: self.batch_max]
                del self._pending[: self.batch_max]
                # registered now, not when the task starts: the watchdog must see it meanwhile
                self._in_flight[slot] = batch
                self._started[slot] = asyncio.get_running_loop().time()
                task = asyncio.create_task(self._commit_batch(batch, slot))
                self._commits.add(task)
                task.add_done_callback(self._commits.discard)

    def _wait_for_commit(self) -> bool:
        """True when the few pending deliveries should wait for the commit under way."""
        if not self._in_flight or len(self._pending) >= self.PG_SECOND_BATCH_MIN:
            return False
        loop = asyncio.get_running_loop()
        until = min(self._started.values()) + self.PG_SECOND_BATCH_WAIT_S
        if loop.time() >= until:
            return False
        if self._hold_timer is None:  # a commit that ends first wakes the loop up too
            self._hold_timer = loop.call_at(until, self._end_wait)
        return True

    def _end_wait(self) -> None:
        self._hold_timer = None
        self._wakeup.set()

    async def _commit_batch(self, batch: list[_Pending], slot: int) -> None:
        try:
            new_ids = await self._commit(batch, slot)
        except Exception as exc:  # the edge answers 503; the forge will show the failure
            log.exception("storing %d deliveries failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            new_ids = []
        finally:
            self._in_flight.pop(slot, None)
            self._started.pop(slot, None)
            self._free_slots.append(slot)
            if self._pending:
                self._wakeup.set()
        if new_ids:
            # one enqueuer at a time: ids committed while it talks to Redis wait and go
            # together in its next round (fewer round trips under load)
            self._enqueue_buffer.extend(new_ids)
            # done(), not a set emptied by a done-callback: that callback runs a loop turn after
            # the drainer's last look at the buffer, and ids added in between waited there
            # for the next commit (or, at shutdown, for the outbox relay)
            if self._drainer is None or self._drainer.done():
                self._drainer = asyncio.create_task(self._drain_enqueues())

    async def _drain_enqueues(self) -> None:
        # A Redis call costs the client far more than the jobs it carries, so under load calls
        # are spaced by `enqueue_interval_s` and each takes everything committed meanwhile.
        # A lone delivery is enqueued at once; under load a job starts at most that much later.
        loop = asyncio.get_running_loop()
        while self._enqueue_buffer:
            wait = self._last_enqueue + self.enqueue_interval_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            jobs = self._enqueue_buffer[:]
            self._enqueue_buffer.clear()
            self._last_enqueue = loop.time()
            await self._after_commit(jobs)

    async def _after_commit(self, ids: list[JobSpec]) -> None:
        try:
            await self.on_stored(ids)
        except Exception as exc:  # the outbox relay picks these up later
            log.warning(
                "enqueue of %d stored deliveries failed (%s); the relay will retry", len(ids), exc
            )

    async def _commit(self, batch: list[_Pending], slot: int = 0) -> list[JobSpec]:
        """Store the batch in one transaction, resolve every waiter, return the jobs to enqueue."""
        firsts, repeats = split_batch(batch)
        if self._writer is not None:
            stored = await self._writer.write(firsts)
        elif self._pg_writers:
            stored = await self._pg_writers[slot].write(firsts)
        else:
            stored = await self._commit_sqlalchemy(firsts)
        to_enqueue: list[JobSpec] = []
        for item, (row_id, inserted) in zip(firsts, stored, strict=True):
            if inserted and item.status == "pending":
                to_enqueue.append(delivery_job(row_id, item.delivery.provider, item.delivery.key))
            if not item.future.done():  # a waiter cancelled by a disconnect
                item.future.set_result(("accepted" if inserted else "duplicate", row_id))
        if repeats:  # copies within the batch share their first copy's row
            ids = {
                (i.delivery.provider, i.delivery.key): row_id
                for i, (row_id, _) in zip(firsts, stored, strict=True)
            }
            semantic = {
                (i.delivery.provider, i.delivery.semantic_key): ids[
                    (i.delivery.provider, i.delivery.key)
                ]
                for i in firsts
                if i.delivery.semantic_key
            }
            for item in repeats:
                if not item.future.done():
                    item.future.set_result(("duplicate", first_of(item.delivery, ids, semantic)))
        return to_enqueue

    async def _commit_sqlalchemy(self, firsts: list[_Pending]) -> Stored:
        """In-memory SQLite (tests): one INSERT … ON CONFLICT DO NOTHING per batch."""
        now = utcnow()
        rows = [
            {
                "provider": p.delivery.provider,
                "delivery_key": p.delivery.key,
                "event": p.delivery.event,
                "action": p.delivery.action,
                "status": p.status,
                "payload": p.delivery.body,
                "headers": p.delivery.headers,
                "outcome": {},
                "attempts": 0,
                "received_at": now,
                "semantic_key": p.delivery.semantic_key,
            }
            for p in firsts
        ]
        insert_fn = sqlite_insert if self.db.is_sqlite else pg_insert
        stmt = (
            insert_fn(WebhookDelivery)
            .values(rows)
            # either unique key: the delivery id, or the semantic key of a replay
            .on_conflict_do_nothing()
            .returning(WebhookDelivery.id, WebhookDelivery.provider, WebhookDelivery.delivery_key)
        )
        async with self.db.engine.begin() as conn:
            inserted = {
                (r.provider, r.delivery_key): r.id for r in (await conn.execute(stmt)).all()
            }
            left = [
                p.delivery for p in firsts if (p.delivery.provider, p.delivery.key) not in inserted
            ]
            existing: dict[tuple[str, str], int] = {}
            by_semantic: dict[tuple[str, str], int] = {}
            if left:
                keys = {d.key for d in left}
                semantic_keys = {d.semantic_key for d in left if d.semantic_key}
                found = await conn.execute(
                    select(
                        WebhookDelivery.id,
                        WebhookDelivery.provider,
                        WebhookDelivery.delivery_key,
                        WebhookDelivery.semantic_key,
                    ).where(
                        or_(
                            WebhookDelivery.delivery_key.in_(keys),
                            WebhookDelivery.semantic_key.in_(semantic_keys),
                        )
                    )
                )
                for r in found.all():
                    existing[(r.provider, r.delivery_key)] = r.id
                    if r.semantic_key:
                        by_semantic[(r.provider, r.semantic_key)] = r.id
        out: Stored = []
        for p in firsts:
            ident = (p.delivery.provider, p.delivery.key)
            if ident in inserted:
                out.append((inserted[ident], True))
            else:
                out.append((first_of(p.delivery, existing, by_semantic), False))
        return out


def _job_columns() -> Any:
    """What a pending delivery's job needs: a SELECT of those columns only."""
    return select(
        WebhookDelivery.id,
        WebhookDelivery.provider,
        WebhookDelivery.delivery_key,
        WebhookDelivery.attempts,
    )


def _jobs(rows: Sequence[Any]) -> list[JobSpec]:
    return [delivery_job(r.id, r.provider, r.delivery_key, r.attempts) for r in rows]


async def pending_deliveries(
    db: Database, older_than_s: float = 0.0, after_id: int = 0, limit: int = 500
) -> list[JobSpec]:
    """Jobs for deliveries stored but not yet taken by a worker (the outbox), oldest first."""
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
    async with db.sessions() as session:
        result = await session.execute(
            _job_columns()
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.received_at <= cutoff,
                WebhookDelivery.id > after_id,
            )
            .order_by(WebhookDelivery.id)
            .limit(limit)
        )
        return _jobs(result.all())


async def take_back_expired(db: Database) -> int:
    """Expired `processing` leases back to `pending`: their worker died (or lost the database).

    A live worker renews its lease while it works, so only a dead one's claim runs out; a row
    left `processing` without a lease (from before leases existed) counts as expired.
    """
    async with db.sessions.begin() as session:
        result = await session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.status == "processing",
                or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < utcnow()),
            )
            .values(status="pending", claimed_by=None, lease_until=None)
            .execution_options(synchronize_session=False)
        )
        taken: int = result.rowcount  # type: ignore[attr-defined]
    if taken:
        log.warning("took back %d deliveries whose worker's lease expired", taken)
    return taken


async def mark_enqueued(db: Database, ids: Sequence[int]) -> None:
    if not ids:
        return
    async with db.sessions.begin() as session:
        await session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(enqueued_at=utcnow())
        )


# A delivery that is done with (processed, or ignored) is history: after the retention period
# its row (and its multi-kilobyte payload) goes. Failed and pending ones stay until someone
# looks. Events written about a delivery keep its id and outlive it. The newest row always
# stays: SQLite hands out max(id) + 1, so deleting it would give its id to the next delivery.
PRUNABLE_STATUSES = ("processed", "ignored")


async def prune_deliveries(db: Database, older_than: datetime, batch: int = 5000) -> int:
    """Delete finished deliveries received before `older_than`, in short transactions."""
    total = 0
    while True:
        async with db.sessions.begin() as session:
            ids = (
                (
                    await session.execute(
                        select(WebhookDelivery.id)
                        .where(
                            WebhookDelivery.status.in_(PRUNABLE_STATUSES),
                            WebhookDelivery.received_at < older_than,
                            WebhookDelivery.id
                            < select(func.max(WebhookDelivery.id)).scalar_subquery(),
                        )
                        .order_by(WebhookDelivery.id)
                        .limit(batch)
                    )
                )
                .scalars()
                .all()
            )
            if ids:
                await session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(ids)))
        total += len(ids)
        if len(ids) < batch:
            return total


async def _reissue_started(db: Database, redis: ArqRedis, jobs: list[JobSpec]) -> list[JobSpec]:
    """New job ids for pending deliveries whose job already started or finished in Redis.

    A pending row whose job is "in progress" or has a result was never claimed: its worker died
    between taking the job and claiming the row (arq keeps that job's in-progress key for the
    whole job timeout), or the job ended without getting to it. Re-enqueueing under the same id
    would be refused, so the row's attempt counter moves on and names a fresh job; the claim
    (a compare-and-set in the database) keeps a late original from running it a second time.
    """
    from arq.constants import in_progress_key_prefix, result_key_prefix

    async with redis.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.exists(in_progress_key_prefix + job.job_id, result_key_prefix + job.job_id)
        started = await pipe.execute()
    stale = [job for job, n in zip(jobs, started, strict=True) if n]
    if not stale:
        return jobs
    ids = [int(job.kwargs["delivery_id"]) for job in stale]
    async with db.sessions.begin() as session:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == "pending")
            .values(attempts=WebhookDelivery.attempts + 1)
            .execution_options(synchronize_session=False)
        )
    log.warning(
        "re-issuing %d pending deliveries whose job started but never claimed them", len(stale)
    )
    fresh = {job.job_id: job for job in await pending_deliveries_by_id(db, ids)}
    return [job for job in jobs if job not in stale] + list(fresh.values())


async def pending_deliveries_by_id(db: Database, ids: Sequence[int]) -> list[JobSpec]:
    async with db.sessions() as session:
        result = await session.execute(
            _job_columns()
            .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == "pending")
            .order_by(WebhookDelivery.id)
        )
        return _jobs(result.all())


async def relay_outbox(db: Database, redis: ArqRedis, older_than_s: float = 0.0) -> int:
    """Enqueue stored-but-pending deliveries (and expired claims).

    Job ids make a second relay a no-op.
    """

    await take_back_expired(db)
    total = 0
    cursor = 0
    while True:
        jobs = await pending_deliveries(db, older_than_s=older_than_s, after_id=cursor)
        if not jobs:
            return total
        jobs = await _reissue_started(db, redis, jobs)
        total += await enqueue_many(redis, jobs)
        ids = [int(job.kwargs["delivery_id"]) for job in jobs]
        await mark_enqueued(db, ids)
        cursor = max(ids)
