"""The step transcript: engine events turned into short, redacted items, stored in batches."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import queue
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, text

from bot.storage.db import Database, sqlite_file
from bot.storage.models import TranscriptChunk, utcnow

log = logging.getLogger(__name__)

TEXT_LIMIT = 4000  # one message or reasoning summary as shown
OUTPUT_TAIL = 2000  # the end of a command's output: where errors and summaries are
FLUSH_INTERVAL_S = 0.25  # how stale the live page may be; also the batch window
REDACTED = "[redacted]"
_MIN_SECRET = 6  # shorter values would redact ordinary words and numbers

# Environment variables whose values are secrets wherever they appear in a transcript.
_SECRET_ENV_NAMES = ("CODEX_API_KEY", "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY")
_SECRET_ENV_SUFFIXES = ("_TOKEN", "_SECRET", "_PASSWORD", "_API_KEY", "_PRIVATE_KEY")


def secret_values(
    settings_secrets: Iterable[str],
    project_secrets: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """Every value that must never reach the transcript, longest first (so overlaps redact fully).

    The worker's own settings secrets, the project's stored secrets, and environment variables
    that look like credentials (the model key codex is given among them).
    """
    env = os.environ if environ is None else environ
    found = {v for v in settings_secrets if isinstance(v, str)}
    found |= {str(v) for v in (project_secrets or {}).values() if isinstance(v, str | int)}
    found |= {
        value
        for name, value in env.items()
        if name.upper() in _SECRET_ENV_NAMES or name.upper().endswith(_SECRET_ENV_SUFFIXES)
    }
    return tuple(sorted((v for v in found if len(v) >= _MIN_SECRET), key=len, reverse=True))


def redact(value: Any, secrets: tuple[str, ...]) -> Any:
    """`value` with every secret replaced, inside strings, lists and dicts (pure)."""
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, list):
        return [redact(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    return value


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" … [{len(text) - limit} more]"


def _tail(text: str, limit: int) -> str:
    return (
        text
        if len(text) <= limit
        else f"[{len(text) - limit} earlier characters] …" + text[-limit:]
    )


def _relative(path: str, workdir: Path | None) -> str:
    if workdir is not None:
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(workdir))
    return path


def transcript_entry(
    event: Mapping[str, Any], workdir: Path | None = None
) -> dict[str, Any] | None:
    """The transcript item for one Codex JSONL event, or None for events not worth showing (pure).

    Returns {"kind", "text", "data"}; the shapes follow `codex exec --json` (the scripted
    engine emits the same ones).
    """
    kind = event.get("type")
    if kind == "turn.started":
        return {"kind": "turn", "text": "turn started", "data": {}}
    if kind == "turn.completed":
        usage = event.get("usage") if isinstance(event.get("usage"), dict) else {}
        assert isinstance(usage, dict)
        text = (
            f"tokens: {usage.get('input_tokens', 0):,} in"
            f" ({usage.get('cached_input_tokens', 0):,} cached),"
            f" {usage.get('output_tokens', 0):,} out"
        )
        return {"kind": "usage", "text": text, "data": {"usage": usage}}
    if kind == "turn.failed":
        error = event.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        return {
            "kind": "error",
            "text": _cut(str(message or "turn failed"), TEXT_LIMIT),
            "data": {},
        }
    if kind == "error":
        return {
            "kind": "error",
            "text": _cut(str(event.get("message", "")), TEXT_LIMIT),
            "data": {},
        }
    if kind not in ("item.started", "item.completed"):
        return None
    item = event.get("item")
    if not isinstance(item, dict):
        return None
    itype = item.get("type")
    started = kind == "item.started"
    if itype == "command_execution":
        command = str(item.get("command", ""))
        if started:
            return {"kind": "command", "text": _cut(command, 1000), "data": {"status": "running"}}
        output = item.get("aggregated_output")
        return {
            "kind": "command",
            "text": _cut(command, 1000),
            "data": {
                "status": item.get("status", "completed"),
                "exit_code": item.get("exit_code"),
                "output": _tail(output, OUTPUT_TAIL) if isinstance(output, str) else "",
            },
        }
    if started:  # only commands are worth a line before they finish
        return None
    if itype == "agent_message":
        return {"kind": "message", "text": _cut(str(item.get("text", "")), TEXT_LIMIT), "data": {}}
    if itype == "reasoning":
        return {
            "kind": "reasoning",
            "text": _cut(str(item.get("text", "")), TEXT_LIMIT),
            "data": {},
        }
    if itype == "file_change":
        changes = [
            {"path": _relative(str(c.get("path", "")), workdir), "kind": str(c.get("kind", ""))}
            for c in item.get("changes") or []
            if isinstance(c, dict)
        ][:200]
        text = ", ".join(f"{c['kind']} {c['path']}" for c in changes)
        return {"kind": "file_change", "text": _cut(text, 1000), "data": {"changes": changes}}
    if itype == "error":
        return {"kind": "error", "text": _cut(str(item.get("message", "")), TEXT_LIMIT), "data": {}}
    if itype in ("mcp_tool_call", "web_search", "todo_list"):
        detail = item.get("query") or item.get("tool") or item.get("server") or ""
        return {"kind": "tool", "text": _cut(f"{itype} {detail}".strip(), 1000), "data": {}}
    return None


# An item's id is its chunk's id times ID_SPAN plus its line in the chunk: stable, increasing,
# and a cursor (`after`, `before`) for the live stream and for paging.
ID_SPAN = 1000
CHUNK_LINES = 500  # lines per stored chunk: a first screen never parses more than a few
MAX_PENDING_BYTES = 8 * 1024 * 1024  # a batch is handed over early past this (a long burst)
RAW_LIMIT = 16 * 1024  # a longer line (huge command output) is stored as the engine's compact event


def _sqlite_time(when: datetime) -> str:
    # how SQLAlchemy stores a DateTime in SQLite, so the ORM reads these rows back unchanged
    return when.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def _needles(secrets: tuple[str, ...]) -> tuple[tuple[bytes, bytes], ...]:
    """Each secret as it appears inside a JSON line (escaped), and what replaces it."""
    out: list[tuple[bytes, bytes]] = []
    for secret in secrets:
        for form in {secret, json.dumps(secret)[1:-1]}:
            out.append((form.encode(), REDACTED.encode()))
    return tuple(out)


def _libc_memmem() -> Any:
    # The C library's memmem, called through ctypes: ctypes lets go of the GIL for the call,
    # and glibc's search is several times faster than `in` (0.3 ms against 1.4 ms for two
    # secrets in a 5,000-event turn). The writer looks for every secret in every batch, and
    # while it holds the GIL the engine's reading loop waits. None where there is no memmem.
    try:
        found = ctypes.CDLL(None).memmem
    except (OSError, AttributeError):
        return None
    found.restype = ctypes.c_void_p
    found.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    return found


_MEMMEM = _libc_memmem()


def _holds(data: bytes, needle: bytes) -> bool:
    if _MEMMEM is None or len(data) < 4096:  # a short text: the call costs more than `in`
        return needle in data
    return _MEMMEM(data, len(data), needle, len(needle)) is not None


def redact_line(line: bytes, needles: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """JSONL bytes with every secret replaced (no decoding; a secret never spans two lines)."""
    for needle, replacement in needles:
        if _holds(line, needle):
            line = line.replace(needle, replacement)
    return line


def chunk_bodies(
    blocks: list[bytes], lines: int, needles: tuple[tuple[bytes, bytes], ...]
) -> list[tuple[int, str]]:
    """Blocks of whole JSONL lines (`lines` in all) as (line count, redacted text) chunks (pure).

    Joining, redacting and decoding happen once per batch, in C; a batch is cut into chunks of
    CHUNK_LINES only when one block brought more lines than a chunk holds.
    """
    body = redact_line(blocks[0] if len(blocks) == 1 else b"".join(blocks), needles)
    if lines <= CHUNK_LINES:
        return [(lines, _text(body))]
    parts = body.split(b"\n")
    parts.pop()  # the empty rest after the last newline
    return [
        (len(part), _text(b"\n".join(part)))
        for part in (parts[i : i + CHUNK_LINES] for i in range(0, len(parts), CHUNK_LINES))
    ]


def _text(body: bytes) -> str:
    end = len(body)
    while end and body[end - 1] in b"\r\n":  # decoded from a view: no copy to strip it
        end -= 1
    return str(memoryview(body)[:end], "utf-8", "replace")


_IDLE_CHECK_S = 30.0  # how often an idle writer checks that its turn's loop still runs

_INSERT_SQL = (
    "INSERT INTO transcript_chunks (protocol_run_id, step_run_id, phase, lines, body, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)

# A batch on Postgres, in autocommit: the rows as arrays, and set_config(…, true), which is SET
# LOCAL, for the statement's own transaction (volatile, so run for each row before it is
# inserted; the commit reads the setting before it is reset): one round trip where BEGIN, SET
# LOCAL, the INSERT and COMMIT were four, each turn's last one on the step's path.
_PG_INSERT = text(
    "INSERT INTO transcript_chunks (protocol_run_id, step_run_id, phase, lines, body, created_at)"
    " SELECT r.p, r.s, r.ph, r.n, r.b, :created"
    " FROM unnest(CAST(:p AS integer[]), CAST(:s AS integer[]), CAST(:ph AS varchar[]),"
    " CAST(:n AS integer[]), CAST(:b AS text[])) AS r(p, s, ph, n, b)"
    " WHERE set_config('synchronous_commit', 'off', true) = 'off'"
)


class TranscriptRecorder:
    """An engine sink that stores a turn's events in batches from a writer thread of its own.

    An engine that reads JSONL hands over its bytes a block of lines at a time (`add_lines`):
    the reading loop pays one list append per block and nothing per event; it never waits for
    the database, and never redacts, encodes or copies a batch. Events with no bytes of their
    own come one by one (`add`). A batch is a time window: it goes to the writer
    FLUSH_INTERVAL_S after its first line (so the live page is never staler than that), at
    `finish()`, or early when it holds MAX_PENDING_BYTES. Within a window the lines are
    grouped into chunks of at most CHUNK_LINES. A burst faster than the window is therefore
    stored once it has been read, not beside the reading: the writer thread's work (and its
    turns at the GIL) would otherwise come out of the engine's reading loop. The writer redacts
    a batch on the bytes and stores it; on SQLite on its own connection, where sqlite3 releases
    the GIL while it writes, on other databases through the loop's async engine. One thread
    writes every batch of the turn, in order, so chunk ids follow arrival.

    `finish()` hands over the rest without waiting, so the caller records the turn while the
    last batch is written; `wait_stored()` waits for the writer; `close()` is both.
    """

    def __init__(
        self,
        db: Database,
        *,
        protocol_run_id: int,
        step_run_id: int | None,
        phase: str,
        secrets: tuple[str, ...] = (),
        workdir: Path | None = None,
        interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        self.db = db
        self.protocol_run_id = protocol_run_id
        self.step_run_id = step_run_id
        self.phase = phase
        self.needles = _needles(secrets)
        self.workdir = workdir
        self.interval_s = interval_s
        self.stored = 0  # lines written (by the writer thread; read it after close)
        self._groups: list[tuple[list[bytes], int]] = []  # full chunks not handed over yet
        self._batch: list[bytes] = []  # blocks of whole lines of the chunk being filled
        self._lines = 0  # lines in _batch
        self._pending = 0  # bytes in _groups and _batch
        self._timer: asyncio.TimerHandle | None = None
        # each item: a batch (its chunks' blocks and line counts); None ends the turn
        self._queue: queue.SimpleQueue[list[tuple[list[bytes], int]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._ended = False  # the end marker is queued

    def add(self, event: dict[str, Any], raw: bytes | None = None) -> None:
        """The EventSink: an event the engine has no block of lines for (or an overlong one)."""
        if raw is None or len(raw) > RAW_LIMIT:
            line = self.encoded(event)
        elif raw[-1:] != b"\n":
            line = raw + b"\n"
        else:
            line = raw  # the engine's own bytes, as read: nothing to build
        self.add_lines(line, 1)

    def add_lines(self, data: bytes, lines: int) -> None:
        """The LinesSink: whole JSONL lines as the engine read them, on its reading loop."""
        if not data:
            # The stream has ended. The last batch waits for finish(): written while the engine
            # wraps up the turn, its turns at the GIL would slow that (measured: +2-3 % of a
            # 5,000-event turn); written after, beside the runner recording the turn, they don't.
            return
        if self._lines + lines > CHUNK_LINES and self._batch:
            # a chunk never gets more lines than it may hold
            self._groups.append((self._batch, self._lines))
            self._batch, self._lines = [], 0
        self._batch.append(data)
        self._lines += lines
        self._pending += len(data)
        if self._pending >= MAX_PENDING_BYTES:
            self._hand_over()  # a long burst: memory stays bounded
        elif self._timer is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._timer = self._loop.call_later(self.interval_s, self._hand_over)

    def encoded(self, event: dict[str, Any]) -> bytes:
        """An event without usable raw bytes, as one JSON line.

        Oversized ones are cut down to their transcript item.
        """
        line = json.dumps(event, default=str).encode()
        if len(line) > RAW_LIMIT:  # keep the shape, lose the bulk
            entry = transcript_entry(event, self.workdir) or {}
            line = json.dumps({"type": "deksdenflow.oversized", **entry}).encode()
        return line + b"\n"

    def start(self) -> None:
        """Start the writer thread now, before the turn, rather than at the first hand-over.

        Starting a thread waits for it to run and take the GIL: paid here, not on the engine's
        reading loop. After it, finish() or close() must follow on every path.
        """
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._thread = threading.Thread(target=self._writer, name="transcript-writer", daemon=True)
        self._thread.start()

    def _hand_over(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._batch:
            self._groups.append((self._batch, self._lines))
            self._batch, self._lines = [], 0
        if self._groups:
            if self._thread is None:
                self._start()
            self._queue.put(self._groups)
            self._groups, self._pending = [], 0

    # -- the writer thread -------------------------------------------------------------------
    def _writer(self) -> None:
        path = sqlite_file(self.db)
        conn: sqlite3.Connection | None = None
        try:
            closing = False
            while not closing:
                try:
                    batches = [self._queue.get(timeout=_IDLE_CHECK_S)]
                except queue.Empty:
                    # a turn whose close() never ran (its loop has gone): nothing more will come
                    assert self._loop is not None
                    if self._loop.is_closed():
                        break
                    continue
                with contextlib.suppress(queue.Empty):  # what queued meanwhile: one transaction
                    while True:
                        batches.append(self._queue.get_nowait())
                closing = batches[-1] is None
                ready = [chunk for batch in batches if batch is not None for chunk in batch]
                if ready:
                    if path is not None and conn is None:
                        conn = _borrow_connection(path)
                    self._store(ready, conn)
        except Exception:  # never leave close() waiting
            log.warning("transcript writer stopped", exc_info=True)
            if conn is not None:  # in an unknown state: not handed to the next turn
                conn.close()
                conn = None
        finally:
            self._signal_done()
            if path is not None and conn is not None:
                _return_connection(path, conn)

    def _store(
        self, batches: list[tuple[list[bytes], int]], conn: sqlite3.Connection | None
    ) -> None:
        # each batch is a chunk (a full one, or what the batch window collected), unless one
        # block brought more lines than a chunk holds
        rows = [
            (self.protocol_run_id, self.step_run_id, self.phase, count, body)
            for blocks, lines in batches
            for count, body in chunk_bodies(blocks, lines, self.needles)
        ]
        lines = sum(count for _blocks, count in batches)
        try:
            if conn is not None:
                _insert(conn, rows, _sqlite_time(utcnow()))
            else:
                assert self._loop is not None
                asyncio.run_coroutine_threadsafe(self._write_async(rows), self._loop).result(60)
            self.stored += lines
        except Exception:  # the transcript is a view: losing a batch must not fail the step
            log.warning("could not store %d transcript events", lines, exc_info=True)

    async def _write_async(self, rows: list[tuple[int, int | None, str, int, str]]) -> None:
        # Postgres, or an SQLite database with no file of its own (in-memory, URI): the app's
        # engine. A transcript is a view of the turn, not a record the bot acts on: its commits
        # skip the wait for the disk (synchronous_commit off); a machine crash may lose the
        # last batch, an application crash loses nothing committed.
        now = utcnow()
        if self.db.autocommit is not None:  # Postgres: one statement, one round trip
            columns: dict[str, list[Any]] = {"p": [], "s": [], "ph": [], "n": [], "b": []}
            for row in rows:
                for values, value in zip(columns.values(), row, strict=True):
                    values.append(value)
            async with self.db.autocommit.connect() as conn:
                await conn.execute(_PG_INSERT, {**columns, "created": now})
            return
        values = [
            {"protocol_run_id": p, "step_run_id": s, "phase": ph, "lines": n, "body": b,
             "created_at": now}
            for p, s, ph, n, b in rows
        ]  # fmt: skip
        async with self.db.engine.connect() as conn:
            await conn.execute(insert(TranscriptChunk), values)
            await conn.commit()

    def _signal_done(self) -> None:
        loop, done = self._loop, self._done
        if loop is None or done is None:
            return

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        with contextlib.suppress(RuntimeError):  # the loop has gone: nobody is waiting
            loop.call_soon_threadsafe(finish)

    def finish(self) -> None:
        """Hand over what is left and end the turn, without waiting for the writer."""
        self._hand_over()
        if self._done is not None and not self._ended:
            self._ended = True
            self._queue.put(None)

    async def wait_stored(self) -> None:
        """Wait until the writer has stored every batch handed over (after `finish`)."""
        if self._done is not None:
            await self._done

    async def close(self) -> None:
        """Store what is left, and wait for the writer thread to finish."""
        self.finish()
        await self.wait_stored()


# Writer connections kept between turns, per database file: opening one costs its PRAGMAs and
# a read of the schema, and closing the last connection to a file checkpoints the WAL (with an
# fsync). Each turn's writer borrows one for itself. Few: a process writes one database; tests
# make many, and the least recently used file's connections are closed past the cap.
_IDLE: OrderedDict[str, list[sqlite3.Connection]] = OrderedDict()
_IDLE_LOCK = threading.Lock()
_IDLE_FILES_CAP = 4
_IDLE_PER_FILE_CAP = 4
WRITER_CACHE_KIB = 40  # ten 4 KiB pages, SQLite's floor


def _borrow_connection(path: str) -> sqlite3.Connection:
    with _IDLE_LOCK:
        idle = _IDLE.get(path)
        if idle:
            return idle.pop()
    return _writer_connection(path)


def _return_connection(path: str, conn: sqlite3.Connection) -> None:
    closing: list[sqlite3.Connection] = []
    with _IDLE_LOCK:
        idle = _IDLE.setdefault(path, [])
        _IDLE.move_to_end(path)
        (idle if len(idle) < _IDLE_PER_FILE_CAP else closing).append(conn)
        while len(_IDLE) > _IDLE_FILES_CAP:
            closing += _IDLE.popitem(last=False)[1]
    for extra in closing:
        extra.close()


def _writer_connection(path: str) -> sqlite3.Connection:
    # The writer waits for a busy lock here, off the loop. synchronous=NORMAL: in WAL mode a
    # commit does not fsync (see _write_async for why a transcript may skip the wait), and WAL
    # checkpoints (with their fsync) are left to the app's other connections. The journal mode
    # is the database's own (WAL, set by the engine's connections): asking would take a lock.
    # The page cache is SQLite's smallest (WRITER_CACHE_KIB): the writer only appends, and a
    # 2 MB cache would cycle ~500 page buffers through each turn's megabytes, each a fresh
    # copy-on-write fault after the engine forks codex; a few hot buffers serve as well and
    # the WAL frames written are the same.
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        for pragma in (
            "synchronous=NORMAL",
            "wal_autocheckpoint=0",
            f"cache_size=-{WRITER_CACHE_KIB}",
        ):
            conn.execute(f"PRAGMA {pragma}")
    except BaseException:
        conn.close()
        raise
    return conn


def _insert(
    conn: sqlite3.Connection, rows: list[tuple[int, int | None, str, int, str]], created: str
) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_INSERT_SQL, [(*row, created) for row in rows])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def chunk_items(chunk: TranscriptChunk, workdir: Path | None = None) -> list[dict[str, Any]]:
    """The display items of one stored chunk, oldest first, each with its stable id."""
    items: list[dict[str, Any]] = []
    created = chunk.created_at.isoformat()
    for n, line in enumerate(chunk.body.split("\n")):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("type") == "deksdenflow.oversized":
            entry: dict[str, Any] | None = {k: event.get(k) for k in ("kind", "text", "data")}
        else:
            entry = transcript_entry(event, workdir)
        if not entry or not entry.get("kind"):
            continue
        items.append(
            {
                "id": chunk.id * ID_SPAN + n,
                "protocol_run_id": chunk.protocol_run_id,
                "step_run_id": chunk.step_run_id,
                "phase": chunk.phase,
                "kind": entry["kind"],
                "text": entry.get("text") or "",
                "data": entry.get("data") or {},
                "created_at": created,
            }
        )
    return items


async def transcript_page(
    db: Database,
    *,
    step_run_id: int | None = None,
    protocol_run_id: int | None = None,
    after: int = 0,
    before: int | None = None,
    limit: int = 200,
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """Display items oldest first after `after`; or, with `before`, the `limit` items before it.

    Reads chunk rows a few at a time from the right end, so a first screen over a long
    transcript parses only its last chunks. File paths are shown relative to `workdir` (the
    run's worktree), as the engine reports them absolute.
    """
    query = select(TranscriptChunk)
    if step_run_id is not None:
        query = query.where(TranscriptChunk.step_run_id == step_run_id)
    if protocol_run_id is not None:
        query = query.where(TranscriptChunk.protocol_run_id == protocol_run_id)
    found: list[dict[str, Any]] = []
    async with db.sessions() as session:
        if before is not None:
            edge = before // ID_SPAN
            while len(found) < limit:
                rows = list(
                    (await session.execute(
                        query.where(TranscriptChunk.id <= edge)
                        .order_by(TranscriptChunk.id.desc()).limit(4))).scalars()
                )  # fmt: skip
                if not rows:
                    break
                for chunk in rows:
                    found[:0] = [i for i in chunk_items(chunk, workdir) if i["id"] < before]
                edge = rows[-1].id - 1
            return found[-limit:]
        edge = after // ID_SPAN
        while len(found) < limit:
            rows = list(
                (await session.execute(
                    query.where(TranscriptChunk.id >= edge)
                    .order_by(TranscriptChunk.id).limit(4))).scalars()
            )  # fmt: skip
            if not rows:
                break
            for chunk in rows:
                found += [i for i in chunk_items(chunk, workdir) if i["id"] > after]
            edge = rows[-1].id + 1
    return found[:limit]


def recorder_for(
    ctx: Mapping[str, Any], state: Any, step: Any, phase: str, workdir: Path | None
) -> TranscriptRecorder:
    """The recorder for one engine turn of a protocol run (a job's ctx and RunState)."""
    settings = ctx["settings"]
    return TranscriptRecorder(
        ctx["db"],
        protocol_run_id=state.run.id,
        step_run_id=step.id if step is not None else None,
        phase=phase,
        secrets=secret_values(settings.secret_values(), state.project.secrets),
        workdir=workdir,
    )
