"""execute_step: run one step's engine call in the worktree, commit it once, push it, record it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update

from bot import git as gitops
from bot.core.errors import StepStopped
from bot.domain.ci_gate import hold_for_ci
from bot.domain.fix_feedback import render_feedback
from bot.domain.policies import budget_check_after_step, budget_check_before_step, qa_decision
from bot.domain.rendering import commit_message, log_entry
from bot.domain.spec import ProtocolSpec, StepSpec
from bot.domain.states import ProtocolStatus, StartDecision, StepStatus, may_start_step
from bot.jobs.advance import after_execute, completion_follows
from bot.jobs.boundary import discard_changes, guarded
from bot.jobs.engine_run import STOPPING, EngineCall, run_engine, step_prompt
from bot.jobs.env import JobEnv
from bot.jobs.feedback import publish_state, react_done, report_state_check
from bot.jobs.gating import gating
from bot.jobs.integrate import leftover_markers, prepare_attempt
from bot.jobs.outcome import Check, Outcome, failure, known, write_outcome
from bot.jobs.placement import parallel
from bot.jobs.plan import step_marker
from bot.jobs.review import answers_review, reply_in_threads
from bot.jobs.schedule import missing_for
from bot.jobs.shutdown import resume_chain
from bot.jobs.specs import read, spec_of, step_spec_of, step_values
from bot.storage.models import ProtocolRun, StepRun, utcnow
from bot.storage.runs import RunState, emit, load_run, protocol_status, run_branch, transition
from engines.base import EngineResult

# outcomes the outcome writer already reacted to on the comment that asked
WRITTEN = frozenset(
    {"completed", "needs_qa", "needs_qa-run", "failed", "budget-blocked", "cancelled", "paused"}
)


@dataclass
class StepWork:
    """One attempt at a step, as it goes: the state it runs on, where, and what it produced."""

    env: JobEnv
    state: RunState
    step: StepRun
    step_spec: StepSpec
    spec: ProtocolSpec
    workdir: Path
    reply_to: dict[str, Any] | None
    sha: str | None = None
    result: EngineResult | None = None
    fresh: bool = False


async def execute_step(
    ctx: dict[str, Any],
    *,
    protocol_run_id: int,
    step_index: int,
    depth: int = 0,
    reply_to: dict[str, Any] | None = None,
) -> str:
    async def body(env: JobEnv) -> str:
        return await _execute(env, protocol_run_id, step_index, reply_to)

    outcome = await guarded(ctx, "execute_step", protocol_run_id, step_index, body, reply_to)
    if outcome == "skipped-completed":  # handed back (SIGTERM) after it was done
        await resume_chain(ctx, protocol_run_id)
    if outcome not in WRITTEN:
        await react_done(ctx, protocol_run_id, reply_to, False)
    # pushed: answer a review's threads; a re-run of a job whose worker died after the push
    # (skipped: the step is past running) answers the threads it left (each thread once)
    state: RunState | None = None
    if outcome in ("completed", "needs_qa", "needs_qa-run") or outcome.startswith("skipped-"):
        state = await load_run(JobEnv.from_ctx(ctx).db, protocol_run_id)
        await reply_in_threads(ctx, protocol_run_id, step_index, state)
        if answers_review(state, step_index):  # it talked to the forge meanwhile: load anew
            state = None
    await after_execute(ctx, protocol_run_id, step_index, depth, outcome, state)
    return outcome


async def _execute(
    env: JobEnv, run_id: int, step_index: int, reply_to: dict[str, Any] | None
) -> str:
    state = await load_run(env.db, run_id)
    step = state.step(step_index)
    decision = may_start_step(state.run.status, state.run.approved, step.status)
    if decision.action == "skip":
        return f"skipped-{step.status}"
    if decision.action == "wait_approval":
        await emit(env.db, state, "step.refused", decision.reason, step)
        await publish_state(
            env.ctx, state, "Waiting for approval: comment `/approve` to let steps run."
        )
        return "not-approved"
    if decision.action == "stop":
        raise StepStopped(state.run.status)
    if decision.action == "refuse":
        await emit(env.db, state, "step.refused", decision.reason, step)
        return f"refused-{state.run.status}"
    if await _waits_for_dependencies(env, state, step):
        return "waiting-dependencies"
    spec = spec_of(state)
    if not await _budget_allows(env, state, step, spec, decision, reply_to):
        return "budget-blocked"
    workdir, head = await env.checkout(state, step_index)
    start = attempt_start(step)
    if start is None:  # a new attempt: remember where it starts, with the step's transition
        fresh = {**(step.runtime_state or {}), "attempt": step.retries, "attempt_head": head}
        await _begin(env, state, step, decision, fresh)
    else:
        await _begin(env, state, step, decision)
    work = StepWork(
        env,
        state,
        step,
        step_spec_of(spec, step_index),
        spec,
        workdir,
        reply_to,
        fresh=start is None,
    )
    if start is not None:
        work.sha = await _attempt_commit(
            env, state, workdir, start, step_marker(state.number, step_index)
        )
    if work.sha is None:
        if not await _run_and_commit(work):
            return "failed"
    return await _push_and_finish(work)


async def _waits_for_dependencies(env: JobEnv, state: RunState, step: StepRun) -> bool:
    """A step of a graph never starts before its dependencies are completed and merged, however
    its job came to be queued (a reclaim, a trigger, a stale command)."""

    missing = (
        missing_for(state, step.step_index)
        if step.status != StepStatus.RUNNING and parallel(state)
        else ()
    )
    if missing:
        waits = ", ".join(f"{i:02d}" for i in missing)
        await emit(
            env.db, state, "step.refused", f"step {step.step_index:02d} waits for {waits}", step
        )
    return bool(missing)


async def _budget_allows(
    env: JobEnv,
    state: RunState,
    step: StepRun,
    spec: ProtocolSpec,
    decision: StartDecision,
    reply_to: dict[str, Any] | None,
) -> bool:
    budget = budget_check_before_step(
        env.settings.token_budget_mode,
        state.run.tokens_used,
        spec.max_tokens or env.settings.max_tokens_per_protocol or None,
    )
    if budget.warn:
        await emit(env.db, state, "budget.warning", budget.reason, step)
    if budget.allow:
        return True
    # the protocol waits for a human: from planned/failed it goes through running to blocked
    if decision.protocol_to_running:
        await _begin(env, state, step, StartDecision("start", "", True), step_too=False)
    outcome = Outcome(
        message=budget.reason,
        protocol_to=ProtocolStatus.BLOCKED,
        run_state=dict(state.run.runtime_state or {}),
        ok=False,
    )
    await write_outcome(env, state, None, outcome, reply_to)
    return False


async def _begin(
    env: JobEnv,
    state: RunState,
    step: StepRun,
    decision: StartDecision,
    runtime_state: dict[str, Any] | None = None,
    step_too: bool = True,
) -> None:
    """Protocol to running, step (reset and) to running, the attempt's start: one transaction."""
    index = step.step_index
    starts = step_too and decision.action == "start"
    async with env.db.sessions.begin() as session:
        if runtime_state is not None and not starts:
            await session.execute(
                update(StepRun)
                .where(StepRun.id == step.id)
                .values(runtime_state=runtime_state, updated_at=utcnow())
            )
        if decision.protocol_to_running:
            await transition(
                session,
                ProtocolRun,
                state.run.id,
                ProtocolStatus.RUNNING,
                [state.run.status],
                event_message=f"running step {index:02d}",
                known=known(state, state.run.status),
            )
            state.run.status = ProtocolStatus.RUNNING
        if starts:
            if decision.reset_step:
                await transition(
                    session,
                    StepRun,
                    step.id,
                    StepStatus.PENDING,
                    [step.status],
                    event_message="reset for a new attempt",
                    known=known(state, step.status),
                )
            now = utcnow()
            # the attempt's start goes with the step's transition: one statement, not two
            fresh = {} if runtime_state is None else {"runtime_state": runtime_state}
            await transition(
                session,
                StepRun,
                step.id,
                StepStatus.RUNNING,
                [StepStatus.PENDING],
                values={"started_at": now, "finished_at": None, **fresh},
                event_message=f"step {index:02d} started",
                known=known(state, StepStatus.PENDING),
            )
            step.status, step.started_at, step.finished_at = StepStatus.RUNNING, now, None
    if runtime_state is not None:
        step.runtime_state = runtime_state


