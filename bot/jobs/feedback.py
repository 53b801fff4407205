"""Tell people what is happening: the status comment, check runs and the draft PR, from stored
state."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC
from typing import Any, Literal

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.domain import graph, links
from bot.domain.loop_policy import attempt_text
from bot.domain.rendering import (
    ProtocolView,
    StepView,
    check_run_output,
    status_comment,
    status_marker,
)
from bot.domain.states import StepStatus
from bot.forge.base import (
    CheckConclusion,
    CheckReport,
    CheckState,
    CommentRef,
    Forge,
    IssueRef,
    PullRef,
)
from bot.storage.models import ForgeRecord, utcnow
from bot.storage.records import RECORD_KEY, record_insert
from bot.storage.runs import RunState, emit, load_run, run_branch

log = logging.getLogger(__name__)


def step_view(step: Any, page_url: str | None = None) -> StepView:
    rs = step.runtime_state or {}
    duration = None
    if step.started_at and step.finished_at:
        # SQLite hands back naive datetimes; rows updated in memory hold aware ones
        start, end = (
            t if t.tzinfo else t.replace(tzinfo=UTC) for t in (step.started_at, step.finished_at)
        )
        duration = (end - start).total_seconds()
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
        page_url=page_url,
        cost_usd=getattr(step, "cost_usd", None) or None,
        attempt=_attempt(step),
    )


def _attempt(step: Any) -> str | None:
    """ "attempt 2/3: why" for a step being redone (its loop bound from the stored StepSpec)."""
    attempt = int(getattr(step, "retries", 0) or 0) + 1
    if attempt <= 1:
        return None
    loop = (step.policy or {}).get("loop")
    bound = loop.get("max_iterations") if isinstance(loop, dict) else None
    why = (step.runtime_state or {}).get("attempt_why")
    return attempt_text(
        attempt, bound if isinstance(bound, int) else None, why if isinstance(why, str) else None
    )


def protocol_view(
    state: RunState,
    message: str | None = None,
    command_prefix: str = "/",
    public_url: str | None = None,
) -> ProtocolView:
    """The status comment's view; `public_url` adds console links (none without it)."""
    run = state.run
    current = next(
        (
            s.step_index
            for s in state.steps
            if s.status in (StepStatus.RUNNING, StepStatus.NEEDS_QA)
        ),
        None,
    )
    if current is None:
        current = next((s.step_index for s in state.steps if s.status == StepStatus.PENDING), None)
    return ProtocolView(
        name=run.protocol_name,
        status=run.status,
        task=run.description,
        steps=tuple(
            step_view(s, links.step_page(public_url, run.id, s.step_index)) for s in state.steps
        ),
        current_step=current,
        branch=run_branch(run),
        pr_url=run.pr_url,
        pr_number=run.pr_number,
        tokens_used=run.tokens_used or None,
        message=message or (run.runtime_state or {}).get("message"),
        updated_at=run.updated_at,
        command_prefix=command_prefix,
        console_url=links.protocol_page(public_url, run.id),
        cost_usd=getattr(run, "cost_usd", None) or None,
        graph=graph_picture(state),
    )


def graph_picture(state: RunState) -> str | None:
    """The Mermaid picture of a plan that is a graph, each node with its state; None for a chain."""

    config = state.run.template_config
    if not graph.runs_in_parallel(config):
        return None
    views = {
        s.step_index: graph.StepView(
            s.status, (s.runtime_state or {}).get("integrated_attempt") == s.retries
        )
        for s in state.steps
    }
    return graph.mermaid(
        graph.dependencies_of_config(config),
        views,
        {s.step_index: s.summary or "" for s in state.steps},
    )


def forge_of(ctx: dict[str, Any], state: RunState) -> Forge:
    forge: Forge = ctx["forges"].forge_for(state.project)
    return forge


# Forge object ids worth remembering across workers (our status comments, open check runs), kept
# in forge_records under kinds of their own: a remembered id turns a list+edit into one edit.
MEMO_STATUS = "memo:status"
MEMO_CHECK = "memo:check"


