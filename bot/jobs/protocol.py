"""Protocol jobs: plan_protocol, execute_step, run_quality — idempotent, one lock per protocol."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arq import Retry

from bot import gitops
from bot.errors import EngineError, LockBusy, SpecError, TransitionConflict
from bot.feedback import open_or_update_pr, publish_status, react_done, report_check
from bot.jobs.common import count_job
from bot.jobs.locks import protocol_lock
from bot.jobs.shutdown import resume_chain
from bot.models import StepRun, utcnow
from bot.observability import log_context
from bot.policies import (
    budget_check_after_step,
    budget_check_before_step,
    loop_decision,
    parse_verdict,
    qa_decision,
    trigger_decisions,
)
from bot.prompts import PROMPT_PLACEHOLDERS, override_path, render_prompt
from bot.rendering import commit_message, draft_pr_body, log_entry, plan_commit_message, pr_title
from bot.repo_config import refresh_repo_config
from bot.runs import (
    RunState,
    add_tokens,
    emit,
    load_run,
    set_protocol_status,
    set_step_status,
    sync_steps,
    update_run,
    update_step,
)
from bot.settings import Settings
from bot.spec import (
    SETUP_FILE,
    PlanningOutput,
    ProtocolSpec,
    SpecDefaults,
    StepSpec,
    resolve_engine,
    resolve_model,
    schemas_dir,
    spec_from_planning,
    spec_to_dict,
    validate_planning_output,
    validate_spec,
)
from engines.base import EngineRequest, EngineResult, TokenUsage

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
QA_REPORT = "quality-report.md"


# -- small helpers ------------------------------------------------------------------------


def step_marker(number: int, step_index: int) -> str:
    return f"[protocol-{number:04d}/{step_index:02d}]"


def qa_marker(number: int, step_index: int) -> str:
    return f"[protocol-{number:04d}/{step_index:02d}-qa]"


def planning_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((schemas_dir() / "protocol-planning.schema.json").read_text())
    return data


def protocol_files(
    spec: ProtocolSpec, planning: PlanningOutput, details: dict[int, str]
) -> dict[str, str]:
    """The files planning writes under `.protocols/<name>/` (pure)."""
    files = {
        "plan.md": planning.plan,
        "context.md": planning.context,
        "log.md": planning.log if planning.log.endswith("\n") else planning.log + "\n",
        SETUP_FILE: planning.setup,
        SPEC_FILE: json.dumps(spec_to_dict(spec), indent=2) + "\n",
    }
    for step, planned in zip(spec.steps, planning.steps, strict=False):
        files[step.file] = details.get(step.index) or planned.content
    return files


@dataclass
class JobEnv:
    """What every protocol job needs, pulled out of arq's ctx once."""

    ctx: dict[str, Any]

    @property
    def settings(self) -> Settings:
        settings: Settings = self.ctx["settings"]
        return settings

    @property
    def db(self) -> Any:
        return self.ctx["db"]


def spec_of(state: RunState) -> ProtocolSpec:
    return validate_spec(state.run.template_config)


async def auth_for(ctx: dict[str, Any], state: RunState) -> str | None:
    forge = ctx["forges"].forge_for(state.project)
    header: str | None = await forge.git_auth_header(ctx["forges"].repo_ref(state.project))
    return header


async def ensure_worktree(ctx: dict[str, Any], state: RunState, auth: str | None) -> Path:
    wt = await ctx["git"].ensure_worktree(
        state.project.git_url, state.run.protocol_name, state.run.base_branch, auth
    )
    path: Path = wt.path
    if state.run.worktree_path != str(path):
        await update_run(ctx["db"], state.run.id, worktree_path=str(path))
    return path


async def prompt_override(ctx: dict[str, Any], state: RunState, name: str) -> str | None:
    """A repository's prompt override, read from its base branch only (never the protocol branch)."""
    mirror = ctx["git"].mirror_path(state.project.git_url)
    text: str | None = await gitops.read_file_at(mirror, state.run.base_branch, override_path(name))
    return text


