"""Operator and command actions on protocols: each a guarded transition plus an enqueued job."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.exc import IntegrityError

from bot import gitops
from bot.errors import NotFound, TransitionConflict
from bot.git.names import protocol_name
from bot.models import Project, ProtocolRun
from bot.runs import (
    create_run,
    emit,
    load_run,
    run_names,
    set_protocol_status,
    set_step_status,
    update_run,
)


async def start_protocol(
    ctx: dict[str, Any],
    project: Project,
    task: str,
    *,
    issue_number: int | None = None,
    issue_body: str = "",
    auto: bool = False,
    approved: bool = False,
    reply_to: dict[str, Any] | None = None,
) -> ProtocolRun:
    """Pick the next protocol number, create the run and enqueue its planning."""
    auth = await ctx["forges"].forge_for(project).git_auth_header(ctx["forges"].repo_ref(project))
    mirror = await ctx["git"].ensure_mirror(project.git_url, auth)
    for _ in range(20):
        number = await gitops.next_protocol_number(
            mirror, project.base_branch, await run_names(ctx["db"], project.id)
        )
        try:
            run = await create_run(
                ctx["db"],
                project=project,
                protocol_name=protocol_name(number, task),
                description=task,
                base_branch=project.base_branch,
                issue_number=issue_number,
                auto_mode=auto,
                approved=approved or auto,
            )
            break
        except IntegrityError:  # another request took this number first
            continue
    else:  # pragma: no cover - 20 collisions in a row means something else is wrong
        raise TransitionConflict("ProtocolRun", 0, "busy", "pending")
    if issue_body:
        await update_run(ctx["db"], run.id, runtime_state={"issue_body": issue_body})
    await ctx["redis"].enqueue_job(
        "plan_protocol", _job_id=f"plan:{run.id}:0", protocol_run_id=run.id, reply_to=reply_to
    )
    return run


# run states in which no step may be (re)run
_NOT_RUNNABLE = ("completed", "cancelled", "paused", "pending", "planning")


def _job_suffix() -> str:
    return f"{time.time_ns()}"


async def approve(ctx: dict[str, Any], run_id: int, step_index: int | None = None) -> str:
    """Approve the plan (no step) so steps may run, or accept a blocked/failed step as completed."""
    state = await load_run(ctx["db"], run_id)
    if step_index is None:
        if state.run.status not in ("planned", "running", "paused", "blocked"):
            raise TransitionConflict("ProtocolRun", run_id, state.run.status, "approved")
        await update_run(ctx["db"], run_id, approved=True)
        await emit(ctx["db"], state, "protocol.approved", "plan approved")
        if state.run.auto_mode:
            from bot.jobs.protocol import enqueue_next_step

            await enqueue_next_step(ctx, run_id)
        return "approved"
    step = state.step(step_index)
    await set_step_status(ctx["db"], step.id, "completed", "approved by a human")
    if state.run.status == "blocked":
        await set_protocol_status(ctx["db"], run_id, "running", "resumed after approval")
    # an accepted step counts as completed: its triggers, the next auto step, or the protocol's
    # completion when it was the last one (e.g. a step reopened by a red CI after completion)
    from bot.jobs.protocol import after_step_completed

    await after_step_completed(ctx, run_id, step_index, 0)
    return "step-approved"


async def run_step(
    ctx: dict[str, Any], run_id: int, step_index: int | None = None, reply_to: dict[str, Any] | None = None
) -> int:
    state = await load_run(ctx["db"], run_id)
    if not state.steps:
        raise TransitionConflict("ProtocolRun", run_id, state.run.status, "running")
    if state.run.status in _NOT_RUNNABLE:
        raise TransitionConflict("ProtocolRun", run_id, state.run.status, "running")
    if step_index is None:
        pending = [s for s in state.steps if s.status in ("pending", "failed", "blocked")]
        if not pending:
            raise TransitionConflict("ProtocolRun", run_id, state.run.status, "running")
        step_index = pending[0].step_index
    step = state.step(step_index)
    if step.status in ("running",):
        raise TransitionConflict("StepRun", step.id, step.status, "running")
    await ctx["redis"].enqueue_job(
        "execute_step",
        _job_id=f"exec:{run_id}:{step_index}:{_job_suffix()}",
        protocol_run_id=run_id,
        step_index=step_index,
        reply_to=reply_to,
    )
    return step_index


async def run_qa(
    ctx: dict[str, Any], run_id: int, step_index: int | None = None, reply_to: dict[str, Any] | None = None
) -> int:
    state = await load_run(ctx["db"], run_id)
    if step_index is None:
        candidates = [s for s in state.steps if s.status == "needs_qa"] or [
            s for s in state.steps if s.status == "completed"
        ][-1:]
        if not candidates:
            raise NotFound("no step is waiting for QA")
        step_index = candidates[0].step_index
    step = state.step(step_index)
    if step.status not in ("needs_qa", "completed"):
        raise TransitionConflict("StepRun", step.id, step.status, "needs_qa")
    await ctx["redis"].enqueue_job(
        "run_quality",
        _job_id=f"qa:{run_id}:{step_index}:{_job_suffix()}",
        protocol_run_id=run_id,
        step_index=step_index,
        reply_to=reply_to,
    )
    return step_index


async def retry(
    ctx: dict[str, Any], run_id: int, step_index: int | None = None, reply_to: dict[str, Any] | None = None
) -> int:
    state = await load_run(ctx["db"], run_id)
    if step_index is None:
        failed = [s for s in state.steps if s.status in ("failed", "blocked", "needs_qa")]
        if not failed:
            raise TransitionConflict("ProtocolRun", run_id, state.run.status, "retry")
        step_index = failed[0].step_index
    step = state.step(step_index)
    if step.status == "needs_qa":
        return await run_qa(ctx, run_id, step_index, reply_to)
    if step.status not in ("failed", "blocked", "completed"):
        raise TransitionConflict("StepRun", step.id, step.status, "pending")
    # refuse before changing anything: run_step below would refuse a run in these states, and
    # a refused action must leave the step as it was (not reset to pending with nothing queued)
    if state.run.status in _NOT_RUNNABLE:
        raise TransitionConflict("ProtocolRun", run_id, state.run.status, "running")
    from bot.runs import update_step

    await update_step(ctx["db"], step.id, retries=step.retries + 1)
    await set_step_status(ctx["db"], step.id, "pending", "retry requested")
    if state.run.status in ("blocked", "failed"):
        await set_protocol_status(ctx["db"], run_id, "running", "retrying")
    return await run_step(ctx, run_id, step_index, reply_to)


async def pause(ctx: dict[str, Any], run_id: int) -> None:
    await set_protocol_status(ctx["db"], run_id, "paused", "paused by request")


async def resume(ctx: dict[str, Any], run_id: int) -> None:
    await set_protocol_status(ctx["db"], run_id, "running", "resumed by request")
    state = await load_run(ctx["db"], run_id)
    if state.run.auto_mode:
        from bot.jobs.protocol import enqueue_next_step

        await enqueue_next_step(ctx, run_id)


async def cancel(ctx: dict[str, Any], run_id: int) -> None:
    state = await load_run(ctx["db"], run_id)
    await set_protocol_status(ctx["db"], run_id, "cancelled", "cancelled by request")
    for step in state.steps:
        if step.status in ("pending", "running", "needs_qa"):
            try:
                await set_step_status(ctx["db"], step.id, "cancelled", "protocol cancelled")
            except TransitionConflict:
                pass
