"""project_onboard: add the starter files (and optionally CI discovery) to a repository as a draft
PR/MR."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bot import git as gitops
from bot.core.errors import DeksdenFlowError, EngineError
from bot.core.settings import Settings
from bot.domain.engine_guard import sanitize_result
from bot.domain.prompts import render_prompt
from bot.domain.rendering import draft_pr_body, plan_commit_message, pr_title
from bot.domain.spec import resolve_engine, resolve_model
from bot.domain.states import ProtocolStatus
from bot.forge.base import Forge, IssueRef, PullRef
from bot.git.cache import remote_ref
from bot.git.onboarding import (
    HOOKS,
    SETUP_BRANCH,
    StarterFile,
    git,
    hook_path,
    missing_starter_files,
    pr_body,
    starter_paths,
    write_file,
)
from bot.jobs.advance import enqueue_next_step
from bot.jobs.boundary import guarded
from bot.jobs.common import count_job
from bot.jobs.env import JobEnv
from bot.jobs.feedback import open_or_update_pr, publish_status
from bot.jobs.plan import step_marker
from bot.storage.models import Project
from bot.storage.runs import load_run, record_event, set_protocol_status, update_run
from engines.base import EngineRequest, EngineResult

log = logging.getLogger(__name__)

PR_TITLE = "DeksdenFlow setup: protocol config and CI hooks"
DISCOVERY_COMMIT = "ci(setup): fill the CI hooks for the detected stack"
SETUP_COMMIT = "chore(setup): add DeksdenFlow configuration and CI hooks"


def discovery_prompt(repo: str, base_branch: str) -> str:
    """prompts/discovery.md filled in (it uses `$repo`, `$base_branch`, `$hooks`)."""
    hooks = "\n".join(f"- `{hook_path(h)}`" for h in HOOKS)
    return render_prompt(
        "discovery",
        {"protocol": SETUP_BRANCH, "repo": repo, "base_branch": base_branch, "hooks": hooks},
    )


async def run_discovery(
    ctx: dict[str, Any],
    workdir: Path,
    *,
    repo: str,
    base_branch: str,
    project: Project | None = None,
) -> EngineResult:
    """One engine call (phase "discovery") in `workdir`; it edits the hooks, the caller commits."""
    settings: Settings = ctx["settings"]
    project_models: dict[str, Any] = dict((project.default_models or {}) if project else {})
    engine_id = resolve_engine(
        "execute",
        None,
        None,
        project_models.get("engine") if isinstance(project_models.get("engine"), str) else None,
        settings.engine,
    )
    # resolve_model knows the protocol phases; discovery has its own setting and map entry
    model = (
        project_models.get("discovery")
        or settings.phase_models().get("discovery")
        or resolve_model("execute", None, None, project_models, settings.phase_models())
    )
    engine = ctx["engines"].get(engine_id)
    request = EngineRequest(
        prompt=discovery_prompt(repo, base_branch),
        workdir=workdir,
        phase="discovery",
        model=model,
        sandbox="workspace-write",
        timeout_s=settings.engine_timeout_s,
        context={
            "repo": repo,
            "base_branch": base_branch,
            "task": "CI discovery",
            "protocol": "setup",
        },
    )
    result: EngineResult = sanitize_result(await engine.run(request))
    if project is not None:
        await record_event(
            ctx["db"],
            f"discovery.{result.outcome}",
            f"{engine_id} discovery: {result.outcome} in {result.duration_s:.1f}s, "
            f"{result.usage.total} tokens",
            project_id=project.id,
            metadata={
                "engine": engine_id,
                "model": model,
                "usage": result.usage.to_dict(),
                "error": result.error,
            },
        )
    if not result.ok:
        raise EngineError(f"CI discovery failed: {result.error or result.outcome}")
    return result


async def _present_on_base(ctx: dict[str, Any], project: Project, auth: gitops.Auth) -> list[str]:
    mirror = await ctx["git"].ensure_mirror(project.git_url, auth)
    present = []
    for path in starter_paths():
        if await gitops.read_file_at(mirror, project.base_branch, path) is not None:
            present.append(path)
    return present


async def _changed_since(workdir: Path, rev: str) -> list[str]:
    _, out = await git(workdir, "diff", "--name-only", rev, "HEAD")
    return [line for line in out.splitlines() if line]


async def _reply(forge: Forge, project_reply: IssueRef | None, body: str) -> None:
    if project_reply is None:
        return
    try:
        await forge.post_comment(project_reply, body)
    except DeksdenFlowError as exc:
        log.warning("setup reply failed: %s", exc)


async def project_onboard(
    ctx: dict[str, Any],
    *,
    project_id: int,
    run_discovery: bool = False,
    reply_to: dict[str, Any] | None = None,
) -> str:
    """Open (or update) a draft PR/MR adding exactly the starter files the base branch lacks.

    Idempotent: the setup branch is rebuilt from the base on every run and pushed with a lease,
    so a re-run after a crash or a second `/init` yields the same proposal.
    """
    db = ctx["db"]
    async with db.sessions() as session:
        project = await session.get(Project, project_id)
    if project is None:
        return "missing"
    forges = ctx["forges"]
    forge: Forge = forges.forge_for(project)
    repo = forges.repo_ref(project)
    target = _reply_target(repo, reply_to)

    async def auth() -> str | None:  # asked before each fetch and push (discovery may be long)
        header: str | None = await forge.git_auth_header(repo)
        return header

    try:
        present = await _present_on_base(ctx, project, auth)
        missing = missing_starter_files(present)
        if not missing and not run_discovery:
            await record_event(
                db,
                "project.onboard_skipped",
                "every starter file is already on the base branch",
                project_id=project_id,
            )
            return await _nothing(
                ctx,
                forge,
                target,
                "This repository already has every DeksdenFlow starter file. Nothing to do.",
            )
        workdir, changed, discovered = await _proposal(ctx, project, missing, run_discovery, auth)
        added = [f.path for f in missing]
        if not changed:
            return await _nothing(
                ctx,
                forge,
                target,
                "Nothing to propose: the starter files exist and discovery changed nothing.",
            )
        head, pull = await _push_and_open(
            ctx, forge, repo, project, workdir, auth, added, discovered
        )
    except DeksdenFlowError as exc:
        return await _failed(ctx, forge, target, project, exc)
    await _proposed(ctx, forge, target, project_id, pull, added, discovered, head)
    await count_job(ctx, "project_onboard", "ok")
    return "ok"


def _reply_target(repo: Any, reply_to: dict[str, Any] | None) -> IssueRef | None:
    """Where the command that asked for onboarding was given (None: nowhere to answer)."""
    if not reply_to or reply_to.get("number") is None:
        return None
    return IssueRef(repo, int(reply_to["number"]), reply_to.get("kind", "issue"))


async def _failed(
    ctx: dict[str, Any], forge: Forge, target: IssueRef | None, project: Project, exc: Exception
) -> str:
    """Onboarding could not finish: an event, a log line and the reason where it was asked."""
    log.warning("onboarding %s failed: %s", project.name, exc)
    await record_event(ctx["db"], "project.onboard_failed", str(exc), project_id=project.id)
    await _reply(forge, target, f"Setup failed: {exc}")
    await count_job(ctx, "project_onboard", "failed")
    return "failed"


async def _nothing(ctx: dict[str, Any], forge: Forge, target: IssueRef | None, text: str) -> str:
    """Nothing to propose: say so where the command was given."""
    await _reply(forge, target, text)
    await count_job(ctx, "project_onboard", "nothing")
    return "nothing"


async def _push_and_open(
    ctx: dict[str, Any],
    forge: Forge,
    repo: Any,
    project: Project,
    workdir: Any,
    auth: Any,
    added: list[str],
    discovered: Any,
) -> tuple[str, PullRef]:
    """Push the setup branch (with a lease) and open, or refresh, its draft PR/MR."""
    head = await gitops.push(
        workdir,
        SETUP_BRANCH,
        project.git_url,
        auth,
        force_with_lease=True,
        credential_hosts=ctx["git"].credential_hosts,
    )
    pull: PullRef = await forge.open_draft_pr(
        repo,
        head=SETUP_BRANCH,
        base=project.base_branch,
        title=PR_TITLE,
        body=pr_body(added, discovered),
    )
    await forge.update_pr(pull, title=PR_TITLE, body=pr_body(added, discovered))
    return head, pull


async def _proposed(
    ctx: dict[str, Any],
    forge: Forge,
    target: IssueRef | None,
    project_id: int,
    pull: PullRef,
    added: list[str],
    discovered: list[str] | None,
    head: str,
) -> None:
    """Record and announce the setup proposal."""
    await record_event(
        ctx["db"],
        "project.onboarded",
        f"setup proposed in {pull.url}: {len(added)} file(s)"
        + (f", discovery changed {len(discovered)}" if discovered is not None else ""),
        project_id=project_id,
        metadata={"files": added, "discovery": discovered, "pr": pull.number, "head": head},
    )
    await _reply(
        forge,
        target,
        f"Setup proposed in {pull.url} (draft): {len(added)} starter file(s)"
        + (" and CI hooks filled in by discovery" if discovered else "")
        + ". Review and merge it to enable protocols.",
    )


async def _proposal(
    ctx: dict[str, Any],
    project: Project,
    missing: list[StarterFile],
    run_discovery: bool,
    auth: gitops.Auth,
) -> tuple[Path, bool, list[str] | None]:
    """The setup branch rebuilt from the base with the missing files (and discovery's edits).

    A fresh branch from the base each time: the proposal is exactly "what the base lacks".
    Returns the worktree, whether anything was committed, and the files discovery changed.
    """
    settings: Settings = ctx["settings"]
    wt = await ctx["git"].ensure_worktree(project.git_url, SETUP_BRANCH, project.base_branch, auth)
    workdir: Path = wt.path
    await git(workdir, "reset", "--quiet", "--hard", remote_ref(project.base_branch))
    await git(workdir, "clean", "-fdq")
    start = await gitops.head_sha(workdir)
    for item in missing:
        write_file(workdir, item)
    await gitops.commit_all(workdir, SETUP_COMMIT, settings.bot_name, settings.bot_email)
    discovered: list[str] | None = None
    if run_discovery:
        before = await gitops.head_sha(workdir)
        await run_discovery_job_step(ctx, workdir, project)
        await gitops.commit_all(workdir, DISCOVERY_COMMIT, settings.bot_name, settings.bot_email)
        discovered = await _changed_since(workdir, before)
    return workdir, await gitops.head_sha(workdir) != start, discovered


async def run_discovery_job_step(
    ctx: dict[str, Any], workdir: Path, project: Project
) -> EngineResult:
    return await run_discovery(
        ctx, workdir, repo=project.name, base_branch=project.base_branch, project=project
    )


async def codemachine_prepare(ctx: dict[str, Any], *, protocol_run_id: int) -> str:
    """Write an imported CodeMachine run's files to its branch, open its draft PR, mark it planned.

    Idempotent like planning: a commit carrying the step-00 trailer means the files are there.
    Runs inside the step runner's boundary: the protocol's lease, and a failure that ends the
    planning `failed` with its reason instead of leaving it `planning`.
    """

    async def body(env: JobEnv) -> str:
        return await _write_imported(env, protocol_run_id)

    return await guarded(ctx, "codemachine_prepare", protocol_run_id, None, body)


async def _write_imported(env: JobEnv, protocol_run_id: int) -> str:
    db, settings, ctx = env.db, env.settings, env.ctx
    state = await load_run(db, protocol_run_id)
    if state.run.status not in (ProtocolStatus.PENDING, ProtocolStatus.PLANNING):
        return f"skipped-{state.run.status}"
    if state.run.status == ProtocolStatus.PENDING:
        await set_protocol_status(
            db, protocol_run_id, ProtocolStatus.PLANNING, "writing the imported protocol"
        )
    runtime = dict(state.run.runtime_state or {})
    imported = dict(runtime.get("codemachine") or {})
    files: dict[str, str] = imported.get("files") or {}
    workdir = await env.worktree(state)
    name = state.run.protocol_name
    if (
        await gitops.has_commit_with_trailer(
            workdir, step_marker(state.number, 0), state.run.base_branch
        )
        is None
    ):
        for rel, content in files.items():
            target = workdir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
        await gitops.commit_all(
            workdir,
            plan_commit_message(state.run.description, state.number),
            settings.bot_name,
            settings.bot_email,
        )
    head = await env.push(state, workdir)
    # the files now live on the branch; keep only the list in the database
    imported["files"] = sorted(files)
    await update_run(
        db, protocol_run_id, head_sha=head, runtime_state={**runtime, "codemachine": imported}
    )
    await set_protocol_status(
        db, protocol_run_id, ProtocolStatus.PLANNED, f"imported {len(state.steps)} steps"
    )
    body = draft_pr_body(
        protocol_name=name,
        task=state.run.description,
        issue_number=state.run.issue_number,
        plan_files=sorted(f for f in files if f.startswith(f".protocols/{name}/")),
    )
    pull = await open_or_update_pr(
        ctx, protocol_run_id, pr_title(name, state.run.description), body
    )
    if pull is not None:
        await update_run(db, protocol_run_id, pr_number=pull.number, pr_url=pull.url)
    await publish_status(ctx, protocol_run_id)
    if state.run.auto_mode:
        await enqueue_next_step(ctx, protocol_run_id)
    return "planned"
