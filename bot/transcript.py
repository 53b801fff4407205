"""The step transcript: engine events turned into short, redacted items, stored in batches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from bot.db import Database, sqlite_file
from bot.models import TranscriptChunk, utcnow

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
    return text if len(text) <= limit else f"[{len(text) - limit} earlier characters] …" + text[-limit:]


def _relative(path: str, workdir: Path | None) -> str:
    if workdir is not None:
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(workdir))
    return path


def transcript_entry(event: Mapping[str, Any], workdir: Path | None = None) -> dict[str, Any] | None:
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
        return {"kind": "error", "text": _cut(str(message or "turn failed"), TEXT_LIMIT), "data": {}}
    if kind == "error":
        return {"kind": "error", "text": _cut(str(event.get("message", "")), TEXT_LIMIT), "data": {}}
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
        return {"kind": "reasoning", "text": _cut(str(item.get("text", "")), TEXT_LIMIT), "data": {}}
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
RAW_LIMIT = 16 * 1024  # a longer line (huge command output) is stored as the engine's compact event


# The event loop thread's transcript connections, per (file, thread), kept between turns: opening
# one costs its PRAGMAs, and closing the last connection to a file checkpoints the WAL. Few:
# a process writes one database; tests make many, and the oldest is closed past the cap.
_LOOP_CONNECTIONS: OrderedDict[tuple[str, int], sqlite3.Connection] = OrderedDict()
_LOOP_CONNECTIONS_CAP = 4


def _loop_connection(path: str) -> sqlite3.Connection:
    key = (path, threading.get_ident())
    conn = _LOOP_CONNECTIONS.get(key)
    if conn is not None:
        _LOOP_CONNECTIONS.move_to_end(key)
        return conn
    conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    try:
        # never waits for a lock (timeout 0: the caller falls back to a thread), and leaves WAL
        # checkpoints (and their fsync) to the other connections; the journal mode is the
        # database's own (WAL, set by the engine's connections), asking for it would take a lock
        for pragma in ("synchronous=NORMAL", "wal_autocheckpoint=0"):
            conn.execute(f"PRAGMA {pragma}")
    except BaseException:
        conn.close()
        raise
    _LOOP_CONNECTIONS[key] = conn
    while len(_LOOP_CONNECTIONS) > _LOOP_CONNECTIONS_CAP:
        _LOOP_CONNECTIONS.popitem(last=False)[1].close()
    return conn


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


def redact_line(line: bytes, needles: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """JSONL bytes with every secret replaced (no decoding; a secret never spans two lines)."""
    for needle, replacement in needles:
        if needle in line:
            line = line.replace(needle, replacement)
    return line


class TranscriptRecorder:
    """An engine sink that stores a turn's events in batches from a background task.

    `add` only appends to a list, so the engine's reading loop never waits for the database and
    pays nothing per event beyond that; every FLUSH_INTERVAL_S the flusher redacts what arrived
    (on the bytes) and writes it as a few chunk rows in one INSERT.
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
        self.stored = 0  # lines written
        self._pending: list[tuple[dict[str, Any], bytes | None]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # the writer thread's

    def add(self, event: dict[str, Any], raw: bytes | None = None) -> None:
        """The sink: called once per engine event, on the engine's reading loop."""
        self._pending.append((event, raw))
        if self._task is None:
            self._task = asyncio.create_task(self._flusher(), name="transcript-flusher")
        elif len(self._pending) >= CHUNK_LINES:
            # a fast stream: write this chunk now, beside the reading, not all of it at the end
            self._wake.set()

    async def _flusher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            if not self._closing:
                self._wake.clear()
            await self.flush()
            if self._closing:
                return

    def encoded(self, event: dict[str, Any]) -> bytes:
        """An event without usable raw bytes, as one JSON line (oversized ones cut to their item)."""
        line = json.dumps(event, default=str).encode()
        if len(line) > RAW_LIMIT:  # keep the shape, lose the bulk
            entry = transcript_entry(event, self.workdir) or {}
            line = json.dumps({"type": "deksdenflow.oversized", **entry}).encode()
        return line + b"\n"

    def chunks(self, events: list[tuple[dict[str, Any], bytes | None]]) -> list[tuple[int, str]]:
        """The events as (line count, redacted JSONL text) chunks of up to CHUNK_LINES lines.

        Per event only a list entry is built (the engine's own bytes, newline-terminated);
        joining, redacting and decoding happen once per chunk, in C.
        """
        lines = [
            (raw if raw.endswith(b"\n") else raw + b"\n")
            if raw is not None and len(raw) <= RAW_LIMIT
            else self.encoded(event)
            for event, raw in events
        ]
        out: list[tuple[int, str]] = []
        for start in range(0, len(lines), CHUNK_LINES):
            part = lines[start : start + CHUNK_LINES]
            body = redact_line(b"".join(part).rstrip(b"\r\n"), self.needles)
            out.append((len(part), body.decode("utf-8", "replace")))
        return out

    async def flush(self) -> None:
        events, self._pending = self._pending, []
        if not events:
            return
        now = utcnow()
        rows = [
            {
                "protocol_run_id": self.protocol_run_id,
                "step_run_id": self.step_run_id,
                "phase": self.phase,
                "lines": count,
                "body": body,
                "created_at": now,
            }
            for count, body in self.chunks(events)
        ]
        try:
            await self._write(rows)
            self.stored += len(events)
        except Exception:  # the transcript is a view: losing a batch must not fail the step
            log.warning("could not store %d transcript events", len(events), exc_info=True)

    async def _write(self, rows: list[dict[str, Any]]) -> None:
        # A transcript is a view of the turn, not a record the bot acts on: its commits skip the
        # wait for the disk (SQLite's fsync of the WAL, Postgres' synchronous commit), which is
        # most of what storing a fast stream would otherwise add to the turn. A crash of the
        # machine may lose the last batch; an application crash loses nothing committed.
        path = sqlite_file(self.db)
        if path is not None:
            # SQLite, uncontended (nearly always): written right here on our own connection,
            # which never waits for a lock and never checkpoints, so the loop is held for a
            # memcpy-sized moment per chunk — far less than handing the chunk to a thread costs
            if self._write_here(path, rows):
                return
            # another connection holds the write lock: wait for it on our thread instead
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="transcript")
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._write_sqlite, path, rows
            )
            return
        async with self.db.engine.connect() as conn:
            if self.db.is_sqlite:  # in-memory or URI databases: the engine's own connection
                await conn.execute(insert(TranscriptChunk), rows)
            else:
                await conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                await conn.execute(insert(TranscriptChunk), rows)
            await conn.commit()

    def _write_here(self, path: str, rows: list[dict[str, Any]]) -> bool:
        """Write on the event loop's thread when the lock is free at once; False when busy."""
        try:
            self._insert(_loop_connection(path), rows)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return False
            raise
        return True

    def _write_sqlite(self, path: str, rows: list[dict[str, Any]]) -> None:
        if self._conn is None:
            conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._conn = conn
        self._insert(self._conn, rows)

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT INTO transcript_chunks"
                " (protocol_run_id, step_run_id, phase, lines, body, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (r["protocol_run_id"], r["step_run_id"], r["phase"], r["lines"], r["body"],
                     _sqlite_time(r["created_at"]))
                    for r in rows
                ],
            )  # fmt: skip
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _shutdown(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        """Store what is left and stop the flusher (and the SQLite writer thread)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        await self.flush()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(executor, self._shutdown)
            executor.shutdown(wait=False)


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