def _memo_statements() -> tuple[Any, Any, Any]:
    """recall's SELECT and remember's upsert (Postgres, SQLite), built once: a step recalls and
    remembers a few times, and building and keying a statement costs more than sending it."""
    where = (
        ForgeRecord.project_id == bindparam("project_id"),
        ForgeRecord.kind == bindparam("kind"),
        ForgeRecord.key == bindparam("key"),
    )
    upserts = []
    for insert in (pg_insert, sqlite_insert):
        stmt = record_insert(insert)
        upserts.append(
            stmt.on_conflict_do_update(
                index_elements=RECORD_KEY,
                set_={"data": stmt.excluded.data, "updated_at": stmt.excluded.updated_at},
            )
        )
    return select(ForgeRecord.data).where(*where), upserts[0], upserts[1]


_RECALL, _REMEMBER_PG, _REMEMBER_SQLITE = _memo_statements()


async def recall(db: Any, project_id: int, kind: str, key: str) -> dict[str, Any] | None:
    async with db.one_read() as conn:
        row = await conn.scalar(_RECALL, {"project_id": project_id, "kind": kind, "key": key})
    return dict(row) if isinstance(row, dict) else None


async def remember(db: Any, project_id: int, kind: str, key: str, data: dict[str, Any]) -> None:
    """Keep `data` under the key: one statement, an insert that replaces the data of a row the
    key already has (two workers writing the same key: the later one wins, as before)."""
    stmt = _REMEMBER_SQLITE if db.is_sqlite else _REMEMBER_PG
    values = {"project_id": project_id, "kind": kind, "key": key, "data": data, "now": utcnow()}
    async with db.one_statement() as conn:  # one statement: its own transaction
        await conn.execute(stmt, values)


async def publish_status(ctx: dict[str, Any], run_id: int, message: str | None = None) -> None:
    """Re-render the one status comment (issue, and PR when there is one); never fails the job."""
    await publish_state(ctx, await load_run(ctx["db"], run_id), message)


async def publish_state(ctx: dict[str, Any], state: RunState, message: str | None = None) -> None:
    """publish_status from a state the caller already holds (no reload)."""
    settings = ctx.get("settings")
    prefix = settings.command_prefix if settings is not None else "/"
    public_url = settings.public_url if settings is not None else None
    body = status_comment(protocol_view(state, message, prefix, public_url))
    forge = forge_of(ctx, state)
    marker = status_marker(state.run.protocol_name)
    repo = ctx["forges"].repo_ref(state.project)
    for target in forge.status_targets(repo, state.run.issue_number, state.run.pr_number):
        try:
            if state.project.provider in ("github", "gitlab"):
                # the remembered id: an edit without listing the thread's comments first
                key = f"{state.run.protocol_name}:{target.kind}:{target.number}"
                memo = await recall(ctx["db"], state.project.id, MEMO_STATUS, key) or {}
                known = memo.get("id") if isinstance(memo.get("id"), int) else None
                ref = await forge.upsert_status_comment(target, marker, body, comment_id=known)
                if ref.comment_id != known:
                    await remember(
                        ctx["db"], state.project.id, MEMO_STATUS, key, {"id": ref.comment_id}
                    )
            else:
                await forge.upsert_status_comment(target, marker, body)
        except Exception as exc:  # feedback is best effort; the state is in the database
            log.warning("status comment for %s failed: %s", state.run.protocol_name, exc)
            await emit(ctx["db"], state, "feedback.failed", f"status comment: {type(exc).__name__}")


async def report_state_check(
    ctx: dict[str, Any],
    state: RunState,
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
    """The step's (or its QA's) check run / commit status, from a state the caller already holds."""
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
        details_url=links.step_page(ctx["settings"].public_url, state.run.id, step_index),
        cost_usd=step.cost_usd or None,
    )
    try:
        await _send_check(ctx, state, report)
    except Exception as exc:
        log.warning("check %s failed: %s", report.name, exc)
        await emit(
            ctx["db"], state, "feedback.failed", f"check {report.name}: {type(exc).__name__}", step
        )


