"""Helpers for plans that are graphs: a timing engine, a diamond script, and two workers at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs.worker import build_worker
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.protocol.conftest import Harness, scripted_script


class TimedEngine(ScriptedEngine):
    """The scripted engine, noting when each execute call started and ended (monotonic)."""

    def __init__(self, script: dict[str, Any]) -> None:
        super().__init__(script)
        self.spans: dict[str, tuple[float, float]] = {}
        self.starts: list[tuple[str, float]] = []

    async def run(self, request: EngineRequest) -> EngineResult:
        start = time.monotonic()
        slug = str(request.context.get("slug", ""))
        if request.phase == "execute":
            self.starts.append((slug, start))
        result = await super().run(request)
        if request.phase == "execute":
            self.spans[slug] = (start, time.monotonic())
        return result


def graph_planning(deps: Iterable[list[int] | None], qa: str = "skip") -> dict[str, Any]:
    steps = [
        {
            "slug": f"part-{i}",
            "title": f"Part {i}",
            "content": f"# Part {i}\n\nWrite part{i}.txt.\n",
            "commit_type": "feat",
            "qa_policy": qa,
            "depends_on": d,
        }
        for i, d in enumerate(deps, start=1)
    ]
    return {"steps": steps}


def graph_script(
    deps: list[list[int] | None], delay_s: float = 0.0, execute_steps: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Each step i writes its own file part{i}.txt (so no two steps conflict unless told to)."""
    steps: dict[str, Any] = {
        f"part-{i}": {
            "message": f"part {i}",
            "delay_s": delay_s,
            "files": [{"path": f"part{i}.txt", "content": f"part {i}\n"}],
        }
        for i in range(1, len(deps) + 1)
    }
    steps.update(execute_steps or {})
    return scripted_script(planning=graph_planning(deps), execute={"steps": steps})


DIAMOND: list[list[int] | None] = [None, [1], [1], [2, 3]]


async def run_with_workers(
    h: Harness, run_id: int, workers: int = 2, timeout_s: float = 90.0
) -> Any:
    """Run the queue with `workers` arq workers (one job at a time each) until the protocol stops
    moving (completed, blocked or failed), then stop them."""
    settings = h.ctx["settings"].model_copy(update={"worker_max_jobs": 1})
    ws = [build_worker(settings, ctx={**h.ctx, "settings": settings}) for _ in range(workers)]
    tasks = [asyncio.create_task(w.async_run()) for w in ws]
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            state = await h.state(run_id)
            busy = any(s.status in (StepStatus.RUNNING, StepStatus.NEEDS_QA) for s in state.steps)
            if (
                state.run.status
                in (ProtocolStatus.COMPLETED, ProtocolStatus.BLOCKED, ProtocolStatus.FAILED)
                and not busy
            ):
                queued = await h.ctx["redis"].zcard("arq:queue")
                if not queued:
                    break
            await asyncio.sleep(0.1)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return await h.state(run_id)
