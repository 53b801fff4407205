"""plan_protocol: one planning call, one decompose call per step, the files committed and pushed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot import git as gitops
from bot.core.errors import EngineError, SpecError
from bot.domain.engine_guard import decompose_schema, decomposed_content
from bot.domain.loop_policy import fix_attempt_bound, repo_policies
from bot.domain.planning import spec_from_planning
from bot.domain.prompts import render_prompt
from bot.domain.rendering import draft_pr_body, plan_commit_message, pr_title
from bot.domain.spec import (
    SETUP_FILE,
    PlanningOutput,
    ProtocolSpec,
    SpecDefaults,
    schemas_dir,
    spec_to_dict,
    validate_planning_output,
    validate_spec,
)
from bot.domain.states import ProtocolStatus
from bot.jobs.advance import enqueue_next_step
from bot.jobs.boundary import guarded
from bot.jobs.engine_run import EngineCall, prompt_override, run_engine
from bot.jobs.env import JobEnv
from bot.jobs.feedback import open_or_update_pr, publish_state
from bot.jobs.outcome import Outcome, write_outcome
from bot.jobs.shutdown import resume_chain
from bot.storage.repo_config import refresh_repo_config
from bot.storage.runs import RunState, emit, load_run, set_protocol_status, sync_steps, update_run
from engines.base import EngineResult

SPEC_FILE = "spec.json"


def step_marker(number: int, step_index: int) -> str:
    return f"[protocol-{number:04d}/{step_index:02d}]"


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


async def plan_protocol(
    ctx: dict[str, Any], *, protocol_run_id: int, reply_to: dict[str, Any] | None = None
) -> str:
    async def body(env: JobEnv) -> str:
        return await _plan(env, protocol_run_id, reply_to)

    return await guarded(ctx, "plan_protocol", protocol_run_id, None, body, reply_to)


async def _plan(env: JobEnv, run_id: int, reply_to: dict[str, Any] | None) -> str:
    state = await load_run(env.db, run_id)
    if state.run.status not in (ProtocolStatus.PENDING, ProtocolStatus.PLANNING):
        # a re-run after a hand-back (SIGTERM) may find the plan saved but its next step unqueued
        await resume_chain(env.ctx, run_id)
        return f"skipped-{state.run.status}"
    if state.run.status == ProtocolStatus.PENDING:
        await set_protocol_status(env.db, run_id, ProtocolStatus.PLANNING, "planning started")
        state.run.status = ProtocolStatus.PLANNING
    await publish_state(env.ctx, state)
    workdir = await env.worktree(state)
    try:
        await refresh_repo_config(env.db, state.project, env.git.mirror_path(state.project.git_url))
    except SpecError as exc:  # a broken config file must not stop the work: say so and go on
        await emit(env.db, state, "config.invalid", str(exc), errors=exc.errors)
    try:
        spec = await _planned_spec(env, state, workdir)
    except (SpecError, EngineError) as exc:
        await _planning_failed(env, state, exc, reply_to)
        return "failed"
    head = await env.push(state, workdir)
    await update_run(
        env.db,
        run_id,
        template_config=spec_to_dict(spec),
        head_sha=head,
        protocol_root=f".protocols/{state.run.protocol_name}",
    )
    await sync_steps(env.db, run_id, spec)
    await set_protocol_status(
        env.db, run_id, ProtocolStatus.PLANNED, f"planned {len(spec.steps)} steps"
    )
    await _announce(env, await load_run(env.db, run_id), spec, reply_to)
    return "planned"


async def _planned_spec(env: JobEnv, state: RunState, workdir: Path) -> ProtocolSpec:
    """The spec of a plan committed by an earlier attempt, else a new plan written and committed."""
    root = workdir / ".protocols" / state.run.protocol_name
    marker = step_marker(state.number, 0)
    existing = await gitops.has_commit_with_trailer(workdir, marker, state.run.base_branch)
    if existing is not None and (root / SPEC_FILE).exists():
        # a previous attempt committed the plan (and maybe pushed it) before crashing
        return validate_spec(json.loads((root / SPEC_FILE).read_text()))
    spec, planning, details = await _planning_calls(env, state, workdir)
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in protocol_files(spec, planning, details).items():
        (root / rel).write_text(content)
    await gitops.commit_all(
        workdir,
        plan_commit_message(state.run.description, state.number),
        env.settings.bot_name,
        env.settings.bot_email,
    )
    return spec


async def _planning_failed(
    env: JobEnv, state: RunState, exc: SpecError | EngineError, reply_to: dict[str, Any] | None
) -> None:
    errors = exc.errors if isinstance(exc, SpecError) else []
    if isinstance(exc, SpecError):
        await emit(env.db, state, "planning.invalid", str(exc), errors=errors)
    reason = "planning output invalid" if isinstance(exc, SpecError) else str(exc)
    outcome = Outcome(
        message=f"Planning failed: {exc}",
        protocol_to=ProtocolStatus.FAILED,
        run_state={**(state.run.runtime_state or {}), "errors": errors, "reason": reason},
        ok=False,
    )
    await write_outcome(env, state, None, outcome, reply_to)


def draft_pr_text(state: RunState, spec: ProtocolSpec) -> tuple[str, str]:
    """The draft PR/MR's title and body for a planned protocol: the task and its plan files."""
    name = state.run.protocol_name
    plan_files = [f".protocols/{name}/{f}" for f in ("plan.md", "context.md", "log.md", SETUP_FILE)]
    plan_files += [f".protocols/{name}/{s.file}" for s in spec.steps]
    body = draft_pr_body(
        protocol_name=name,
        task=state.run.description,
        issue_number=state.run.issue_number,
        plan_files=plan_files,
    )
    return pr_title(name, spec.task or state.run.description), body


