"""What follows a step: its QA, its triggers, the next step of an auto protocol, or completion."""

from __future__ import annotations

import time
from typing import Any

from bot.domain.policies import trigger_decisions
from bot.domain.states import ProtocolStatus, StepStatus, completes_protocol
from bot.jobs.env import JobEnv
from bot.jobs.placement import parallel
from bot.jobs.ready import announce_ready
from bot.jobs.schedule import after_step_passed, schedule_ready
from bot.jobs.specs import spec_of, step_spec_of
from bot.storage.runs import RunState, emit, load_run, set_protocol_status, set_step_status


async def after_execute(
    ctx: dict[str, Any],
    run_id: int,
    step_index: int,
    depth: int,
    outcome: str,
    state: RunState | None = None,
) -> None:
    """What follows an execution; `state`: the run as loaded after the job, if the caller has
    it (else it is loaded here)."""
    if outcome == "needs_qa-run":
        # One automatic QA per attempt: a job id made of the wall-clock second deduplicated the
        # QA of a loop's next attempt away when both fell in the same second (arq keeps results).
        attempt = (state or await load_run(ctx["db"], run_id)).step(step_index).retries
        await ctx["redis"].enqueue_job(
            "run_quality",
            _job_id=f"qa:{run_id}:{step_index}:attempt-{attempt}",
            protocol_run_id=run_id,
            step_index=step_index,
        )
    elif outcome == "completed":
        await after_step_completed(ctx, run_id, step_index, depth, state)


async def after_quality(ctx: dict[str, Any], run_id: int, step_index: int, outcome: str) -> None:
    if outcome == "PASS":
        await after_step_completed(ctx, run_id, step_index, 0)
    elif outcome == "retry":
        await enqueue_next_step(ctx, run_id)


async def enqueue_next_step(
    ctx: dict[str, Any], run_id: int, state: RunState | None = None
) -> bool:
    """Enqueue the first pending step (job id per attempt, so a duplicate call is harmless)."""
    state = state or await load_run(ctx["db"], run_id)
    if parallel(state):  # a graph: every ready step, up to the bound
        return bool(await schedule_ready(ctx, run_id))
    for step in state.steps:
        if step.status == StepStatus.PENDING:
            await ctx["redis"].enqueue_job(
                "execute_step",
                _job_id=f"exec:{run_id}:{step.step_index}:{step.retries}",
                protocol_run_id=run_id,
                step_index=step.step_index,
            )
            return True
    return False


def completion_follows(state: RunState, step_index: int) -> bool:
    """Whether this step completing completes the protocol in after_step_completed, next."""
    step_spec = step_spec_of(spec_of(state), step_index)
    others = [s.status for s in state.steps if s.step_index != step_index]
    return completes_protocol(
        state.run.status, others, any(t.on == "pass" for t in step_spec.triggers)
    )


async def after_step_completed(
    ctx: dict[str, Any], run_id: int, step_index: int, depth: int, state: RunState | None = None
) -> bool:
    """Triggers, then the next step in auto mode, or protocol completion when none is left.
    True when it completed the protocol (and so re-rendered the status comment)."""
    env = JobEnv.from_ctx(ctx)
    state = state or await load_run(env.db, run_id)
    if parallel(state):  # a graph: merge the step, then start what became ready
        await after_step_passed(ctx, run_id, step_index)
        return False
    fired = await _fire_triggers(env, state, step_index, depth)
    if fired:
        state = await load_run(env.db, run_id)
    if all(s.status == StepStatus.COMPLETED for s in state.steps):
        if state.run.status == ProtocolStatus.RUNNING:
            await set_protocol_status(
                env.db, run_id, ProtocolStatus.COMPLETED, "every step completed"
            )
            state.run.status = ProtocolStatus.COMPLETED

            await announce_ready(ctx, state)  # un-draft the PR/MR and say what comes next
            return True
        return False
    if state.run.auto_mode and state.run.status == ProtocolStatus.RUNNING:
        await enqueue_next_step(ctx, run_id, state)
    return False


async def _fire_triggers(env: JobEnv, state: RunState, step_index: int, depth: int) -> bool:
    spec = spec_of(state)
    cap = min(spec.max_inline_depth, env.settings.max_inline_trigger_depth)
    actions = trigger_decisions(step_spec_of(spec, step_index), "pass", depth, cap)
    for action in actions:
        await emit(
            env.db,
            state,
            "trigger",
            action.reason,
            state.step(step_index),
            target=action.step_index,
            mode=action.mode,
        )
        target = state.step(action.step_index)
        if target.status in (StepStatus.COMPLETED, StepStatus.NEEDS_QA):
            await set_step_status(
                env.db, target.id, StepStatus.PENDING, f"triggered by step {step_index:02d}"
            )
        # "inline" triggers are enqueued too, carrying their depth: a job never runs another
        # step's engine inside itself (nor inside whatever called after_step_completed)
        await env.enqueue(
            "execute_step",
            f"exec:{state.run.id}:{action.step_index}:trig:{time.time_ns()}",
            protocol_run_id=state.run.id,
            step_index=action.step_index,
            depth=action.depth,
        )
    return bool(actions)