async def run_engine(
    ctx: dict[str, Any],
    state: RunState,
    *,
    phase: str,
    prompt: str,
    workdir: Path,
    step_spec: StepSpec | None,
    spec: ProtocolSpec | None,
    step: StepRun | None = None,
    output_schema: dict[str, Any] | None = None,
    resume: str | None = None,
    previous_usage: TokenUsage | None = None,
    sandbox: str = "workspace-write",
    context: dict[str, Any] | None = None,
) -> EngineResult:
    settings: Settings = ctx["settings"]
    project_models = state.project.default_models or {}
    engine_id = resolve_engine(
        phase,  # type: ignore[arg-type]
        step_spec,
        spec,
        project_models.get("engine") if isinstance(project_models.get("engine"), str) else None,
        settings.engine,
    )
    model = resolve_model(phase, step_spec, spec, project_models, settings.phase_models())  # type: ignore[arg-type]
    engine = ctx["engines"].get(engine_id)
    request = EngineRequest(
        prompt=prompt,
        workdir=workdir,
        phase=phase,  # type: ignore[arg-type]
        model=model,
        sandbox=sandbox,  # type: ignore[arg-type]
        output_schema=output_schema,
        timeout_s=settings.engine_timeout_s,
        resume_thread_id=resume,
        previous_usage=previous_usage,
        context={
            "task": state.run.description,
            "protocol": state.run.protocol_name,
            **(context or {}),
        },
    )
    with log_context(protocol_run_id=state.run.id, step_run_id=step.id if step else None):
        log.info("engine %s (%s, model %s) starting", engine_id, phase, model)
        result: EngineResult = await engine.run(request)
    await add_tokens(ctx["db"], state.run.id, step.id if step else None, result.usage.total)
    await emit(
        ctx["db"],
        state,
        f"engine.{result.outcome}",
        f"{engine_id} {phase}: {result.outcome} in {result.duration_s:.1f}s, {result.usage.total} tokens",
        step,
        engine=engine_id,
        model=model,
        phase=phase,
        exit_code=result.exit_code,
        usage=result.usage.to_dict(),
        thread_usage=result.thread_usage.to_dict(),
        thread_id=result.thread_id,
        error=result.error,
        # the engine's own event log, trimmed: enough to see what it did
        engine_events=[_trim_event(e) for e in result.events[-200:]],
    )
    return result


