"""Operator and command actions on protocols: each a guarded transition plus an enqueued job."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.exc import IntegrityError

from bot import git
from bot.core.errors import NotFound, TransitionConflict
from bot.domain.fix_feedback import add_item, guidance_item
from bot.domain.states import ProtocolStatus, StepStatus, may_approve_step, resume_decision
from bot.git.names import protocol_name
from bot.jobs import catalogue as jobs
from bot.jobs import placement, schedule
from bot.jobs.advance import enqueue_next_step
from bot.jobs.ready import announce_ready
from bot.jobs.schedule import blocked_on_protocol_ci
from bot.storage.models import Project, ProtocolRun
from bot.storage.runs import (
    create_run,
    emit,
    load_run,
    run_names,
    set_protocol_status,
    set_step_status,
    update_run,
    update_step,
)

# short names for the status enums: guards below list several at once
_P = ProtocolStatus
_S = StepStatus


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
    pull: tuple[int, str, str] | None = None,
) -> ProtocolRun:
    """Pick the next protocol number, create the run and enqueue its planning.

    `pull` (number, head branch, base branch): plan on an existing PR/MR, committing to its
    branch, so later commands on that PR/MR find the protocol by its number.
    """
    auth = await ctx["forges"].forge_for(project).git_auth_header(ctx["forges"].repo_ref(project))
    mirror = await ctx["git"].ensure_mirror(project.git_url, auth)
    for _ in range(20):
        number = await git.next_protocol_number(
            mirror, project.base_branch, await run_names(ctx["db"], project.id)
        )
        try:
            run = await create_run(
                ctx["db"],
                project=project,
                protocol_name=protocol_name(number, task),
                description=task,
                base_branch=pull[2] if pull else project.base_branch,
                issue_number=issue_number,
                auto_mode=auto,
                approved=approved or auto,
            )
            break
        except IntegrityError:  # another request took this number first
            continue
    else:  # pragma: no cover - 20 collisions in a row means something else is wrong
        raise TransitionConflict("ProtocolRun", 0, "busy", _P.PENDING)
    runtime: dict[str, Any] = {"issue_body": issue_body} if issue_body else {}
    if pull is not None:
        runtime["branch"] = pull[1]
        await update_run(ctx["db"], run.id, pr_number=pull[0])
    if runtime:
        await update_run(ctx["db"], run.id, runtime_state=runtime)
    await jobs.submit(ctx["redis"], jobs.plan_protocol(run.id, reply_to=reply_to))
    return run


# run states in which no step may be (re)run
_NOT_RUNNABLE = (_P.COMPLETED, _P.CANCELLED, _P.PAUSED, _P.PENDING, _P.PLANNING)


def _job_suffix() -> str:
    return f"{time.time_ns()}"


def step_conflict(step: Any, wanted: str) -> TransitionConflict:
    """A refusal that names the step by its number, never by its database row id."""
    return TransitionConflict("step", step.step_index, step.status, wanted)


async def approve(ctx: dict[str, Any], run_id: int, step_index: int | None = None) -> str:
    """Approve the plan (no step) so steps may run, or accept a failed/blocked step as completed."""
    state = await load_run(ctx["db"], run_id)
    if step_index is None:
        if state.run.status not in (_P.PLANNED, _P.RUNNING, _P.PAUSED, _P.BLOCKED):
            raise TransitionConflict("ProtocolRun", run_id, state.run.status, "approved")
        await update_run(ctx["db"], run_id, approved=True)
        await emit(ctx["db"], state, "protocol.approved", "plan approved")
        if state.run.auto_mode:
            await enqueue_next_step(ctx, run_id)
        return "approved"
    step = state.step(step_index)
    if not may_approve_step(step.status):
        raise step_conflict(step, _S.COMPLETED)
    approved = f"step {step_index:02d} approved by a human"
    await set_step_status(ctx["db"], step.id, _S.COMPLETED, approved)
    step.status = _S.COMPLETED
    nothing_left = all(s.status == _S.COMPLETED for s in state.steps)
    # a paused protocol whose last open step a human accepts has nothing left to pause: it
    # completes (paused → running → completed) instead of staying paused with no step to resume
    if state.run.status in (_P.BLOCKED, _P.FAILED) or (
        state.run.status == _P.PAUSED and nothing_left
    ):
        await set_protocol_status(ctx["db"], run_id, _P.RUNNING, "resumed after approval")
        state.run.status = _P.RUNNING
    await _carry_on(ctx, state)
    return "step-approved"


async def _carry_on(ctx: dict[str, Any], state: Any) -> None:
    """After a human accepted a step: complete the protocol, or let an auto protocol go on."""
    if state.run.status != _P.RUNNING:
        return
    if placement.parallel(state):  # a graph: the accepted step is merged first, then the rest go on
        await schedule.schedule_ready(ctx, state.run.id, start=bool(state.run.auto_mode))
        return
    if all(s.status == _S.COMPLETED for s in state.steps):
        await set_protocol_status(ctx["db"], state.run.id, _P.COMPLETED, "every step completed")
        state.run.status = _P.COMPLETED
        await announce_ready(ctx, state)
    elif state.run.auto_mode:
        await enqueue_next_step(ctx, state.run.id, state)


async def run_step(
    ctx: dict[str, Any],
    run_id: int,
    step_index: int | None = None,
    reply_to: dict[str, Any] | None = None,
) -> int:
    state = await load_run(ctx["db"], run_id)
    if not state.steps:
        raise TransitionConflict("ProtocolRun", run_id, state.run.status, _P.RUNNING)
    if state.run.status in _NOT_RUNNABLE:
        raise TransitionConflict("ProtocolRun", run_id, state.run.status, _P.RUNNING)
    if placement.parallel(state):  # a graph: its dependencies first; "next" is every ready step
        return await schedule.run_step(ctx, state, step_index, reply_to)
    if step_index is None:
        pending = [s for s in state.steps if s.status in (_S.PENDING, _S.FAILED, _S.BLOCKED)]
        if not pending:
            raise TransitionConflict("ProtocolRun", run_id, state.run.status, _P.RUNNING)
        step_index = pending[0].step_index
    step = state.step(step_index)
    if step.status in (_S.RUNNING,):
        raise step_conflict(step, _S.RUNNING)
    await jobs.submit(
        ctx["redis"], jobs.execute_step(run_id, step_index, _job_suffix(), reply_to=reply_to)
    )
    return step_index


async def run_qa(
    ctx: dict[str, Any],
    run_id: int,
    step_index: int | None = None,
    reply_to: dict[str, Any] | None = None,
) -> int:
    state = await load_run(ctx["db"], run_id)
    if step_index is None:
        candidates = [s for s in state.steps if s.status == _S.NEEDS_QA] or [
            s for s in state.steps if s.status == _S.COMPLETED
        ][-1:]
        if not candidates:
            raise NotFound("no step is waiting for QA")
        step_index = candidates[0].step_index
    step = state.step(step_index)
    if step.status not in (_S.NEEDS_QA, _S.COMPLETED):
        raise step_conflict(step, _S.NEEDS_QA)
    await jobs.submit(
        ctx["redis"], jobs.run_quality(run_id, step_index, _job_suffix(), reply_to=reply_to)
    )
    return step_index


async def retry(
    ctx: dict[str, Any],
    run_id: int,
    step_index: int | None = None,
    reply_to: dict[str, Any] | None = None,
    *,
    guidance: str = "",
) -> int:
    state = await load_run(ctx["db"], run_id)
    if step_index is None and not state.steps and state.run.status == _P.FAILED:
        await replan(ctx, run_id)  # planning failed: /retry plans again
        return 0
    if step_index is None:
        failed = [s for s in state.steps if s.status in (_S.FAILED, _S.BLOCKED, _S.NEEDS_QA)]

        # red CI on the protocol branch after the merges: no step to re-run, wait for CI again
        if not failed and blocked_on_protocol_ci(state):
            await resume(ctx, run_id, reply_to)
            return 0
        if not failed:
            raise TransitionConflict("ProtocolRun", run_id, state.run.status, "retry")
        step_index = failed[0].step_index
    step = state.step(step_index)
    author = (reply_to or {}).get("author")
    if step.status == _S.NEEDS_QA:
        if guidance.strip():  # kept for the step's next execution
            await _add_guidance(ctx, step, author, guidance)
        return await run_qa(ctx, run_id, step_index, reply_to)
    if step.status not in (_S.FAILED, _S.BLOCKED, _S.COMPLETED, _S.PENDING):
        raise step_conflict(step, _S.PENDING)
    # refuse before changing anything: a refused action must leave the step as it was
    if state.run.status in (_P.COMPLETED, _P.CANCELLED, _P.PENDING, _P.PLANNING):
        raise TransitionConflict("ProtocolRun", run_id, state.run.status, _P.RUNNING)
    if guidance.strip():  # `/retry N text…`: the text reaches the step's next attempt
        await _add_guidance(ctx, step, author, guidance)
    await reset_step(ctx, step, "retry requested")
    if state.run.status in (_P.BLOCKED, _P.FAILED, _P.PAUSED):
        await set_protocol_status(ctx["db"], run_id, _P.RUNNING, "retrying")
    return await run_step(ctx, run_id, step_index, reply_to)


async def _add_guidance(ctx: dict[str, Any], step: Any, author: str | None, text: str) -> None:
    item = guidance_item(author, text)
    rs = dict(step.runtime_state or {})
    rs["feedback"] = add_item(rs.get("feedback"), item)
    rs["attempt_why"] = f"/retry by @{author}" if author else "/retry"
    await update_step(ctx["db"], step.id, runtime_state=rs)
    step.runtime_state = rs


async def reset_step(ctx: dict[str, Any], step: Any, why: str) -> None:
    """A new attempt of a step: retries + 1 (a new attempt id for its commit), back to pending."""

    rs = {k: v for k, v in (step.runtime_state or {}).items() if k != "interrupted"}
    await update_step(ctx["db"], step.id, retries=step.retries + 1, runtime_state=rs)
    if step.status != _S.PENDING:
        await set_step_status(ctx["db"], step.id, _S.PENDING, why)


async def replan(ctx: dict[str, Any], run_id: int) -> None:
    """Plan a protocol again whose planning failed (failed → planning), under a new job id."""
    await set_protocol_status(ctx["db"], run_id, _P.PLANNING, "planning restarted")
    await jobs.submit(ctx["redis"], jobs.plan_protocol(run_id, _job_suffix()))


async def pause(ctx: dict[str, Any], run_id: int, by: str | None = None) -> None:
    """Pause; a running engine notices within a second, is stopped and its step runs again later."""
    message = f"paused by @{by}" if by else "paused by request"
    runtime = await _with_message(ctx, run_id, message)
    await set_protocol_status(ctx["db"], run_id, _P.PAUSED, message, runtime_state=runtime)


async def resume(ctx: dict[str, Any], run_id: int, reply_to: dict[str, Any] | None = None) -> None:
    """Back to running, and re-run the step that stopped the protocol (not the next one)."""
    state = await load_run(ctx["db"], run_id)
    if not state.steps:  # nothing planned yet: a failed planning is resumed by planning again
        if state.run.status != _P.FAILED:
            raise TransitionConflict("ProtocolRun", run_id, state.run.status, _P.RUNNING)
        await replan(ctx, run_id)
        return
    decision = resume_decision(
        [(s.step_index, _resume_status(s)) for s in state.steps], state.run.auto_mode
    )
    if decision.action == "run_step" and decision.step_index is not None:
        step = state.step(decision.step_index)
        if step.status in (_S.FAILED, _S.BLOCKED, _S.PENDING):
            await reset_step(ctx, step, "resumed")
    runtime = {k: v for k, v in (state.run.runtime_state or {}).items() if k != "message"}
    await set_protocol_status(
        ctx["db"], run_id, _P.RUNNING, "resumed by request", runtime_state=runtime
    )
    if decision.action == "run_step" and decision.step_index is not None:
        await run_step(ctx, run_id, decision.step_index, reply_to)
    elif decision.action == "run_qa" and decision.step_index is not None:
        await run_qa(ctx, run_id, decision.step_index, reply_to)
    else:
        if placement.parallel(
            state
        ):  # a graph: merge what passed, start what is ready, or await CI
            await schedule.schedule_ready(ctx, run_id, start=bool(state.run.auto_mode))


def _resume_status(step: Any) -> str:
    # a step a pause interrupted is pending again, but it is the one that stopped the protocol
    if step.status == _S.PENDING and (step.runtime_state or {}).get("interrupted"):
        return _P.RUNNING
    return str(step.status)


async def cancel(ctx: dict[str, Any], run_id: int, by: str | None = None) -> None:
    """Cancel; a running engine is stopped within a second and nothing of its step is pushed."""
    state = await load_run(ctx["db"], run_id)
    message = f"cancelled by @{by}" if by else "cancelled by request"
    runtime = {**(state.run.runtime_state or {}), "message": message}
    await set_protocol_status(ctx["db"], run_id, _P.CANCELLED, message, runtime_state=runtime)
    for step in state.steps:
        if step.status in (_S.PENDING, _S.RUNNING, _S.NEEDS_QA):
            try:
                await set_step_status(ctx["db"], step.id, _S.CANCELLED, "protocol cancelled")
            except TransitionConflict:
                pass


async def _with_message(ctx: dict[str, Any], run_id: int, message: str) -> dict[str, Any]:
    state = await load_run(ctx["db"], run_id)
    return {**(state.run.runtime_state or {}), "message": message}
