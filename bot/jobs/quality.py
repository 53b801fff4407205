"""run_quality: the QA engine call, its report committed with the step, and the verdict applied."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update

from bot import git as gitops
from bot.core.errors import TransitionConflict
from bot.domain.engine_guard import cap_report
from bot.domain.fix_feedback import FeedbackItem, add_item, qa_item
from bot.domain.policies import explain_verdict, loop_decision
from bot.domain.rendering import commit_message
from bot.domain.spec import ProtocolSpec, StepSpec
from bot.domain.states import ProtocolStatus, StepStatus
from bot.git import CommitInfo
from bot.jobs.advance import after_quality, completion_follows
from bot.jobs.boundary import discard_changes, guarded
from bot.jobs.engine_run import EngineCall, run_engine, step_prompt
from bot.jobs.env import JobEnv
from bot.jobs.execute import WRITTEN
from bot.jobs.feedback import react_done, report_state_check
from bot.jobs.gating import complete_after_qa
from bot.jobs.outcome import Check, Outcome, known, write_outcome
from bot.jobs.plan import step_marker
from bot.jobs.specs import read, spec_of, step_spec_of, step_values
from bot.storage.models import ProtocolRun, StepRun, utcnow
from bot.storage.runs import RunState, emit, load_run, set_step_status, transition, update_step

QA_REPORT = "quality-report.md"


def qa_marker(number: int, step_index: int) -> str:
    return f"[protocol-{number:04d}/{step_index:02d}-qa]"


@dataclass
class QAWork:
    """One QA run: the state, the step, where it runs."""

    env: JobEnv
    state: RunState
    step: StepRun
    step_spec: StepSpec
    spec: ProtocolSpec
    workdir: Path
    reply_to: dict[str, Any] | None


def qa_in_progress(step: StepRun) -> str | None:
    """The head a QA run of this step started from, while no verdict of it was written.

    Set when QA starts, cleared by its verdict: a step `needs_qa` with this mark and no live
    lease lost its QA worker, and the reclaim cron (bot/jobs/reclaim.py) runs the QA again.
    """
    mark = (step.runtime_state or {}).get("qa_running")
    return mark if isinstance(mark, str) else None


async def run_quality(
    ctx: dict[str, Any],
    *,
    protocol_run_id: int,
    step_index: int,
    reply_to: dict[str, Any] | None = None,
    reclaim: bool = False,
) -> str:
    async def body(env: JobEnv) -> str:
        if (
            reclaim
            and qa_in_progress((await load_run(env.db, protocol_run_id)).step(step_index)) is None
        ):
            return "skipped-qa-done"  # a verdict was written after the reclaim cron looked
        return await _quality(env, protocol_run_id, step_index, reply_to, reclaim)

    outcome = await guarded(ctx, "run_quality", protocol_run_id, step_index, body, reply_to)
    if outcome not in WRITTEN | {"PASS", "FAIL", "retry", "wait_ci"}:
        await react_done(ctx, protocol_run_id, reply_to, False)
    await after_quality(ctx, protocol_run_id, step_index, outcome)
    return outcome


async def _quality(
    env: JobEnv,
    run_id: int,
    step_index: int,
    reply_to: dict[str, Any] | None,
    reclaim: bool = False,
) -> str:
    state = await load_run(env.db, run_id)
    step = state.step(step_index)
    if step.status not in (StepStatus.NEEDS_QA, StepStatus.COMPLETED):
        await emit(env.db, state, "qa.refused", f"step {step_index:02d} is {step.status}", step)
        return f"skipped-{step.status}"
    if state.run.status not in (
        ProtocolStatus.RUNNING,
        ProtocolStatus.PLANNED,
        ProtocolStatus.BLOCKED,
    ):
        await emit(env.db, state, "qa.refused", f"protocol is {state.run.status}", step)
        return f"refused-{state.run.status}"
    spec = spec_of(state)
    work = QAWork(
        env,
        state,
        step,
        step_spec_of(spec, step_index),
        spec,
        await env.worktree(state, step_index),
        reply_to,
    )
    taken_back = qa_in_progress(step) if reclaim else None
    if taken_back:  # what the dead worker left uncommitted is not this run's
        await discard_changes(env, state, work.workdir, step_index)
    last = await gitops.last_commit(work.workdir)
    await _begin(env, state, step, taken_back or last.sha)
    await report_state_check(env.ctx, state, step_index, "qa", last.sha, status="in_progress")
    earlier = await _earlier_report(work, taken_back) if taken_back else None
    verdict: str
    sha: str | None
    if earlier is not None:  # the dead worker's QA had committed its report: push it, judge it
        sha, report = earlier
        verdict, why = explain_verdict(report)
        head = await env.push(state, work.workdir)
    else:
        verdict, why, report = await _judge(work, last)
        sha, head = await _commit_report(work, report, verdict)
    attempts = int((step.runtime_state or {}).get("qa_attempts", 0)) + 1
    step_state = {
        "qa_verdict": verdict,
        "qa_attempts": attempts,
        "qa_report": report[-4000:],
        "qa_commit": sha,
        "qa_running": None,
    }
    if verdict == "PASS":
        return await _passed(work, head, report, step_state, why)
    return await _failed(work, head, report, step_state, why)


async def _judge(work: QAWork, last: CommitInfo) -> tuple[str, str, str]:
    """The QA engine turn: verdict, why, and the report to commit."""
    result = await run_engine(work.env, work.state, await _qa_call(work, last))
    # strict: only the last line outside fences and quotes counts (bot/domain/policies.py)
    verdict, why = (
        explain_verdict(result.final_message) if result.ok else ("FAIL", f"engine {result.outcome}")
    )
    title = f"# Quality report — step {work.step.step_index:02d}: {work.step_spec.title}"
    report = cap_report(f"{title}\n\n{result.final_message.strip() or result.error or ''}\n")
    work.env.crash_point("qa_before_commit", work.state.run.id, work.step.step_index)
    return verdict, why, report


async def _earlier_report(work: QAWork, start: str) -> tuple[str, str] | None:
    """(sha, report) of the QA-report commit a dead worker made after `start`, on this branch."""
    state, index, timeout = work.state, work.step.step_index, work.env.settings.git_timeout_s
    found = await gitops.run_git(
        [
            "log",
            "--format=%H",
            "--fixed-strings",
            f"--grep={qa_marker(state.number, index)}",
            f"{start}..HEAD",
            "--",
        ],
        cwd=work.workdir,
        timeout=timeout,
        check=False,
    )
    shas = found.out.split() if found.returncode == 0 else []
    if not shas:
        return None
    path = f".protocols/{state.run.protocol_name}/{QA_REPORT}"
    shown = await gitops.run_git(
        ["show", f"{shas[0]}:{path}"], cwd=work.workdir, timeout=timeout, check=False
    )
    return (shas[0], shown.out) if shown.returncode == 0 and shown.out.strip() else None


async def _begin(env: JobEnv, state: RunState, step: StepRun, start: str) -> None:
    """QA of a completed step reopens it; QA from planned/blocked puts the protocol back to work.
    The step keeps where this QA run started until its verdict: a dead worker's QA is found."""
    async with env.db.sessions.begin() as session:
        rs = {**(step.runtime_state or {}), "qa_running": start}
        await session.execute(
            update(StepRun)
            .where(StepRun.id == step.id)
            .values(runtime_state=rs, updated_at=utcnow())
        )
        step.runtime_state = rs
        if step.status == StepStatus.COMPLETED:
            await transition(
                session,
                StepRun,
                step.id,
                StepStatus.NEEDS_QA,
                [StepStatus.COMPLETED],
                event_message="QA requested again",
                known=known(state, StepStatus.COMPLETED),
            )
            step.status = StepStatus.NEEDS_QA
        if state.run.status in (ProtocolStatus.BLOCKED, ProtocolStatus.PLANNED):
            await transition(
                session,
                ProtocolRun,
                state.run.id,
                ProtocolStatus.RUNNING,
                [state.run.status],
                event_message=f"QA of step {step.step_index:02d}",
                known=known(state, state.run.status),
            )
            state.run.status = ProtocolStatus.RUNNING


