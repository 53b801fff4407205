"""The step transcript: engine events turned into short, redacted items, stored in batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from bot.db import Database
from bot.models import TranscriptItem, utcnow

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


class TranscriptRecorder:
    """An engine sink that stores transcript items in batches from a background task.

    `add` only appends to a list, so the engine's reading loop never waits for the database;
    the flusher writes whatever arrived every FLUSH_INTERVAL_S in one multi-row INSERT.
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
        self.secrets = secrets
        self.workdir = workdir
        self.interval_s = interval_s
        self.stored = 0
        self.latest: str | None = None  # the newest command or file change, for progress lines
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False

    def add(self, event: dict[str, Any]) -> None:
        """The sink: called once per engine event, on the engine's reading loop."""
        self._pending.append(event)
        if self._task is None:
            self._task = asyncio.create_task(self._flusher(), name="transcript-flusher")

    async def _flusher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            await self.flush()
            if self._closing:
                return

    def rows(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events → rows to insert (redacted); remembers the latest action."""
        now = utcnow()
        rows: list[dict[str, Any]] = []
        for event in events:
            entry = transcript_entry(event, self.workdir)
            if entry is None:
                continue
            entry = redact(entry, self.secrets)
            if entry["kind"] in ("command", "file_change"):
                self.latest = entry["text"][:200]
            rows.append(
                {
                    "protocol_run_id": self.protocol_run_id,
                    "step_run_id": self.step_run_id,
                    "phase": self.phase,
                    "kind": entry["kind"],
                    "text": entry["text"],
                    "data": entry["data"],
                    "created_at": now,
                }
            )
        return rows

    async def flush(self) -> None:
        events, self._pending = self._pending, []
        if not events:
            return
        rows = self.rows(events)
        if not rows:
            return
        try:
            async with self.db.sessions.begin() as session:
                await session.execute(insert(TranscriptItem), rows)
            self.stored += len(rows)
        except Exception:  # the transcript is a view: losing a batch must not fail the step
            log.warning("could not store %d transcript items", len(rows), exc_info=True)

    async def close(self) -> None:
        """Store what is left and stop the flusher."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        await self.flush()


async def transcript_page(
    db: Database,
    *,
    step_run_id: int | None = None,
    protocol_run_id: int | None = None,
    after: int = 0,
    before: int | None = None,
    limit: int = 200,
) -> list[TranscriptItem]:
    """Items oldest first after `after`; or, with `before`, the `limit` items just before it."""
    query = select(TranscriptItem)
    if step_run_id is not None:
        query = query.where(TranscriptItem.step_run_id == step_run_id)
    if protocol_run_id is not None:
        query = query.where(TranscriptItem.protocol_run_id == protocol_run_id)
    async with db.sessions() as session:
        if before is not None:
            newest = query.where(TranscriptItem.id < before).order_by(TranscriptItem.id.desc())
            rows = list((await session.execute(newest.limit(limit))).scalars())
            rows.reverse()
            return rows
        query = query.where(TranscriptItem.id > after).order_by(TranscriptItem.id)
        return list((await session.execute(query.limit(limit))).scalars())


def item_json(item: TranscriptItem) -> dict[str, Any]:
    return {
        "id": item.id,
        "protocol_run_id": item.protocol_run_id,
        "step_run_id": item.step_run_id,
        "phase": item.phase,
        "kind": item.kind,
        "text": item.text,
        "data": item.data,
        "created_at": item.created_at.isoformat(),
    }


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
