"""Tell people what is happening: the status comment, check runs and the draft PR, from stored state."""

from __future__ import annotations

import logging
from typing import Any, Literal

from bot.forge.base import CheckConclusion, CheckState, CommentRef, Forge, IssueRef, PullRef
from bot.rendering import ProtocolView, StepView, check_run_output, status_comment, status_marker
from bot.runs import RunState, emit, load_run

log = logging.getLogger(__name__)


def step_view(step: Any) -> StepView:
    rs = step.runtime_state or {}
    duration = None
    if step.started_at and step.finished_at:
        duration = (step.finished_at - step.started_at).total_seconds()
    return StepView(
        index=step.step_index,
        title=(step.summary or step.step_name),
        status=step.status,
        slug=step.step_name,
        qa_policy=(step.policy or {}).get("qa", {}).get("policy"),
        qa_verdict=rs.get("qa_verdict"),
        tokens=step.tokens_used or None,
        duration_seconds=duration,
        commit_sha=rs.get("commit_sha"),
        output=rs.get("last_message"),
        qa_report=rs.get("qa_report"),
        error=rs.get("error"),
    )


def protocol_view(state: RunState, message: str | None = None) -> ProtocolView:
    run = state.run
    current = next((s.step_index for s in state.steps if s.status in ("running", "needs_qa")), None)
    if current is None:
        current = next((s.step_index for s in state.steps if s.status == "pending"), None)
    return ProtocolView(
        name=run.protocol_name,
        status=run.status,
        task=run.description,
        steps=tuple(step_view(s) for s in state.steps),
        current_step=current,
        branch=run.protocol_name,
        pr_url=run.pr_url,
        pr_number=run.pr_number,
        tokens_used=run.tokens_used or None,
        message=message or (run.runtime_state or {}).get("message"),
        updated_at=run.updated_at,
    )


def forge_of(ctx: dict[str, Any], state: RunState) -> Forge:
    forge: Forge = ctx["forges"].forge_for(state.project)
    return forge


def issue_ref(ctx: dict[str, Any], state: RunState) -> IssueRef:
    repo = ctx["forges"].repo_ref(state.project)
    return IssueRef(repo, state.run.issue_number or 0, "issue")


async def publish_status(ctx: dict[str, Any], run_id: int, message: str | None = None) -> None:
    """Re-render the one status comment (issue, and PR when there is one); never fails the job."""
    state = await load_run(ctx["db"], run_id)
    body = status_comment(protocol_view(state, message))
    forge = forge_of(ctx, state)
    marker = status_marker(state.run.protocol_name)
    repo = ctx["forges"].repo_ref(state.project)
    targets = []
    if state.run.issue_number or state.project.provider == "local":
        targets.append(IssueRef(repo, state.run.issue_number or 0, "issue"))
    if state.run.pr_number:
        kind: Literal["pull", "merge_request"] = "merge_request" if state.project.provider == "gitlab" else "pull"
        targets.append(IssueRef(repo, state.run.pr_number, kind))
    for target in targets:
        try:
            await forge.upsert_status_comment(target, marker, body)
        except Exception as exc:  # feedback is best effort; the state is in the database
            log.warning("status comment for %s failed: %s", state.run.protocol_name, exc)
            await emit(ctx["db"], state, "feedback.failed", f"status comment: {type(exc).__name__}")


async def report_check(
    ctx: dict[str, Any],
    run_id: int,
    step_index: int,
    kind: Literal["step", "qa"],
    head_sha: str,
    *,
    status: CheckState = "completed",
    conclusion: CheckConclusion | None = None,
    verdict: str | None = None,
    changed_files: tuple[str, ...] = (),
    tokens: int | None = None,
    quality_report: str | None = None,
    message: str = "",
) -> None:
    state = await load_run(ctx["db"], run_id)
    step = state.step(step_index)
    has_next = any(s.step_index > step_index for s in state.steps)
    report = check_run_output(
        kind=kind,
        protocol_name=state.run.protocol_name,
        step=step_view(step),
        head_sha=head_sha,
        status=status,
        conclusion=conclusion,
        verdict=verdict,
        changed_files=changed_files,
        tokens=tokens,
        quality_report=quality_report,
        has_next_step=has_next,
        message=message,
    )
    try:
        await forge_of(ctx, state).report_check(ctx["forges"].repo_ref(state.project), report)
    except Exception as exc:
        log.warning("check %s failed: %s", report.name, exc)
        await emit(ctx["db"], state, "feedback.failed", f"check {report.name}: {type(exc).__name__}", step)


async def open_or_update_pr(ctx: dict[str, Any], run_id: int, title: str, body: str) -> PullRef | None:
    state = await load_run(ctx["db"], run_id)
    forge = forge_of(ctx, state)
    repo = ctx["forges"].repo_ref(state.project)
    try:
        pull = await forge.open_draft_pr(
            repo, head=state.run.protocol_name, base=state.run.base_branch, title=title, body=body
        )
    except Exception as exc:
        log.warning("draft PR for %s failed: %s", state.run.protocol_name, exc)
        await emit(ctx["db"], state, "feedback.failed", f"draft PR: {type(exc).__name__}")
        return None
    return pull


async def react_done(ctx: dict[str, Any], run_id: int, reply_to: dict[str, Any] | None, ok: bool) -> None:
    """🚀 on the comment that asked for a job once it finished well, 😕 when it did not."""
    if not reply_to:
        return
    state = await load_run(ctx["db"], run_id)
    repo = ctx["forges"].repo_ref(state.project)
    target = IssueRef(repo, int(reply_to.get("number", 0)), reply_to.get("kind", "issue"))
    try:
        await forge_of(ctx, state).add_reaction(CommentRef(target, int(reply_to["comment_id"])), "rocket" if ok else "confused")
    except Exception as exc:
        log.warning("reaction failed: %s", exc)
