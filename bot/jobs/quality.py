"""run_quality: the QA engine call, its report committed with the step, and the verdict applied."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot import git as gitops
from bot.ci import complete_after_qa
from bot.engine_guard import cap_report
from bot.errors import TransitionConflict
from bot.feedback import report_state_check
from bot.git import CommitInfo
from bot.jobs.boundary import guarded
from bot.jobs.engine_run import EngineCall, run_engine, step_prompt
from bot.jobs.env import JobEnv
from bot.jobs.execute import WRITTEN, read, spec_of, step_spec_of, step_values
from bot.jobs.outcome import Check, Outcome, known, write_outcome
from bot.jobs.plan import step_marker
from bot.models import ProtocolRun, StepRun
from bot.policies import explain_verdict, loop_decision
from bot.rendering import commit_message
from bot.runs import RunState, emit, load_run, update_step
from bot.spec import ProtocolSpec, StepSpec
from bot.store import transition

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


async def run_quality(
    ctx: dict[str, Any], *, protocol_run_id: int, step_index: int, reply_to: dict[str, Any] | None = None
) -> str:
    async def body(env: JobEnv) -> str:
        return await _quality(env, protocol_run_id, step_index, reply_to)

    outcome = await guarded(ctx, "run_quality", protocol_run_id, step_index, body, reply_to)
    if outcome not in WRITTEN | {"PASS", "FAIL", "retry", "wait_ci"}:
        from bot.feedback import react_done

        await react_done(ctx, protocol_run_id, reply_to, False)
    from bot.jobs.advance import after_quality

    await after_quality(ctx, protocol_run_id, step_index, outcome)
    return outcome


async def _quality(env: JobEnv, run_id: int, step_index: int, reply_to: dict[str, Any] | None) -> str:
    state = await load_run(env.db, run_id)
    step = state.step(step_index)
    if step.status not in ("needs_qa", "completed"):
        await emit(env.db, state, "qa.refused", f"step {step_index:02d} is {step.status}", step)
        return f"skipped-{step.status}"
    if state.run.status not in ("running", "planned", "blocked"):
        await emit(env.db, state, "qa.refused", f"protocol is {state.run.status}", step)
        return f"refused-{state.run.status}"
    await _begin(env, state, step)
    spec = spec_of(state)
    work = QAWork(env, state, step, step_spec_of(spec, step_index), spec, await env.worktree(state), reply_to)
    last = await gitops.last_commit(work.workdir)
    await report_state_check(env.ctx, state, step_index, "qa", last.sha, status="in_progress")
    result = await run_engine(env, state, await _qa_call(work, last))
    # strict: only the last line outside fences and quotes counts (bot/policies.py)
    verdict, why = explain_verdict(result.final_message) if result.ok else ("FAIL", f"engine {result.outcome}")
    title = f"# Quality report — step {step_index:02d}: {work.step_spec.title}"
    report = cap_report(f"{title}\n\n{result.final_message.strip() or result.error or ''}\n")
    sha, head = await _commit_report(work, report, verdict)
    attempts = int((step.runtime_state or {}).get("qa_attempts", 0)) + 1
    step_state = {"qa_verdict": verdict, "qa_attempts": attempts, "qa_report": report[-4000:], "qa_commit": sha}
    if verdict == "PASS":
        return await _passed(work, head, report, step_state, why)
    return await _failed(work, head, report, step_state, why)


async def _begin(env: JobEnv, state: RunState, step: StepRun) -> None:
    """QA of a completed step reopens it; QA from planned/blocked puts the protocol back to work."""
    async with env.db.sessions.begin() as session:
        if step.status == "completed":
            await transition(
                session, StepRun, step.id, "needs_qa", ["completed"],
                event_message="QA requested again", known=known(state, "completed"),
            )
            step.status = "needs_qa"
        if state.run.status in ("blocked", "planned"):
            await transition(
                session, ProtocolRun, state.run.id, "running", [state.run.status],
                event_message=f"QA of step {step.step_index:02d}", known=known(state, state.run.status),
            )
            state.run.status = "running"


async def _qa_call(work: QAWork, last: CommitInfo) -> EngineCall:
    state, s = work.state, work.step_spec
    root = work.workdir / ".protocols" / state.run.protocol_name
    status_lines = "\n".join(f"{e.code} {e.path}" for e in await gitops.status_porcelain(work.workdir)) or "(clean)"
    changes = (
        f"git status:\n{status_lines}\n\nlast commit {last.sha[:12]}: {last.message}\n{last.stat}\n\n"
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
        phase="qa", prompt=prompt, workdir=work.workdir, step_spec=s, spec=work.spec, step=work.step,
        sandbox="read-only",
        context={"step_index": s.index, "slug": s.slug, "title": s.title, "qa_attempt": attempt},
    )


async def _commit_report(work: QAWork, report: str, verdict: str) -> tuple[str | None, str]:
    env, state, index = work.env, work.state, work.step.step_index
    (work.workdir / ".protocols" / state.run.protocol_name / QA_REPORT).write_text(report)
    message = commit_message(
        "test", "qa", f"quality report for step {index:02d}: {verdict}", state.number, index
    ).replace(step_marker(state.number, index), qa_marker(state.number, index))
    sha = await gitops.commit_all(work.workdir, message, env.settings.bot_name, env.settings.bot_email)
    head = await env.push(state, work.workdir)
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


async def _passed(work: QAWork, head: str, report: str, step_state: dict[str, Any], why: str) -> str:
    env, index, run_id = work.env, work.step.step_index, work.state.run.id
    # the CI gate (bot/ci_gate.py): where the repository has CI, green CI on this attempt too;
    # it completes the step or leaves it waiting, under the lock CI results take as well
    verdict = _verdict_event(work, "PASS", head, why)
    # the verdict reads before the transition it causes, as every outcome's event does
    await emit(env.db, work.state, verdict.pop("event"), verdict.pop("event_message"), work.step,
               **verdict.pop("event_metadata"))  # fmt: skip
    gate = await complete_after_qa(env.ctx, run_id, index)
    state = await load_run(env.db, run_id)  # with the gate's transition and what CI wrote
    outcome = Outcome(
        message="QA passed" if gate == "completed" else "QA passed; waiting for CI",
        step_state=step_state, show_message=False, ok=True,
        check=Check("qa", head, "success", verdict="PASS", quality_report=report),
        **verdict,
    )
    await write_outcome(env, state, index, outcome, work.reply_to)
    return "PASS" if gate == "completed" else "wait_ci"


async def _failed(work: QAWork, head: str, report: str, step_state: dict[str, Any], why: str) -> str:
    env, state, step = work.env, work.state, work.step
    decision = loop_decision(work.step_spec, state.run.runtime_state or {}, "qa_fail")
    check = Check("qa", head, "failure", verdict="FAIL", quality_report=report)
    if decision.action == "retry":
        await update_step(env.db, step.id, runtime_state={**(step.runtime_state or {}), **step_state})
        step.runtime_state = {**(step.runtime_state or {}), **step_state}
        await reset_for_loop(env, state, decision.reset_steps, report[-4000:], decision.reason)
        outcome = Outcome(
            message=decision.reason, run_state=decision.new_runtime_state, check=check, ok=False,
            **_verdict_event(work, "FAIL", head, why),
        )
        await write_outcome(env, state, step.step_index, outcome, work.reply_to)
        return "retry"
    outcome = Outcome(
        message=decision.reason, step_to="failed", protocol_to="blocked", step_state=step_state,
        run_state=decision.new_runtime_state, check=check, ok=False, **_verdict_event(work, "FAIL", head, why),
    )
    await write_outcome(env, state, step.step_index, outcome, work.reply_to)
    return "FAIL"


async def reset_for_loop(env: JobEnv, state: RunState, indexes: list[int], feedback: str, reason: str) -> None:
    """A loop sends steps back to pending with the failure as feedback (QA here, CI in bot/ci.py)."""
    for index in indexes:
        target = state.step(index)
        rs = {**(target.runtime_state or {}), "feedback": feedback}
        await update_step(env.db, target.id, retries=target.retries + 1, runtime_state=rs)
        target.retries, target.runtime_state = target.retries + 1, rs
        try:
            from bot.runs import set_step_status

            await set_step_status(env.db, target.id, "pending", f"loop: {reason}")
            target.status = "pending"
        except TransitionConflict:
            pass
