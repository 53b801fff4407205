"""CI results → step transitions, the same for GitHub checks, GitLab pipelines and the CI hook."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

from sqlalchemy import update

from bot.core.errors import TransitionConflict
from bot.domain.ci_evidence import CIEvidence, names_only, redacted, within_budget
from bot.domain.ci_gate import (
    CIMeaning,
    current_step,
    head_of,
    interpret_ci,
    step_for_sha,
)
from bot.domain.fix_feedback import add_item, ci_item
from bot.domain.loop_policy import ci_gates, repo_policies
from bot.domain.policies import ci_decision
from bot.domain.secrets_scan import process_scanner
from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs import catalogue as jobs
from bot.jobs.feedback import publish_status
from bot.jobs.gating import gate_lock, has_ci, step_views
from bot.jobs.schedule import protocol_ci
from bot.jobs.specs import spec_of
from bot.jobs.steps import after_step_completed
from bot.storage.models import Project
from bot.storage.runs import (
    RunState,
    emit,
    load_run,
    set_protocol_status,
    set_step_status,
    update_run,
    update_step,
)

log = logging.getLogger(__name__)

CIResult = Literal["success", "failure"]
# The evidence of a red CI run, or how to fetch it: fetched only when the failure is acted on
# (not for a duplicate or a stale sha), under the gate lock, so at most this long.
Evidence = CIEvidence | Callable[[], Awaitable[CIEvidence]]
EVIDENCE_TIMEOUT_S = 20.0


async def gather_evidence(
    project: Any, source: str, failing: list[tuple[str, str]], evidence: Evidence | None
) -> CIEvidence:
    """The evidence, fetched if need be, cut to size and with every secret the worker holds
    taken out, before it reaches a prompt or the database. A fetch that fails or takes too long
    leaves the failing names, with a note saying why."""
    found: CIEvidence
    if evidence is None:
        found = names_only(source, failing)
    elif isinstance(evidence, CIEvidence):
        found = evidence
    else:
        try:
            found = await asyncio.wait_for(evidence(), EVIDENCE_TIMEOUT_S)
        except Exception as exc:  # evidence is a help, never a reason to drop the CI result
            log.warning("CI evidence for %s could not be fetched: %s", source, exc)
            found = names_only(
                source, failing, f"(the CI logs could not be fetched: {type(exc).__name__})"
            )
    if not found.jobs and failing:
        found = names_only(source, failing, found.note)

    secrets = [
        str(v)
        for v in (getattr(project, "secrets", None) or {}).values()
        if isinstance(v, str | int)
    ]
    return within_budget(redacted(found, process_scanner(extra=secrets).redact))


def current_ci_step(steps: Iterable[Any]) -> Any | None:
    """The step CI is judging: the latest executed one still waiting on QA, else the latest done."""
    executed = [s for s in steps if s.status in (StepStatus.NEEDS_QA, StepStatus.COMPLETED)]
    waiting = [s for s in executed if s.status == StepStatus.NEEDS_QA]
    pool = waiting or executed
    return max(pool, key=lambda s: s.step_index) if pool else None


async def _note_ci_seen(db: Any, project: Any, source: str) -> None:
    if has_ci(project):
        return
    async with db.sessions.begin() as session:
        await session.execute(
            update(Project)
            .where(Project.id == project.id, Project.ci_provider.is_(None))
            .values(ci_provider=source[:32])
        )


async def apply_ci_result(
    ctx: dict[str, Any],
    run_id: int,
    sha: str | None,
    result: CIResult,
    failing: Iterable[tuple[str, str]] = (),
    *,
    source: str = "ci-reported",
    evidence: Evidence | None = None,
) -> str:
    """Act on a finished CI run on commit `sha` (None: the newest step's head).

    The meaning is decided by `bot.domain.ci_gate.interpret_ci`; this applies it. Only transitions
    and
    enqueued jobs happen here, never engine work, so any job (or handler) may call it.
    `evidence` (or the fetch of it) feeds the next attempt of a step that red CI sends back.
    """
    async with gate_lock(ctx["redis"], run_id):
        return await _apply(ctx, run_id, sha, result, list(failing), source, evidence)


async def _apply(
    ctx: dict[str, Any],
    run_id: int,
    sha: str | None,
    result: CIResult,
    failing: list[tuple[str, str]],
    source: str,
    evidence: Evidence | None = None,
) -> str:
    db = ctx["db"]
    settings = ctx["settings"]
    state = await load_run(db, run_id)
    await _note_ci_seen(db, state.project, source)
    views = step_views(state)
    if sha is None:
        current = current_step(views)
        sha = head_of(current) if current is not None else None
        if sha is None:
            await emit(db, state, "ci.ignored", f"CI {result} reported, but no step has run yet")
            return "ignored-no-step"

    # a plan that is a graph: CI on the protocol branch after the last merge gates completion
    if (done := await protocol_ci(ctx, state, sha, result, failing)) is not None:
        return done
    target = step_for_sha(views, sha)
    meaning = _meaning(settings, state, views, target, sha, result)
    step = state.step(meaning.step_index) if meaning.step_index is not None else None
    if meaning.action in ("ignore", "stale", "duplicate"):
        kind = {"ignore": "ci.ignored", "stale": "ci.stale", "duplicate": "ci.duplicate"}[
            meaning.action
        ]
        await emit(db, state, kind, meaning.reason, step, sha=sha, result=result)
        return {
            "ignore": f"ignored-{state.run.status}",
            "stale": "stale",
            "duplicate": "duplicate",
        }[meaning.action]
    assert step is not None and target is not None
    acted = result == "failure" and meaning.action in ("loop", "reopen")
    found = await gather_evidence(state.project, source, failing, evidence if acted else None)
    step = await _record(db, state, step, target, sha, result, meaning, found, failing)
    return await _act(ctx, state, step, sha, result, meaning, found)


def _meaning(
    settings: Any, state: RunState, views: Any, target: Any, sha: str, result: CIResult
) -> CIMeaning:
    """What a CI result on `sha` means for this run, by `interpret_ci` and the repo's policies."""
    rs = state.run.runtime_state or {}
    return interpret_ci(
        state.run.status,
        views,
        sha,
        result,
        qa_queued=bool(settings.auto_qa_after_exec)
        and (target is None or target.qa_policy != "skip"),
        auto_qa_on_ci=bool(settings.auto_qa_on_ci),
        merged=bool(rs.get("merged")),
        gates=ci_gates(
            repo_policies(state.project.config), bool(getattr(settings, "ci_gates", True))
        ),
    )


async def _record(
    db: Any,
    state: RunState,
    step: Any,
    target: Any,
    sha: str,
    result: CIResult,
    meaning: CIMeaning,
    found: CIEvidence,
    failing: list[tuple[str, str]],
) -> Any:
    """Keep the result on the step (what it was for, its fingerprint) and log it as an event."""
    run_id = state.run.id
    fp = found.fingerprint()
    await update_step(
        db,
        step.id,
        runtime_state={
            **(step.runtime_state or {}),
            "ci": {
                "sha": sha,
                "result": result,
                "for_commit": target.commit_sha or "",
                "fingerprint": fp.digest if result == "failure" else "",
            },
        },
    )
    step = (await load_run(db, run_id)).step(step.step_index)
    await emit(
        db,
        state,
        f"ci.{result}",
        meaning.reason,
        step,
        failing=[f"{n}: {c}" for n, c in (found.failing or failing)],
        action=meaning.action,
        sha=sha,
        **({"fingerprint": fp.digest, "failure": fp.label} if result == "failure" else {}),
    )
    return step


async def _act(
    ctx: dict[str, Any],
    state: RunState,
    step: Any,
    sha: str,
    result: CIResult,
    meaning: CIMeaning,
    found: CIEvidence,
) -> str:
    """Apply the meaning: record, QA, complete, reopen or loop."""
    db = ctx["db"]
    run_id = state.run.id
    if meaning.action == "record":
        await publish_status(ctx, run_id)
        return "recorded"
    if meaning.action == "run_qa":
        await jobs.submit(ctx["redis"], jobs.run_quality(run_id, step.step_index, f"ci-{sha}"))
        return "run_qa"
    if meaning.action == "complete":
        await set_step_status(db, step.id, StepStatus.COMPLETED, meaning.reason)

        # the protocol's completion re-renders the status comment itself: not twice in a row
        if not await after_step_completed(ctx, run_id, step.step_index, 0):
            await publish_status(ctx, run_id)
        return "complete"
    if meaning.action == "reopen":
        return await _reopen(ctx, state, step, meaning.reason, found, sha)
    return await _loop(ctx, state, step, sha, result, found)


async def _keep_evidence(
    db: Any, step: Any, evidence: CIEvidence, sha: str | None, why: str
) -> None:
    """The failure becomes the step's feedback: a later attempt (automatic or `/retry`) sees it."""
    rs = step.runtime_state or {}
    item = ci_item(evidence, step.retries + 1, sha)
    await update_step(
        db,
        step.id,
        runtime_state={**rs, "feedback": add_item(rs.get("feedback"), item), "attempt_why": why},
    )


async def _reopen(
    ctx: dict[str, Any],
    state: RunState,
    step: Any,
    reason: str,
    evidence: CIEvidence,
    sha: str | None,
) -> str:
    """Red CI on a completed step: the step and its protocol go back to blocked, with the reason."""
    db = ctx["db"]
    failing = evidence.failing
    detail = reason + ("\n" + "\n".join(f"- {n}: {c}" for n, c in failing) if failing else "")
    await _keep_evidence(db, step, evidence, sha, f"CI failed: {evidence.fingerprint().label}")
    await set_step_status(db, step.id, StepStatus.BLOCKED, reason)
    if state.run.status in (ProtocolStatus.RUNNING, ProtocolStatus.COMPLETED):
        await set_protocol_status(
            db,
            state.run.id,
            ProtocolStatus.BLOCKED,
            reason,
            runtime_state={**(state.run.runtime_state or {}), "message": detail},
        )
    else:
        await update_run(
            db, state.run.id, runtime_state={**(state.run.runtime_state or {}), "message": detail}
        )
    await publish_status(ctx, state.run.id, reason)
    return "reopened"


async def _loop(
    ctx: dict[str, Any],
    state: RunState,
    step: Any,
    sha: str,
    result: CIResult,
    evidence: CIEvidence,
) -> str:
    """Red CI on a step still waiting on its gates: loop per its policy, or block for a human."""
    db = ctx["db"]
    run_id = state.run.id
    spec = spec_of(state)
    step_spec = next(s for s in spec.steps if s.index == step.step_index)
    fp = evidence.fingerprint()
    decision = ci_decision(
        step_spec,
        state.run.runtime_state or {},
        result,
        fp.digest,
        ctx["settings"].auto_qa_on_ci,
        label=fp.label,
    )
    attempts = int((state.run.runtime_state or {}).get("ci_attempts", 0)) + 1
    await update_run(
        db, run_id, runtime_state={**decision.new_runtime_state, "ci_attempts": attempts}
    )
    item = ci_item(evidence, step.retries + 1, sha)
    why = f"CI failed: {fp.label}"
    if decision.action == "retry":
        return await _retry(ctx, run_id, step, sha, decision, item, why)
    await _keep_evidence(db, step, evidence, sha, why)
    try:
        await set_step_status(db, step.id, StepStatus.FAILED, decision.reason)
    except TransitionConflict:
        pass
    await _block_run(db, state, decision, attempts)
    await publish_status(ctx, run_id, decision.reason)
    return "block"


async def _retry(
    ctx: dict[str, Any], run_id: int, step: Any, sha: str, decision: Any, item: Any, why: str
) -> str:
    """The loop runs again: the reset steps get the failure as feedback and go back to pending."""
    db = ctx["db"]
    fresh = await load_run(db, run_id)
    for index in decision.reset_steps:
        target = fresh.step(index)
        rs = target.runtime_state or {}
        await update_step(
            db,
            target.id,
            retries=target.retries + 1,
            runtime_state={
                **rs,
                "feedback": add_item(rs.get("feedback"), item),
                "attempt_why": why,
            },
        )
        try:
            await set_step_status(db, target.id, StepStatus.PENDING, f"CI loop: {decision.reason}")
        except TransitionConflict:
            pass
    first = min(decision.reset_steps or [step.step_index])
    await jobs.submit(ctx["redis"], jobs.execute_step(run_id, first, f"ci-{sha}"))
    await publish_status(ctx, run_id, decision.reason)
    return "retry"


async def _block_run(db: Any, state: RunState, decision: Any, attempts: int) -> None:
    """No loop left: the protocol waits for a human, with the decision's reason as its message."""
    run_id = state.run.id
    if state.run.status != ProtocolStatus.BLOCKED:
        try:
            await set_protocol_status(
                db,
                run_id,
                ProtocolStatus.BLOCKED,
                decision.reason,
                runtime_state={
                    **decision.new_runtime_state,
                    "ci_attempts": attempts,
                    "message": decision.reason,
                },
            )
        except TransitionConflict:
            pass


async def pr_finished(ctx: dict[str, Any], run_id: int, merged: bool) -> str:
    state = await load_run(ctx["db"], run_id)
    if merged:
        # remembered so that a red CI arriving after the merge is recorded, not reopened
        await update_run(
            ctx["db"], run_id, runtime_state={**(state.run.runtime_state or {}), "merged": True}
        )
    if state.run.status in (ProtocolStatus.COMPLETED, ProtocolStatus.CANCELLED):
        return f"already-{state.run.status}"
    wanted = ProtocolStatus.COMPLETED if merged else ProtocolStatus.CANCELLED
    if merged and state.run.status != ProtocolStatus.RUNNING:
        # a merge is final whatever the bot thought: walk through running if needed
        try:
            await set_protocol_status(
                ctx["db"], run_id, ProtocolStatus.RUNNING, "pull request merged"
            )
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


async def ci_step_for(ctx: dict[str, Any], run_id: int, sha: str) -> int | None:
    """The step that owns commit `sha`, or None (recorded as a `ci.stale` event)."""
    state = await load_run(ctx["db"], run_id)
    step = step_for_sha(step_views(state), sha)
    if step is None:
        await emit(ctx["db"], state, "ci.stale", f"{sha[:12]} is no step's commit", sha=sha)
        return None
    return step.index