async def _send_check(ctx: dict[str, Any], state: RunState, report: CheckReport) -> None:
    """Send a check and close the run left open on an older commit.

    A step starts its check on the commit it starts from and finishes on the commit it made: the
    first run would stay `in_progress` forever, so it is completed with the same result (without
    buttons: they belong on the current head). The open run's id is remembered so GitHub needs
    no lookup request.
    """
    forge = forge_of(ctx, state)
    repo = ctx["forges"].repo_ref(state.project)
    # every forge, Local included: its check records are per commit too, so the run left open
    # on the commit a step started from must be closed there as on GitHub and GitLab
    key = f"{state.run.protocol_name}:{report.name}"
    prev = await recall(ctx["db"], state.project.id, MEMO_CHECK, key)
    open_prev = prev if prev and prev.get("status") != "completed" else None
    known: int | None = None
    if open_prev is not None and open_prev.get("sha") == report.head_sha:
        known = open_prev.get("id") if isinstance(open_prev.get("id"), int) else None
    elif open_prev is not None and isinstance(open_prev.get("sha"), str):
        done = report.status == "completed"
        old = dataclasses.replace(
            report,
            head_sha=open_prev["sha"],
            status="completed",
            conclusion=report.conclusion if done else "neutral",
            summary=report.summary
            if done
            else f"Superseded by a new run on {report.head_sha[:12]}.",
            actions=(),
        )
        old_id = open_prev.get("id") if isinstance(open_prev.get("id"), int) else None
        await _put_check(forge, repo, old, old_id)
    run_id = await _put_check(forge, repo, report, known)
    await remember(
        ctx["db"],
        state.project.id,
        MEMO_CHECK,
        key,
        {"sha": report.head_sha, "id": run_id, "status": report.status},
    )


async def _put_check(
    forge: Forge, repo: Any, report: CheckReport, run_id: int | None
) -> int | None:
    # GitHub: check-run ids, so a known one is updated without a lookup; the remembered ids are
    # the truth here: no lookup request before creating a run. Commit statuses have no id.
    return await forge.put_check(repo, report, run_id=run_id, lookup=False)


async def open_or_update_pr(
    ctx: dict[str, Any], run_id: int | RunState, title: str, body: str
) -> PullRef | None:
    state = run_id if isinstance(run_id, RunState) else await load_run(ctx["db"], run_id)
    forge = forge_of(ctx, state)
    repo = ctx["forges"].repo_ref(state.project)
    try:
        pull = await forge.open_draft_pr(
            repo, head=run_branch(state.run), base=state.run.base_branch, title=title, body=body
        )
    except Exception as exc:
        log.warning("draft PR for %s failed: %s", state.run.protocol_name, exc)
        await emit(ctx["db"], state, "feedback.failed", f"draft PR: {type(exc).__name__}")
        return None
    return pull


async def react_done(
    ctx: dict[str, Any], run_id: int, reply_to: dict[str, Any] | None, ok: bool
) -> None:
    """🚀 on the comment that asked for a job once it finished well, 😕 when it did not."""
    if not reply_to:
        return
    await react_state(ctx, await load_run(ctx["db"], run_id), reply_to, ok)


async def react_state(
    ctx: dict[str, Any], state: RunState, reply_to: dict[str, Any] | None, ok: bool
) -> None:
    """react_done from a state the caller already holds."""
    if not reply_to or "comment_id" not in reply_to:
        return
    repo = ctx["forges"].repo_ref(state.project)
    target = IssueRef(repo, int(reply_to.get("number", 0)), reply_to.get("kind", "issue"))
    try:
        await forge_of(ctx, state).add_reaction(
            CommentRef(target, int(reply_to["comment_id"])), "rocket" if ok else "confused"
        )
    except Exception as exc:
        log.warning("reaction failed: %s", exc)