async def _qa_call(work: QAWork, last: CommitInfo) -> EngineCall:
    state, s = work.state, work.step_spec
    root = work.workdir / ".protocols" / state.run.protocol_name
    status_lines = (
        "\n".join(f"{e.code} {e.path}" for e in await gitops.status_porcelain(work.workdir))
        or "(clean)"
    )
    changes = (
        f"git status:\n{status_lines}\n\n"
        f"last commit {last.sha[:12]}: {last.message}\n{last.stat}\n\n"
        f"plan.md:\n{read(root / 'plan.md')}\n\ncontext.md:\n{read(root / 'context.md')}\n\n"
        f"log.md:\n{read(root / 'log.md')}"
    )
    values = {
        **step_values(state, s, root),
        "changes": changes,
        "report_file": f".protocols/{state.run.protocol_name}/{QA_REPORT}",
        "qa_policy": s.qa.policy,
    }
    prompt = await step_prompt(work.env, state, s.qa.prompt, "quality-validator", values)
    attempt = int((work.step.runtime_state or {}).get("qa_attempts", 0)) + 1
    return EngineCall(
        phase="qa",
        prompt=prompt,
        workdir=work.workdir,
        step_spec=s,
        spec=work.spec,
        step=work.step,
        sandbox="read-only",
        context={"step_index": s.index, "slug": s.slug, "title": s.title, "qa_attempt": attempt},
    )