def attempt_start(step: StepRun) -> str | None:
    """The commit this attempt started from, when an earlier run of the same attempt recorded it.

    A loop or a retry runs the step again with the same `[protocol-NNNN/XX]` marker: commits of
    earlier attempts must not count, or the re-run would push the old commit and skip the
    engine. So the head an attempt starts from is kept on the step (in the database, so any
    worker finds it) and only commits after it are searched.
    """
    rs = step.runtime_state or {}
    start = rs.get("attempt_head") if rs.get("attempt") == step.retries else None
    return start if isinstance(start, str) else None


async def _attempt_commit(
    env: JobEnv, state: RunState, workdir: Path, start: str, marker: str
) -> str | None:
    """This attempt's step commit, made by a run of it that died before finishing."""
    found = await gitops.run_git(
        ["log", "--format=%H", "--fixed-strings", f"--grep={marker}", f"{start}..HEAD", "--"],
        cwd=workdir,
        timeout=env.settings.git_timeout_s,
        check=False,
    )
    if found.returncode != 0:  # the start is gone (rewritten branch): search the whole branch
        return await gitops.has_commit_with_trailer(workdir, marker, state.run.base_branch)
    shas = found.out.split()
    return shas[0] if shas else None


async def _run_and_commit(work: StepWork) -> bool:
    """The engine call and the step commit; False when the engine failed (already recorded)."""
    env, state, step, index = work.env, work.state, work.step, work.step.step_index
    await discard_changes(env, state, work.workdir, index)

    await prepare_attempt(env, state, work.step_spec, work.workdir)  # integration steps only
    # a fresh attempt starts where it was recorded to start; a taken-back one asks git
    start = (step.runtime_state or {}).get("attempt_head") if work.fresh else None
    head = start if isinstance(start, str) else await gitops.head_sha(work.workdir)
    await _send_in_progress(work, head)
    work.result = result = await run_engine(env, state, await _execute_call(work))
    if not result.ok:
        message = f"engine {result.outcome}: {result.error or 'no detail'}"
        await write_outcome(env, state, index, failure(state, index, message, head), work.reply_to)
        return False

    if left := leftover_markers(state, work.step_spec, work.workdir):  # integration steps only
        await write_outcome(env, state, index, failure(state, index, left, head), work.reply_to)
        return False
    with (work.workdir / ".protocols" / state.run.protocol_name / "log.md").open("a") as fh:
        fh.write(
            log_entry(
                when=utcnow(),
                event="executed",
                step_index=index,
                tokens=result.usage.total,
                message=_first_line(result.final_message),
            )
        )
    env.crash_point("before_commit", state.run.id, index)
    s = work.step_spec
    work.sha = await gitops.commit_all(
        work.workdir,
        commit_message(s.commit_type, _scope(s), s.title, state.number, index),
        env.settings.bot_name,
        env.settings.bot_email,
    )
    env.crash_point("after_commit", state.run.id, index)
    return True


