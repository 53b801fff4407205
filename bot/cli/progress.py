"""Progress for the local protocol commands: phase, latest action, elapsed time and tokens.

On a terminal one status line updates in place (rich); otherwise a plain line is printed each
time the phase or the latest action changes, so logs and CI output stay readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TextIO

from sqlalchemy import select

from bot.domain.pricing import fmt_cost
from bot.domain.rendering import fmt_duration
from bot.domain.states import ProtocolStatus, StepStatus
from bot.storage.models import ProtocolRun, StepRun
from bot.storage.transcript import transcript_page

POLL_S = 0.5
PHASES = {"planning": "planning", "decompose": "detailing steps", "execute": "executing",
          "qa": "quality check", "discovery": "discovery"}  # fmt: skip


@dataclass(frozen=True)
class Snapshot:
    """What one progress line says."""

    phase: str
    action: str
    tokens: int
    cost_usd: float


def progress_line(snap: Snapshot, elapsed: float) -> str:
    """`executing step 01 · $ pytest -q · 0m 42s · 12,345 tokens · $0.0150` (pure)."""
    parts = [snap.phase]
    if snap.action:
        parts.append(snap.action)
    parts += [fmt_duration(elapsed), f"{snap.tokens:,} tokens"]
    if snap.cost_usd:
        parts.append(fmt_cost(snap.cost_usd))
    return " · ".join(parts)


def action_of(item: dict[str, Any]) -> str:
    """The short form of a transcript item for the progress line."""
    text = " ".join(str(item.get("text", "")).split())
    if item["kind"] == "command":
        return ("$ " + text)[:80]
    if item["kind"] == "file_change":
        return ("✎ " + text)[:80]
    return text[:80]


async def snapshot(db: Any, run_id: int) -> Snapshot:
    """Read the run's current phase, latest command or file change, tokens and cost."""
    async with db.sessions() as session:
        run = await session.get(ProtocolRun, run_id)
        steps = list(
            (
                await session.execute(select(StepRun).where(StepRun.protocol_run_id == run_id))
            ).scalars()
        )
    items = await transcript_page(db, protocol_run_id=run_id, before=2**62, limit=30)
    latest = items[-1] if items else None
    acts = [i for i in items if i["kind"] in ("command", "file_change")]
    running = next((s for s in steps if s.status == StepStatus.RUNNING), None)
    phase = run.status if run is not None else "?"
    active = (ProtocolStatus.PLANNING, ProtocolStatus.RUNNING)
    if latest is not None and run is not None and run.status in active:
        phase = PHASES.get(latest["phase"], latest["phase"])
        step = next((s for s in steps if s.id == latest["step_run_id"]), running)
        if step is not None:
            phase += f" step {step.step_index:02d}"
    return Snapshot(
        phase=phase,
        action=action_of(acts[-1]) if acts else "",
        tokens=int(run.tokens_used or 0) if run else 0,
        cost_usd=float(run.cost_usd or 0.0) if run else 0.0,
    )


class Progress:
    """Follows one run while jobs drain; `print` is the printer event lines go through."""

    def __init__(self, db: Any, run_id: int, stream: TextIO | None = None) -> None:
        self.db = db
        self.run_id = run_id
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last: tuple[str, str] | None = None
        self._live: Any = None
        self._console: Any = None

    def print(self, line: str) -> None:
        if self._console is not None:
            self._console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.stream, flush=True)

    async def tick(self) -> None:
        snap = await snapshot(self.db, self.run_id)
        line = progress_line(snap, time.monotonic() - self.started)
        if self._live is not None:
            from rich.text import Text

            self._live.update(Text("⏳ " + line, style="bold cyan"))
        elif (snap.phase, snap.action) != self._last:
            # non-TTY: a line when something happened, not one per tick
            print("progress: " + line, file=self.stream, flush=True)
        self._last = (snap.phase, snap.action)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Callable[[str], None]]:
        """While the block runs, keep the progress current; yields the printer to use."""
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.stream)
            self._live = Live(console=self._console, refresh_per_second=8, transient=True)
            self._live.start()

        async def loop() -> None:
            while True:
                with contextlib.suppress(Exception):  # progress must never break the run
                    await self.tick()
                await asyncio.sleep(POLL_S)

        task = asyncio.create_task(loop())
        try:
            yield self.print
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await self.tick()
            if self._live is not None:
                self._live.stop()
                self._live = None
                self._console = None