async def _commit_report(work: QAWork, report: str, verdict: str) -> tuple[str | None, str]:
    env, state, index = work.env, work.state, work.step.step_index
    (work.workdir / ".protocols" / state.run.protocol_name / QA_REPORT).write_text(report)
    message = commit_message(
        "test", "qa", f"quality report for step {index:02d}: {verdict}", state.number, index
    ).replace(step_marker(state.number, index), qa_marker(state.number, index))
    sha = await gitops.commit_all(
        work.workdir, message, env.settings.bot_name, env.settings.bot_email
    )
    env.crash_point("qa_after_commit", state.run.id, index)
    head = await env.push(state, work.workdir, index)
    return sha, head


def _verdict_event(work: QAWork, verdict: str, head: str, why: str) -> dict[str, Any]:
    """Outcome fields shared by every verdict: the qa.verdict event and the new head."""
    shown = f"step {work.step.step_index:02d}: {verdict}"
    return {
        "event": "qa.verdict",
        "event_message": shown + ("" if why.startswith("VERDICT: ") else f" ({why})"),
        "event_metadata": {"verdict": verdict, "reason": why},
        "run_values": {"head_sha": head},
    }


async def _passed(
    work: QAWork, head: str, report: str, step_state: dict[str, Any], why: str
) -> str:
    env, index, run_id = work.env, work.step.step_index, work.state.run.id
    # the CI gate (bot/domain/ci_gate.py): where the repository has CI, green CI on this attempt
    # too;
    # it completes the step or leaves it waiting, under the lock CI results take as well
    verdict = _verdict_event(work, "PASS", head, why)
    # the verdict reads before the transition it causes, as every outcome's event does
    await emit(env.db, work.state, verdict.pop("event"), verdict.pop("event_message"), work.step,
               **verdict.pop("event_metadata"))  # fmt: skip
    gate = await complete_after_qa(env.ctx, run_id, index)
    state = await load_run(env.db, run_id)  # with the gate's transition and what CI wrote

    outcome = Outcome(
        message="QA passed" if gate == "completed" else "QA passed; waiting for CI",
        step_state=step_state,
        show_message=False,
        ok=True,
        publish=not (gate == "completed" and completion_follows(state, index)),
        check=Check("qa", head, "success", verdict="PASS", quality_report=report),
        **verdict,
    )
    await write_outcome(env, state, index, outcome, work.reply_to)
    return "PASS" if gate == "completed" else "wait_ci"


async def _failed(
    work: QAWork, head: str, report: str, step_state: dict[str, Any], why: str
) -> str:
    env, state, step = work.env, work.state, work.step
    decision = loop_decision(work.step_spec, state.run.runtime_state or {}, "qa_fail")
    check = Check("qa", head, "failure", verdict="FAIL", quality_report=report)
    # the report's findings go to the next attempt, automatic or a human's /retry
    item = qa_item(report, step.retries + 1)
    step_state = {
        **step_state,
        "feedback": add_item((step.runtime_state or {}).get("feedback"), item),
        "attempt_why": f"QA FAIL ({why})" if not why.startswith("VERDICT: ") else "QA FAIL",
    }
    if decision.action == "retry":
        await update_step(
            env.db, step.id, runtime_state={**(step.runtime_state or {}), **step_state}
        )
        step.runtime_state = {**(step.runtime_state or {}), **step_state}
        await reset_for_loop(env, state, decision.reset_steps, item, decision.reason)
        outcome = Outcome(
            message=decision.reason,
            run_state=decision.new_runtime_state,
            check=check,
            ok=False,
            **_verdict_event(work, "FAIL", head, why),
        )
        await write_outcome(env, state, step.step_index, outcome, work.reply_to)
        return "retry"
    outcome = Outcome(
        message=decision.reason,
        step_to=StepStatus.FAILED,
        protocol_to=ProtocolStatus.BLOCKED,
        step_state=step_state,
        run_state=decision.new_runtime_state,
        check=check,
        ok=False,
        **_verdict_event(work, "FAIL", head, why),
    )
    await write_outcome(env, state, step.step_index, outcome, work.reply_to)
    return "FAIL"


async def reset_for_loop(
    env: JobEnv, state: RunState, indexes: list[int], item: FeedbackItem, reason: str
) -> None:
    """A loop sends steps back to pending with the failure as feedback (QA here, CI in
    bot/jobs/ci.py)."""
    for index in indexes:
        target = state.step(index)
        rs = dict(target.runtime_state or {})
        rs["feedback"] = add_item(rs.get("feedback"), item)
        rs["attempt_why"] = f"QA FAIL on attempt {item.meta.get('attempt', '?')}"
        await update_step(env.db, target.id, retries=target.retries + 1, runtime_state=rs)
        target.retries, target.runtime_state = target.retries + 1, rs
        try:
            await set_step_status(env.db, target.id, StepStatus.PENDING, f"loop: {reason}")
            target.status = StepStatus.PENDING
        except TransitionConflict:
            pass
