"""One engine call from a job: engine and model resolution, a stop watch, usage and its event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot import git as gitops
from bot.core.errors import StepStopped
from bot.core.observability import log_context
from bot.domain.engine_guard import sanitize_result
from bot.domain.pricing import turn_cost
from bot.domain.prompts import PROMPT_PLACEHOLDERS, override_path, render_prompt
from bot.domain.spec import ProtocolSpec, StepSpec, resolve_engine, resolve_model
from bot.domain.states import ProtocolStatus
from bot.jobs.env import JobEnv
from bot.storage.models import StepRun
from bot.storage.runs import RunState, new_event, protocol_status, record_usage
from bot.storage.transcript import recorder_for
from engines.base import (
    EngineRequest,
    EngineResult,
    EventSink,
    LinesSink,
    Phase,
    SandboxMode,
    TokenUsage,
)

log = logging.getLogger(__name__)

# A human stopping the protocol stops the engine; these statuses mean "stop now".
STOPPING = frozenset({ProtocolStatus.CANCELLED, ProtocolStatus.PAUSED})


@dataclass
class EngineCall:
    """What one engine turn needs besides the run itself."""

    phase: Phase
    prompt: str
    workdir: Path
    step_spec: StepSpec | None = None
    spec: ProtocolSpec | None = None
    step: StepRun | None = None
    output_schema: dict[str, Any] | None = None
    resume: str | None = None
    previous_usage: TokenUsage | None = None
    sandbox: SandboxMode = "workspace-write"
    context: dict[str, Any] = field(default_factory=dict)


def _request(
    env: JobEnv,
    state: RunState,
    call: EngineCall,
    sink: EventSink | None = None,
    lines_sink: LinesSink | None = None,
) -> tuple[str, EngineRequest]:
    models = state.project.default_models or {}
    project_engine = models.get("engine") if isinstance(models.get("engine"), str) else None
    engine_id = resolve_engine(
        call.phase,  # type: ignore[arg-type]
        call.step_spec,
        call.spec,
        project_engine,
        env.settings.engine,
    )
    model = resolve_model(
        call.phase,  # type: ignore[arg-type]
        call.step_spec,
        call.spec,
        models,
        env.settings.phase_models(),
    )
    request = EngineRequest(
        prompt=call.prompt,
        workdir=call.workdir,
        phase=call.phase,
        model=model,
        sandbox=call.sandbox,
        output_schema=call.output_schema,
        timeout_s=env.settings.engine_timeout_s,
        resume_thread_id=call.resume,
        previous_usage=call.previous_usage,
        context={
            "task": state.run.description,
            "protocol": state.run.protocol_name,
            **call.context,
        },
        sink=sink,
        lines_sink=lines_sink,
    )
    return engine_id, request


async def run_engine(env: JobEnv, state: RunState, call: EngineCall) -> EngineResult:
    """Run one turn; raise StepStopped (engine killed) when /cancel or /pause arrives meanwhile."""
    # the transcript: each event stored (redacted, in batches) as the engine reads it
    recorder = recorder_for(env.ctx, state, call.step, call.phase, call.workdir)
    engine_id, request = _request(env, state, call, recorder.add, recorder.add_lines)
    engine = env.engines.get(engine_id)
    step_id = call.step.id if call.step else None
    with log_context(protocol_run_id=state.run.id, step_run_id=step_id):
        log.info("engine %s (%s, model %s) starting", engine_id, call.phase, request.model)
        try:
            recorder.start()
            # redacted and capped before anything stores, commits or publishes it
            result: EngineResult = sanitize_result(
                await stoppable(env, state.run.id, engine.run(request))
            )
        except BaseException:
            await recorder.close()
            raise
    # The turn is over: the transcript's last batch is written now, after the engine's own
    # wrap-up, not beside it. On Postgres the turn's tokens are recorded meanwhile; SQLite has
    # one writer at a time, and a transaction meeting the transcript's would sleep in steps
    # for the lock. The step goes on only once both are stored.
    recorder.finish()
    if env.db.is_sqlite:
        await recorder.wait_stored()
    await _record(env, state, call, engine_id, request.model, result)
    await recorder.wait_stored()
    return result


async def _record(
    env: JobEnv,
    state: RunState,
    call: EngineCall,
    engine_id: str,
    model: str | None,
    result: EngineResult,
) -> None:
    """The turn's tokens and its event, in one transaction; the loaded rows keep the totals."""
    step_id = call.step.id if call.step else None
    tokens = result.usage.total
    cost = turn_cost(model, result.usage, env.settings.model_prices)
    event = new_event(
        f"engine.{result.outcome}",
        f"{engine_id} {call.phase}: {result.outcome} in {result.duration_s:.1f}s, {tokens} tokens",
        project_id=state.project.id,
        protocol_run_id=state.run.id,
        step_run_id=step_id,
        metadata={
            "engine": engine_id,
            "model": model,
            "phase": call.phase,
            "exit_code": result.exit_code,
            "usage": result.usage.to_dict(),
            "thread_usage": result.thread_usage.to_dict(),
            "thread_id": result.thread_id,
            "error": result.error,
            # the engine's own event log, trimmed: enough to see what it did
            "engine_events": [_trim_event(e) for e in result.events[-200:]],
        },
    )
    await record_usage(env.db, state.run.id, step_id, tokens, cost, event)
    state.run.tokens_used = (state.run.tokens_used or 0) + tokens
    if call.step is not None:
        call.step.tokens_used = (call.step.tokens_used or 0) + tokens


async def stoppable(env: JobEnv, run_id: int, work: Any) -> EngineResult:
    """Await the engine while polling the protocol's status; cancel the engine when stopped.

    Cancelling the task is what stops the process: the codex engine kills its process group on
    CancelledError. Polling the database (not only a Redis flag) catches every way a protocol
    is stopped: a comment, the API, the CLI.
    """
    task: asyncio.Task[EngineResult] = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=env.settings.stop_poll_s)
            if done:
                return task.result()
            status = await protocol_status(env.db, run_id)
            if status in STOPPING:
                await _cancel(task)
                raise StepStopped(status)
    except asyncio.CancelledError:  # the job itself was aborted: never leave the engine behind
        await _cancel(task)
        raise


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def _trim_event(event: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(event, default=str)
    if len(text) <= 2000:
        return event
    return {"type": event.get("type"), "truncated": text[:2000]}


async def prompt_override(env: JobEnv, state: RunState, name: str) -> str | None:
    """A repository's prompt override, read from its base branch only (never the protocol
    branch)."""
    # read once per base commit: the one the worktree's fetch saw (bot/git/cache.py)
    text: str | None = await env.git.base_file(
        state.project.git_url, state.run.base_branch, override_path(name), gitops.read_file_at
    )
    return text


async def step_prompt(
    env: JobEnv, state: RunState, name: str | None, fallback: str, values: dict[str, Any]
) -> str:
    """A step's named prompt: the repository's override, else ours, else the phase default."""
    name = name or fallback
    override = await prompt_override(env, state, name)
    if override is None and name not in PROMPT_PLACEHOLDERS:
        name = fallback
    return render_prompt(name, values, override)