async def _announce(
    env: JobEnv, state: RunState, spec: ProtocolSpec, reply_to: dict[str, Any] | None
) -> None:
    """The draft PR, the status comment, the reaction, and the first step of an auto protocol."""
    title, body = draft_pr_text(state, spec)
    pull = await open_or_update_pr(env.ctx, state, title, body)
    if pull is not None:
        await update_run(env.db, state.run.id, pr_number=pull.number, pr_url=pull.url)
        state.run.pr_number, state.run.pr_url = pull.number, pull.url
    await write_outcome(
        env, state, None, Outcome(message="", show_message=False, ok=True), reply_to
    )
    if state.run.auto_mode:
        await update_run(env.db, state.run.id, approved=True)
        await enqueue_next_step(env.ctx, state.run.id, state)


async def _planning_calls(
    env: JobEnv, state: RunState, workdir: Path
) -> tuple[ProtocolSpec, PlanningOutput, dict[int, str]]:
    values = _planning_values(state)
    prompt = render_prompt("planning", values, await prompt_override(env, state, "planning"))
    call = EngineCall(
        phase="planning",
        prompt=prompt,
        workdir=workdir,
        output_schema=planning_schema(),
        sandbox="read-only",
    )
    result = await run_engine(env, state, call)
    if not result.ok:
        raise EngineError(f"planning engine {result.outcome}: {result.error or 'no detail'}")
    planning = await _validated(env, state, call, result)
    spec = spec_from_planning(
        state.run.protocol_name, state.run.description, planning, _defaults(env, state)
    )
    details = await _decompose(env, state, workdir, spec, planning, values)
    return spec, planning, details


def _planning_values(state: RunState) -> dict[str, Any]:
    name = state.run.protocol_name
    return {
        "protocol": name,
        "protocol_dir": f".protocols/{name}",
        "task": state.run.description,
        "extra_instructions": "",
        "repo": state.project.name,
        "base_branch": state.run.base_branch,
        "issue_body": (state.run.runtime_state or {}).get("issue_body", ""),
    }


def _defaults(env: JobEnv, state: RunState) -> SpecDefaults:
    models = {k: v for k, v in (state.project.default_models or {}).items() if isinstance(v, str)}
    # `.deksdenflow.yml` policies (read from the base branch just now), else the environment
    repo = repo_policies(state.project.config)
    return SpecDefaults(
        engine=models.pop("engine", "") or env.settings.engine,
        models=models,
        max_tokens=repo.max_tokens or env.settings.max_tokens_per_protocol or None,
        step_max_tokens=repo.max_tokens_per_step or env.settings.max_tokens_per_step or None,
        fix_attempts=fix_attempt_bound(None, repo.max_fix_attempts, env.settings.max_fix_attempts),
        repo_qa_policy=repo.qa_policy,
    )


def _reply(result: EngineResult) -> Any:
    return result.structured if result.structured is not None else result.final_message


async def _validated(
    env: JobEnv, state: RunState, call: EngineCall, result: EngineResult
) -> PlanningOutput:
    """The planning reply validated, after one repair turn in the same thread if needed."""
    try:
        return validate_planning_output(_reply(result))
    except SpecError as first:
        repair = (
            "Your reply did not validate against the planning schema. Errors:\n"
            + "\n".join(f"- {e}" for e in (first.errors or [str(first)]))
            + "\nReply again with only the corrected JSON object."
        )
        await emit(
            env.db,
            state,
            "planning.repair",
            "planning output invalid; asking for a repair",
            errors=first.errors,
        )
    call.prompt, call.resume, call.previous_usage = repair, result.thread_id, result.thread_usage
    again = await run_engine(env, state, call)
    if not again.ok:
        raise EngineError(
            f"planning repair {again.outcome}: {again.error or 'no detail'}"
        ) from None
    return validate_planning_output(_reply(again))


async def _decompose(
    env: JobEnv,
    state: RunState,
    workdir: Path,
    spec: ProtocolSpec,
    planning: PlanningOutput,
    values: dict[str, Any],
) -> dict[int, str]:
    """One read-only call per step that details its file; a failed call keeps the plan's text."""
    details: dict[int, str] = {}
    override = await prompt_override(env, state, "decompose-step")
    shared = {k: values[k] for k in ("protocol", "protocol_dir", "task", "extra_instructions")}
    for step_spec, planned in zip(spec.steps, planning.steps, strict=False):
        dvalues = {
            **shared,
            "step_index": step_spec.index,
            "step_title": step_spec.title,
            "step_file": step_spec.file,
            "step_content": planned.content,
            "plan": planning.plan,
            "context": planning.context,
        }
        call = EngineCall(
            phase="decompose",
            prompt=render_prompt("decompose-step", dvalues, override),
            workdir=workdir,
            step_spec=step_spec,
            spec=spec,
            sandbox="read-only",
            output_schema=decompose_schema(),
            context={
                "step_index": step_spec.index,
                "slug": step_spec.slug,
                "title": step_spec.title,
            },
        )
        detail = await run_engine(env, state, call)
        # only the schema's JSON replaces the planned step; chat text never does
        content = decomposed_content(detail)
        if content is not None:
            details[step_spec.index] = content
    return details