def _trim_event(event: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(event, default=str)
    if len(text) <= 2000:
        return event
    return {"type": event.get("type"), "truncated": text[:2000]}


async def enqueue(ctx: dict[str, Any], function: str, job_id: str, **kwargs: Any) -> None:
    await ctx["redis"].enqueue_job(function, _job_id=job_id, **kwargs)


def _lock_retry(exc: LockBusy) -> Retry:
    # another worker has this protocol: come back shortly instead of racing it
    return Retry(defer=2)


# -- plan ---------------------------------------------------------------------------------


async def plan_protocol(
    ctx: dict[str, Any], *, protocol_run_id: int, reply_to: dict[str, Any] | None = None
) -> str:
    try:
        async with protocol_lock(ctx["redis"], protocol_run_id):
            outcome = await _plan(ctx, protocol_run_id)
    except LockBusy as exc:
        raise _lock_retry(exc) from exc
    await count_job(ctx, "plan_protocol", outcome)
    await react_done(ctx, protocol_run_id, reply_to, outcome == "planned")
    return outcome


async def _plan(ctx: dict[str, Any], run_id: int) -> str:
    db = ctx["db"]
    settings: Settings = ctx["settings"]
    state = await load_run(db, run_id)
    if state.run.status not in ("pending", "planning"):
        # a re-run after a hand-back (SIGTERM) may find the plan saved but its next step unqueued
        await resume_chain(ctx, run_id)
        return f"skipped-{state.run.status}"
    if state.run.status == "pending":
        await set_protocol_status(db, run_id, "planning", "planning started")
    await publish_status(ctx, run_id)
    auth = await auth_for(ctx, state)
    workdir = await ensure_worktree(ctx, state, auth)
    try:
        await refresh_repo_config(db, state.project, ctx["git"].mirror_path(state.project.git_url))
    except SpecError as exc:  # a broken config file must not stop the work: say so and go on
        await emit(db, state, "config.invalid", str(exc), errors=exc.errors)
    name = state.run.protocol_name
    root = workdir / ".protocols" / name
    marker = step_marker(state.number, 0)

    existing = await gitops.has_commit_with_trailer(workdir, marker, state.run.base_branch)
    if existing is not None and (root / SPEC_FILE).exists():
        # a previous attempt committed the plan (and maybe pushed it) before crashing
        spec = validate_spec(json.loads((root / SPEC_FILE).read_text()))
    else:
        try:
            spec, planning, details = await _planning_calls(ctx, state, workdir)
        except SpecError as exc:
            await emit(db, state, "planning.invalid", str(exc), errors=exc.errors)
            await set_protocol_status(
                db,
                run_id,
                "failed",
                "planning output invalid",
                runtime_state={"message": str(exc), "errors": exc.errors},
            )
            await publish_status(ctx, run_id, f"Planning failed: {exc}")
            return "failed"
        except EngineError as exc:
            await set_protocol_status(
                db, run_id, "failed", str(exc), runtime_state={"message": str(exc)}
            )
            await publish_status(ctx, run_id, f"Planning failed: {exc}")
            return "failed"
        root.mkdir(parents=True, exist_ok=True)
        for rel, content in protocol_files(spec, planning, details).items():
            (root / rel).write_text(content)
        await gitops.commit_all(
            workdir,
            plan_commit_message(state.run.description, state.number),
            settings.bot_name,
            settings.bot_email,
        )
    head = await gitops.push(workdir, name, state.project.git_url, auth)
    await update_run(
        db,
        run_id,
        template_config=spec_to_dict(spec),
        head_sha=head,
        protocol_root=f".protocols/{name}",
    )
    await sync_steps(db, run_id, spec)
    await set_protocol_status(db, run_id, "planned", f"planned {len(spec.steps)} steps")
    state = await load_run(db, run_id)
    plan_files = [
        f".protocols/{name}/{f}" for f in ("plan.md", "context.md", "log.md", SETUP_FILE)
    ] + [f".protocols/{name}/{s.file}" for s in spec.steps]
    body = draft_pr_body(
        protocol_name=name,
        task=state.run.description,
        issue_number=state.run.issue_number,
        plan_files=plan_files,
    )
    pull = await open_or_update_pr(
        ctx, run_id, pr_title(name, spec.task or state.run.description), body
    )
    if pull is not None:
        await update_run(db, run_id, pr_number=pull.number, pr_url=pull.url)
    await publish_status(ctx, run_id)
    if state.run.auto_mode:
        await update_run(db, run_id, approved=True)
        await enqueue_next_step(ctx, run_id)
    return "planned"


async def _planning_calls(
    ctx: dict[str, Any], state: RunState, workdir: Path
) -> tuple[ProtocolSpec, PlanningOutput, dict[int, str]]:
    settings: Settings = ctx["settings"]
    name = state.run.protocol_name
    values = {
        "protocol": name,
        "protocol_dir": f".protocols/{name}",
        "task": state.run.description,
        "extra_instructions": "",
        "repo": state.project.name,
        "base_branch": state.run.base_branch,
        "issue_body": (state.run.runtime_state or {}).get("issue_body", ""),
    }
    prompt = render_prompt("planning", values, await prompt_override(ctx, state, "planning"))
    schema = planning_schema()
    result = await run_engine(
        ctx,
        state,
        phase="planning",
        prompt=prompt,
        workdir=workdir,
        step_spec=None,
        spec=None,
        output_schema=schema,
        sandbox="read-only",
    )
    if not result.ok:
        raise EngineError(f"planning engine {result.outcome}: {result.error or 'no detail'}")
    try:
        planning = validate_planning_output(
            result.structured if result.structured is not None else result.final_message
        )
    except SpecError as first:
        # one repair turn: show the model its own errors in the same thread
        repair = (
            "Your reply did not validate against the planning schema. Errors:\n"
            + "\n".join(f"- {e}" for e in (first.errors or [str(first)]))
            + "\nReply again with only the corrected JSON object."
        )
        await emit(
            ctx["db"],
            state,
            "planning.repair",
            "planning output invalid; asking for a repair",
            errors=first.errors,
        )
        again = await run_engine(
            ctx,
            state,
            phase="planning",
            prompt=repair,
            workdir=workdir,
            step_spec=None,
            spec=None,
            output_schema=schema,
            resume=result.thread_id,
            previous_usage=result.thread_usage,
            sandbox="read-only",
        )
        if not again.ok:
            raise EngineError(
                f"planning repair {again.outcome}: {again.error or 'no detail'}"
            ) from None
        planning = validate_planning_output(
            again.structured if again.structured is not None else again.final_message
        )
    project_models = {k: v for k, v in (state.project.default_models or {}).items() if isinstance(v, str)}
    defaults = SpecDefaults(
        engine=project_models.pop("engine", "") or settings.engine,
        models=project_models,
        max_tokens=settings.max_tokens_per_protocol or None,
        step_max_tokens=settings.max_tokens_per_step or None,
    )
    spec = spec_from_planning(name, state.run.description, planning, defaults)
    details: dict[int, str] = {}
    for step_spec, planned in zip(spec.steps, planning.steps, strict=False):
        dvalues = {
            **{k: values[k] for k in ("protocol", "protocol_dir", "task", "extra_instructions")},
            "step_index": step_spec.index,
            "step_title": step_spec.title,
            "step_file": step_spec.file,
            "step_content": planned.content,
            "plan": planning.plan,
            "context": planning.context,
        }
        dprompt = render_prompt(
            "decompose-step", dvalues, await prompt_override(ctx, state, "decompose-step")
        )
        detail = await run_engine(
            ctx,
            state,
            phase="decompose",
            prompt=dprompt,
            workdir=workdir,
            step_spec=step_spec,
            spec=spec,
            sandbox="read-only",
            context={
                "step_index": step_spec.index,
                "slug": step_spec.slug,
                "title": step_spec.title,
            },
        )
        if detail.ok and detail.final_message.strip():
            details[step_spec.index] = detail.final_message.strip() + "\n"
    return spec, planning, details


# -- execute ------------------------------------------------------------------------------


async def enqueue_next_step(ctx: dict[str, Any], run_id: int) -> bool:
    state = await load_run(ctx["db"], run_id)
    for step in state.steps:
        if step.status == "pending":
            await enqueue(
                ctx,
                "execute_step",
                f"exec:{run_id}:{step.step_index}:{step.retries}",
                protocol_run_id=run_id,
                step_index=step.step_index,
            )
            return True
    return False


async def execute_step(
    ctx: dict[str, Any],
    *,
    protocol_run_id: int,
    step_index: int,
    depth: int = 0,
    reply_to: dict[str, Any] | None = None,
) -> str:
    try:
        async with protocol_lock(ctx["redis"], protocol_run_id):
            try:
                outcome = await _execute(ctx, protocol_run_id, step_index)
            except SpecError as exc:  # a repository prompt override that does not render
                outcome = await _fail_step(ctx, protocol_run_id, step_index, str(exc))
            if outcome == "skipped-completed":  # handed back after it was done: see resume_chain
                await resume_chain(ctx, protocol_run_id)
    except LockBusy as exc:
        raise _lock_retry(exc) from exc
    await count_job(ctx, "execute_step", outcome)
    await react_done(ctx, protocol_run_id, reply_to, outcome in ("completed", "needs_qa", "needs_qa-run"))
    if outcome == "needs_qa-run":
        await _run_qa_after(ctx, protocol_run_id, step_index, depth)
    elif outcome == "completed":
        await after_step_completed(ctx, protocol_run_id, step_index, depth)
    return outcome


async def _run_qa_after(ctx: dict[str, Any], run_id: int, step_index: int, depth: int) -> None:
    # One automatic QA per attempt: a job id made of the wall-clock second deduplicated the
    # QA of a loop's next attempt away when both fell in the same second (arq keeps results).
    attempt = (await load_run(ctx["db"], run_id)).step(step_index).retries
    await enqueue(
        ctx,
        "run_quality",
        f"qa:{run_id}:{step_index}:attempt-{attempt}",
        protocol_run_id=run_id,
        step_index=step_index,
    )


async def _execute(ctx: dict[str, Any], run_id: int, step_index: int) -> str:
    db = ctx["db"]
    settings: Settings = ctx["settings"]
    state = await load_run(db, run_id)
    step = state.step(step_index)
    if step.status in ("needs_qa", "completed", "cancelled"):
        return f"skipped-{step.status}"
    if not state.run.approved:
        await emit(db, state, "step.refused", "the plan is not approved yet", step)
        await publish_status(
            ctx, run_id, "Waiting for approval: comment `/approve` to let steps run."
        )
        return "not-approved"
    if state.run.status in ("planned", "blocked", "failed"):
        await set_protocol_status(db, run_id, "running", f"running step {step_index:02d}")
    elif state.run.status != "running":
        await emit(db, state, "step.refused", f"protocol is {state.run.status}", step)
        return f"refused-{state.run.status}"
    spec = spec_of(state)
    step_spec = next(s for s in spec.steps if s.index == step_index)
    budget = budget_check_before_step(
        settings.token_budget_mode,
        state.run.tokens_used,
        spec.max_tokens or settings.max_tokens_per_protocol or None,
    )
    if budget.warn:
        await emit(db, state, "budget.warning", budget.reason, step)
    if not budget.allow:
        await set_protocol_status(
            db,
            run_id,
            "blocked",
            budget.reason,
            runtime_state={**(state.run.runtime_state or {}), "message": budget.reason},
        )
        await publish_status(ctx, run_id, budget.reason)
        return "budget-blocked"
    if step.status in ("pending", "failed", "blocked"):
        if step.status != "pending":
            await set_step_status(db, step.id, "pending", "reset for a new attempt")
        await set_step_status(
            db,
            step.id,
            "running",
            f"step {step_index:02d} started",
            started_at=utcnow(),
            finished_at=None,
        )
    state = await load_run(db, run_id)
    step = state.step(step_index)
    auth = await auth_for(ctx, state)
    workdir = await ensure_worktree(ctx, state, auth)
    marker = step_marker(state.number, step_index)
    name = state.run.protocol_name
    root = workdir / ".protocols" / name
    sha = await _attempt_commit(ctx, state, step, workdir, marker)
    result: EngineResult | None = None
    if sha is None:
        await _clean_leftovers(ctx, state, step, workdir)
        await report_check(
            ctx, run_id, step_index, "step", await gitops.head_sha(workdir), status="in_progress"
        )
        rs = step.runtime_state or {}
        values = {
            **_step_values(state, step_spec, root),
            "branch": name,
            "plan": _read(root / "plan.md"),
            "context": _read(root / "context.md"),
            "attempt": step.retries + 1,
            "feedback": rs.get("feedback", ""),
        }
        prompt = await _step_prompt(ctx, state, step_spec.prompt, "execute-step", values)
        result = await run_engine(
            ctx,
            state,
            phase="execute",
            prompt=prompt,
            workdir=workdir,
            step_spec=step_spec,
            spec=spec,
            step=step,
            context={
                "step_index": step_index,
                "slug": step_spec.slug,
                "title": step_spec.title,
                "attempt": step.retries + 1,
            },
        )
        if not result.ok:
            message = f"engine {result.outcome}: {result.error or 'no detail'}"
            await set_step_status(
                db,
                step.id,
                "failed",
                message,
                finished_at=utcnow(),
                runtime_state={**rs, "error": message},
            )
            await set_protocol_status(
                db,
                run_id,
                "blocked",
                f"step {step_index:02d} failed",
                runtime_state={**(state.run.runtime_state or {}), "message": message},
            )
            await report_check(
                ctx,
                run_id,
                step_index,
                "step",
                await gitops.head_sha(workdir),
                conclusion="failure",
                message=message,
            )
            await publish_status(ctx, run_id, message)
            return "failed"
        with (root / "log.md").open("a") as fh:
            fh.write(
                log_entry(
                    when=utcnow(),
                    event="executed",
                    step_index=step_index,
                    tokens=result.usage.total,
                    message=_first_line(result.final_message),
                )
            )
        crash = ctx.get("crash_hook")
        if crash is not None:
            crash("before_commit", run_id, step_index)
        sha = await gitops.commit_all(
            workdir,
            commit_message(
                step_spec.commit_type, _scope(step_spec), step_spec.title, state.number, step_index
            ),
            settings.bot_name,
            settings.bot_email,
        )
        crash = ctx.get("crash_hook")
        if crash is not None:
            crash("after_commit", run_id, step_index)
    head = await gitops.push(workdir, name, state.project.git_url, auth)
    changed = await _changed_files(workdir, sha)
    state = await load_run(db, run_id)
    step = state.step(step_index)
    rs = dict(step.runtime_state or {})
    rs.update(commit_sha=sha, changed_files=list(changed))
    if result is not None:
        rs.update(
            last_message=result.final_message[-4000:],
            thread_id=result.thread_id,
            thread_usage=result.thread_usage.to_dict(),
        )
    await update_step(db, step.id, runtime_state=rs)
    await update_run(db, run_id, head_sha=head)
    after = budget_check_after_step(
        settings.token_budget_mode,
        step.tokens_used,
        step_spec.max_tokens or settings.max_tokens_per_step or None,
    )
    if after.warn:
        await emit(db, state, "budget.warning", after.reason, step)
    if not after.allow:
        await set_step_status(db, step.id, "blocked", after.reason, finished_at=utcnow())
        await set_protocol_status(
            db,
            run_id,
            "blocked",
            after.reason,
            runtime_state={**(state.run.runtime_state or {}), "message": after.reason},
        )
        await report_check(
            ctx,
            run_id,
            step_index,
            "step",
            head,
            conclusion="failure",
            changed_files=tuple(changed),
            tokens=step.tokens_used,
            message=after.reason,
        )
        await publish_status(ctx, run_id, after.reason)
        return "budget-blocked"
    decision = qa_decision(step_spec, spec, settings.auto_qa_after_exec)
    await set_step_status(db, step.id, decision.status, decision.reason, finished_at=utcnow())
    await report_check(
        ctx,
        run_id,
        step_index,
        "step",
        head,
        conclusion="success",
        changed_files=tuple(changed),
        tokens=step.tokens_used,
    )
    await publish_status(ctx, run_id)
    if decision.status == "needs_qa":
        return "needs_qa-run" if decision.run_qa else "needs_qa"
    return "completed"


async def _attempt_commit(
    ctx: dict[str, Any], state: RunState, step: StepRun, workdir: Path, marker: str
) -> str | None:
    """This attempt's step commit, when a crashed run of the same attempt already made one.

    A loop or a retry runs the step again with the same `[protocol-NNNN/XX]` marker: commits of
    earlier attempts must not count, or the re-run would push the old commit and skip the
    engine. So the head an attempt starts from is kept on the step (in the database, so any
    worker finds it) and only commits after it are searched.
    """
    rs = dict(step.runtime_state or {})
    start = rs.get("attempt_head") if rs.get("attempt") == step.retries else None
    if not isinstance(start, str):
        rs.update(attempt=step.retries, attempt_head=await gitops.head_sha(workdir))
        await update_step(ctx["db"], step.id, runtime_state=rs)
        step.runtime_state = rs
        return None
    found = await gitops.run_git(
        ["log", "--format=%H", "--fixed-strings", f"--grep={marker}", f"{start}..HEAD", "--"],
        cwd=workdir,
        timeout=ctx["settings"].git_timeout_s,
        check=False,
    )
    if found.returncode != 0:  # the start is gone (rewritten branch): search the whole branch
        return await gitops.has_commit_with_trailer(workdir, marker, state.run.base_branch)
    shas = found.out.split()
    return shas[0] if shas else None


async def _clean_leftovers(
    ctx: dict[str, Any], state: RunState, step: StepRun, workdir: Path
) -> None:
    """Drop uncommitted edits a crashed attempt left behind, so the engine starts clean."""
    dirty = await gitops.status_porcelain(workdir)
    if not dirty:
        return
    timeout = ctx["settings"].git_timeout_s
    await gitops.run_git(["reset", "--hard", "--quiet", "HEAD"], cwd=workdir, timeout=timeout)
    await gitops.run_git(["clean", "-fd", "--quiet"], cwd=workdir, timeout=timeout)
    await emit(
        ctx["db"],
        state,
        "worktree.cleaned",
        f"discarded {len(dirty)} uncommitted change(s) left by an interrupted attempt",
        step,
        paths=[e.path for e in dirty][:50],
    )


async def _fail_step(ctx: dict[str, Any], run_id: int, step_index: int, message: str) -> str:
    """Fail the step and block the protocol with a reason a human can act on."""
    db = ctx["db"]
    state = await load_run(db, run_id)
    step = state.step(step_index)
    await emit(db, state, "step.error", message, step)
    if step.status in ("running", "needs_qa"):
        await set_step_status(db, step.id, "failed", message, finished_at=utcnow())
    if state.run.status == "running":
        await set_protocol_status(
            db, run_id, "blocked", message, runtime_state={**(state.run.runtime_state or {}), "message": message}
        )
    await publish_status(ctx, run_id, message)
    return "failed"


def _step_values(state: RunState, step_spec: StepSpec, root: Path) -> dict[str, Any]:
    """The placeholders every step prompt (execute, QA) shares."""
    name = state.run.protocol_name
    return {
        "protocol": name,
        "protocol_dir": f".protocols/{name}",
        "task": state.run.description,
        "extra_instructions": "",
        "step_index": step_spec.index,
        "step_title": step_spec.title,
        "step_file": step_spec.file,
        "step_content": _read(root / step_spec.file),
    }


async def _step_prompt(
    ctx: dict[str, Any], state: RunState, name: str | None, fallback: str, values: dict[str, Any]
) -> str:
    """A step's named prompt: the repository's override, else ours, else the phase default."""
    name = name or fallback
    override = await prompt_override(ctx, state, name)
    if override is None and name not in PROMPT_PLACEHOLDERS:
        name = fallback
    return render_prompt(name, values, override)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]