async def _send_in_progress(work: StepWork, head: str) -> None:

    await report_state_check(
        work.env.ctx, work.state, work.step.step_index, "step", head, status="in_progress"
    )


async def _execute_call(work: StepWork) -> EngineCall:
    state, step, s = work.state, work.step, work.step_spec
    root = work.workdir / ".protocols" / state.run.protocol_name
    values = {
        **step_values(state, s, root),
        "branch": run_branch(state.run),
        "plan": read(root / "plan.md"),
        "context": read(root / "context.md"),
        "attempt": step.retries + 1,
        # typed items (QA report, CI evidence, human guidance) as one section
        # (bot/domain/fix_feedback.py)
        "feedback": render_feedback((step.runtime_state or {}).get("feedback")),
    }
    prompt = await step_prompt(work.env, state, s.prompt, "execute-step", values)
    return EngineCall(
        phase="execute",
        prompt=prompt,
        workdir=work.workdir,
        step_spec=s,
        spec=work.spec,
        step=step,
        context={
            "step_index": s.index,
            "slug": s.slug,
            "title": s.title,
            "attempt": step.retries + 1,
        },
    )


async def _push_and_finish(work: StepWork) -> str:
    env, state, step, s = work.env, work.state, work.step, work.step_spec
    await _stop_if_stopped_after_commit(work)
    pushed = await env.push_commits(state, work.workdir, step.step_index)
    head = pushed.sha
    changed = await _changed_files(work.workdir, work.sha, pushed.head_stat)
    step_state: dict[str, Any] = {"commit_sha": work.sha, "changed_files": list(changed)}
    if work.result is not None:
        step_state.update(
            last_message=work.result.final_message[-4000:],
            thread_id=work.result.thread_id,
            thread_usage=work.result.thread_usage.to_dict(),
        )
    after = budget_check_after_step(
        env.settings.token_budget_mode,
        step.tokens_used,
        s.max_tokens or env.settings.max_tokens_per_step or None,
    )
    if after.warn:
        await emit(env.db, state, "budget.warning", after.reason, step)
    if not after.allow:
        outcome = Outcome(
            message=after.reason,
            step_to=StepStatus.BLOCKED,
            protocol_to=ProtocolStatus.BLOCKED,
            step_state=step_state,
            step_values={"finished_at": utcnow()},
            run_state=dict(state.run.runtime_state or {}),
            run_values={"head_sha": head},
            check=Check("step", head, "failure", changed_files=changed),
            ok=False,
        )
        await write_outcome(env, state, step.step_index, outcome, work.reply_to)
        return "budget-blocked"
    # a step whose QA is skipped still waits for CI where the repository has CI
    # (bot/domain/ci_gate.py)
    decision = hold_for_ci(
        qa_decision(s, work.spec, env.settings.auto_qa_after_exec),
        gating(state.project, env.settings),
    )

    outcome = Outcome(
        message=decision.reason,
        step_to=decision.status,
        step_state=step_state,
        step_values={"finished_at": utcnow()},
        run_values={"head_sha": head},
        show_message=False,
        check=Check("step", head, "success", changed_files=changed),
        ok=True,
        publish=not (
            decision.status == StepStatus.COMPLETED and completion_follows(state, step.step_index)
        ),
    )
    await write_outcome(env, state, step.step_index, outcome, work.reply_to)
    if decision.status == StepStatus.NEEDS_QA:
        return "needs_qa-run" if decision.run_qa else "needs_qa"
    return "completed"


async def _stop_if_stopped_after_commit(work: StepWork) -> None:
    """Nothing of a cancelled or paused step is pushed: a stop that arrived after the engine
    finished takes this job's commit back (its edits go with the worktree reset)."""
    status = await protocol_status(work.env.db, work.state.run.id)
    if status not in STOPPING:
        return
    start = (work.step.runtime_state or {}).get("attempt_head")
    if isinstance(start, str):  # the attempt is dropped, also a dead worker's commit of it
        await gitops.run_git(
            ["reset", "--hard", "--quiet", start],
            cwd=work.workdir,
            timeout=work.env.settings.git_timeout_s,
        )
    raise StepStopped(status)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]


def _scope(step_spec: StepSpec) -> str:
    return step_spec.slug.split("-")[0][:20] or "step"


async def _changed_files(
    workdir: Path, sha: str | None, head_stat: str | None = None
) -> tuple[str, ...]:
    """The paths HEAD's commit changed: from the stat the push's scan read (HEAD was pushed
    now), else (it was on the remote already, or a merge with no stat there) from git."""
    if not sha:
        return ()
    stat = head_stat or (await gitops.last_commit(workdir)).stat
    return tuple(line.split("|", 1)[0].strip() for line in stat.splitlines() if "|" in line)
