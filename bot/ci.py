"""CI results → step transitions, the same for GitHub checks, GitLab pipelines and the CI hook."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

from bot.errors import TransitionConflict
from bot.feedback import publish_status
from bot.policies import ci_decision, ci_fingerprint
from bot.runs import emit, load_run, set_protocol_status, set_step_status, update_run, update_step
from bot.spec import validate_spec

log = logging.getLogger(__name__)

CIResult = Literal["success", "failure"]


def current_ci_step(steps: Iterable[Any]) -> Any | None:
    """The step CI is judging: the latest executed one still waiting on QA, else the latest done."""
    executed = [s for s in steps if s.status in ("needs_qa", "completed")]
    waiting = [s for s in executed if s.status == "needs_qa"]
    pool = waiting or executed
    return max(pool, key=lambda s: s.step_index) if pool else None


async def apply_ci_result(
    ctx: dict[str, Any],
    run_id: int,
    sha: str | None,
    result: CIResult,
    failing: Iterable[tuple[str, str]] = (),
) -> str:
    """Act on a finished CI run for the protocol's current head; anything else is ignored."""
    db = ctx["db"]
    state = await load_run(db, run_id)
    if state.run.status not in ("running", "planned", "blocked"):
        return f"ignored-{state.run.status}"
    if sha is not None and state.run.head_sha and sha != state.run.head_sha:
        return "ignored-stale-sha"  # CI of an older push says nothing about the current head
    step = current_ci_step(state.steps)
    if step is None:
        return "ignored-no-step"
    spec = validate_spec(state.run.template_config)
    step_spec = next(s for s in spec.steps if s.index == step.step_index)
    failing = list(failing)
    decision = ci_decision(
        step_spec,
        state.run.runtime_state or {},
        result,
        ci_fingerprint(failing),
        ctx["settings"].auto_qa_on_ci,
    )
    attempts = int((state.run.runtime_state or {}).get("ci_attempts", 0)) + 1
    await update_run(
        db, run_id, runtime_state={**decision.new_runtime_state, "ci_attempts": attempts}
    )
    await emit(
        db,
        state,
        f"ci.{result}",
        decision.reason,
        step,
        failing=[f"{n}: {c}" for n, c in failing],
        action=decision.action,
        sha=sha,
    )
    if decision.action == "run_qa":
        if step.status == "needs_qa":
            await ctx["redis"].enqueue_job(
                "run_quality",
                _job_id=f"qa:ci:{run_id}:{sha}",
                protocol_run_id=run_id,
                step_index=step.step_index,
            )
        return "run_qa"
    if decision.action == "complete":
        if step.status == "needs_qa":
            await set_step_status(db, step.id, "completed", decision.reason)
            from bot.jobs.protocol import after_step_completed

            await after_step_completed(ctx, run_id, step.step_index, 0)
        return "complete"
    summary = "CI failed:\n" + "\n".join(f"- {n}: {c}" for n, c in failing)
    if decision.action == "retry":
        for index in decision.reset_steps:
            target = state.step(index)
            await update_step(
                db,
                target.id,
                retries=target.retries + 1,
                runtime_state={**(target.runtime_state or {}), "feedback": summary},
            )
            try:
                await set_step_status(db, target.id, "pending", f"CI loop: {decision.reason}")
            except TransitionConflict:
                pass
        first = min(decision.reset_steps or [step.step_index])
        await ctx["redis"].enqueue_job(
            "execute_step",
            _job_id=f"exec:ci:{run_id}:{first}:{sha}",
            protocol_run_id=run_id,
            step_index=first,
        )
        await publish_status(ctx, run_id, decision.reason)
        return "retry"
    try:
        await set_step_status(db, step.id, "failed", decision.reason)
    except TransitionConflict:
        pass
    if state.run.status != "blocked":
        await set_protocol_status(
            db,
            run_id,
            "blocked",
            decision.reason,
            runtime_state={
                **decision.new_runtime_state,
                "ci_attempts": attempts,
                "message": decision.reason,
            },
        )
    await publish_status(ctx, run_id, decision.reason)
    return "block"


async def pr_finished(ctx: dict[str, Any], run_id: int, merged: bool) -> str:
    state = await load_run(ctx["db"], run_id)
    if state.run.status in ("completed", "cancelled"):
        return f"already-{state.run.status}"
    wanted = "completed" if merged else "cancelled"
    if merged and state.run.status != "running":
        # a merge is final whatever the bot thought: walk through running if needed
        try:
            await set_protocol_status(ctx["db"], run_id, "running", "pull request merged")
        except TransitionConflict:
            pass
    try:
        await set_protocol_status(
            ctx["db"], run_id, wanted, "pull request merged" if merged else "pull request closed"
        )
    except TransitionConflict as exc:
        log.info("pr finished but %s", exc)
        return "conflict"
    await publish_status(ctx, run_id)
    return wanted