def _scope(step_spec: StepSpec) -> str:
    return step_spec.slug.split("-")[0][:20] or "step"


async def _changed_files(workdir: Path, sha: str | None) -> tuple[str, ...]:
    if not sha:
        return ()
    info = await gitops.last_commit(workdir)
    names = []
    for line in info.stat.splitlines():
        if "|" in line:
            names.append(line.split("|", 1)[0].strip())
    return tuple(names)


async def after_step_completed(
    ctx: dict[str, Any], run_id: int, step_index: int, depth: int
) -> None:
    """Triggers, then the next step in auto mode, or protocol completion when none is left."""
    db = ctx["db"]
    state = await load_run(db, run_id)
    spec = spec_of(state)
    step_spec = next(s for s in spec.steps if s.index == step_index)
    settings: Settings = ctx["settings"]
    for action in trigger_decisions(
        step_spec, "pass", depth, min(spec.max_inline_depth, settings.max_inline_trigger_depth)
    ):
        await emit(
            db,
            state,
            "trigger",
            action.reason,
            state.step(step_index),
            target=action.step_index,
            mode=action.mode,
        )
        target = state.step(action.step_index)
        if target.status in ("completed", "needs_qa"):
            await set_step_status(db, target.id, "pending", f"triggered by step {step_index:02d}")
        if action.mode == "inline":
            await execute_step(
                ctx, protocol_run_id=run_id, step_index=action.step_index, depth=action.depth
            )
        else:
            await enqueue(
                ctx,
                "execute_step",
                f"exec:{run_id}:{action.step_index}:trig:{time.time_ns()}",
                protocol_run_id=run_id,
                step_index=action.step_index,
            )
    state = await load_run(db, run_id)
    if all(s.status == "completed" for s in state.steps):
        if state.run.status == "running":
            await set_protocol_status(db, run_id, "completed", "every step completed")
            await publish_status(ctx, run_id)
        return
    if state.run.auto_mode and state.run.status == "running":
        await enqueue_next_step(ctx, run_id)


# -- QA -----------------------------------------------------------------------------------


async def run_quality(
    ctx: dict[str, Any], *, protocol_run_id: int, step_index: int, reply_to: dict[str, Any] | None = None
) -> str:
    try:
        async with protocol_lock(ctx["redis"], protocol_run_id):
            try:
                outcome = await _quality(ctx, protocol_run_id, step_index)
            except SpecError as exc:
                outcome = await _fail_step(ctx, protocol_run_id, step_index, str(exc))
    except LockBusy as exc:
        raise _lock_retry(exc) from exc
    await count_job(ctx, "run_quality", outcome)
    await react_done(ctx, protocol_run_id, reply_to, outcome == "PASS")
    if outcome == "PASS":
        await after_step_completed(ctx, protocol_run_id, step_index, 0)
    elif outcome == "retry":
        await enqueue_next_step(ctx, protocol_run_id)
    return outcome


async def _quality(ctx: dict[str, Any], run_id: int, step_index: int) -> str:
    db = ctx["db"]
    settings: Settings = ctx["settings"]
    state = await load_run(db, run_id)
    step = state.step(step_index)
    if step.status == "completed":
        await set_step_status(db, step.id, "needs_qa", "QA requested again")
    elif step.status != "needs_qa":
        await emit(db, state, "qa.refused", f"step {step_index:02d} is {step.status}", step)
        return f"skipped-{step.status}"
    if state.run.status in ("blocked", "planned"):
        await set_protocol_status(db, run_id, "running", f"QA of step {step_index:02d}")
    spec = spec_of(state)
    step_spec = next(s for s in spec.steps if s.index == step_index)
    auth = await auth_for(ctx, state)
    workdir = await ensure_worktree(ctx, state, auth)
    name = state.run.protocol_name
    root = workdir / ".protocols" / name
    head = await gitops.head_sha(workdir)
    await report_check(ctx, run_id, step_index, "qa", head, status="in_progress")
    status_lines = (
        "\n".join(f"{e.code} {e.path}" for e in await gitops.status_porcelain(workdir)) or "(clean)"
    )
    last = await gitops.last_commit(workdir)
    values = {
        **_step_values(state, step_spec, root),
        "changes": f"git status:\n{status_lines}\n\nlast commit {last.sha[:12]}: {last.message}\n{last.stat}\n\nplan.md:\n{_read(root / 'plan.md')}\n\ncontext.md:\n{_read(root / 'context.md')}\n\nlog.md:\n{_read(root / 'log.md')}",
        "report_file": f".protocols/{name}/{QA_REPORT}",
        "qa_policy": step_spec.qa.policy,
    }
    prompt = await _step_prompt(ctx, state, step_spec.qa.prompt, "quality-validator", values)
    attempts = int((step.runtime_state or {}).get("qa_attempts", 0)) + 1
    result = await run_engine(
        ctx,
        state,
        phase="qa",
        prompt=prompt,
        workdir=workdir,
        step_spec=step_spec,
        spec=spec,
        step=step,
        sandbox="read-only",
        context={
            "step_index": step_index,
            "slug": step_spec.slug,
            "title": step_spec.title,
            "qa_attempt": attempts,
        },
    )
    verdict = parse_verdict(result.final_message) if result.ok else "FAIL"
    report = f"# Quality report — step {step_index:02d}: {step_spec.title}\n\n{result.final_message.strip() or result.error or ''}\n"
    (root / QA_REPORT).write_text(report)
    sha = await gitops.commit_all(
        workdir,
        commit_message(
            "test",
            "qa",
            f"quality report for step {step_index:02d}: {verdict}",
            state.number,
            step_index,
        ).replace(step_marker(state.number, step_index), qa_marker(state.number, step_index)),
        settings.bot_name,
        settings.bot_email,
    )
    head = await gitops.push(workdir, name, state.project.git_url, auth)
    await update_run(db, run_id, head_sha=head)
    state = await load_run(db, run_id)
    step = state.step(step_index)
    rs = {
        **(step.runtime_state or {}),
        "qa_verdict": verdict,
        "qa_attempts": attempts,
        "qa_report": report[-4000:],
        "qa_commit": sha,
    }
    await update_step(db, step.id, runtime_state=rs)
    await emit(db, state, "qa.verdict", f"step {step_index:02d}: {verdict}", step, verdict=verdict)
    if verdict == "PASS":
        await set_step_status(db, step.id, "completed", "QA passed")
        await report_check(
            ctx,
            run_id,
            step_index,
            "qa",
            head,
            conclusion="success",
            verdict=verdict,
            quality_report=report,
        )
        await publish_status(ctx, run_id)
        return "PASS"
    decision = loop_decision(step_spec, state.run.runtime_state or {}, "qa_fail")
    await update_run(
        db, run_id, runtime_state={**decision.new_runtime_state, "message": decision.reason}
    )
    await report_check(
        ctx,
        run_id,
        step_index,
        "qa",
        head,
        conclusion="failure",
        verdict=verdict,
        quality_report=report,
        message=decision.reason,
    )
    if decision.action == "retry":
        # re-read: `state` predates the qa_* fields just stored, which the merge below would drop
        state = await load_run(db, run_id)
        for index in decision.reset_steps:
            target = state.step(index)
            await update_step(
                db,
                target.id,
                retries=target.retries + 1,
                runtime_state={**(target.runtime_state or {}), "feedback": report[-4000:]},
            )
            try:
                await set_step_status(db, target.id, "pending", f"loop: {decision.reason}")
            except TransitionConflict:
                pass
        await publish_status(ctx, run_id, decision.reason)
        return "retry"
    await set_step_status(db, step.id, "failed", "QA failed")
    await set_protocol_status(
        db,
        run_id,
        "blocked",
        decision.reason,
        runtime_state={**decision.new_runtime_state, "message": decision.reason},
    )
    await publish_status(ctx, run_id, decision.reason)
    return "FAIL"
