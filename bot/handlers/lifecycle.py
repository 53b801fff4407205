"""Installations, pull/merge requests, CI results and check-run buttons."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, update

from bot.core.errors import DeksdenFlowError, NotFound, TransitionConflict
from bot.domain.ci_evidence import CIEvidence, names_only
from bot.domain.graph import parent_branch
from bot.domain.rendering import ACTION_RETRY, ACTION_RUN_NEXT, ACTION_RUN_QA, parse_check_name
from bot.forge.ci_fetch import github_evidence, gitlab_evidence, status_evidence
from bot.handlers.ci_report import handle_report
from bot.handlers.forge_events import dig, github_repo, gitlab_repo
from bot.handlers.router import HandlerContext, Router
from bot.jobs import actions
from bot.jobs import catalogue as jobs
from bot.jobs.ci import CIResult, apply_ci_result, ci_step_for, pr_finished
from bot.jobs.schedule import about_protocol_head
from bot.storage.models import Project, ProtocolRun
from bot.storage.runs import get_or_create_project, record_event, run_branch

log = logging.getLogger(__name__)
router = Router()

PASSING = {"success", "neutral", "skipped"}


async def run_for_branch(
    ctx: HandlerContext, provider: str, full_name: str, branch: str
) -> ProtocolRun | None:
    if not branch:
        return None
    async with ctx.services["db"].sessions() as session:
        found: ProtocolRun | None = (
            await session.execute(
                select(ProtocolRun)
                .join(Project, Project.id == ProtocolRun.project_id)
                .where(
                    Project.name == full_name,
                    Project.provider == provider,
                    # a step's child branch (NNNN-task--XX) reports to its protocol
                    ProtocolRun.protocol_name == parent_branch(branch),
                )
            )
        ).scalar()
        if found is None:  # a protocol planned on an existing PR commits to that PR's branch
            found = await _run_on_pull_branch(session, provider, full_name, branch)
        return found


async def _run_on_pull_branch(
    session: Any, provider: str, full_name: str, branch: str
) -> ProtocolRun | None:
    candidates = (
        await session.execute(
            select(ProtocolRun)
            .join(Project, Project.id == ProtocolRun.project_id)
            .where(
                Project.name == full_name,
                Project.provider == provider,
                ProtocolRun.pr_number.is_not(None),
            )
            .order_by(ProtocolRun.id.desc())
            .limit(50)
        )
    ).scalars()
    return next(
        (run for run in candidates if run_branch(run) == branch and run.protocol_name != branch),
        None,
    )


# -- GitHub installations -------------------------------------------------------------------


async def _set_enabled(
    ctx: HandlerContext, names: list[str], enabled: bool, installation_id: int | None
) -> None:
    async with ctx.services["db"].sessions.begin() as session:
        query = update(Project).where(Project.provider == "github")
        query = (
            query.where(Project.name.in_(names))
            if names
            else query.where(Project.installation_id == installation_id)
        )
        await session.execute(query.values(enabled=enabled))


async def _register(ctx: HandlerContext, repos: Any, installation_id: int | None) -> list[str]:
    names: list[str] = []
    for repo in repos if isinstance(repos, list) else []:
        name = dig(repo, "full_name")
        if not isinstance(name, str) or "/" not in name:
            continue
        project = await get_or_create_project(
            ctx.services["db"],
            name=name,
            provider="github",
            git_url=f"{ctx.services['settings'].github_web_url}/{name}.git",
            base_branch="main",
            installation_id=installation_id,
        )
        names.append(name)
        await jobs.submit(
            ctx.services["redis"], jobs.project_setup(project.id, str(ctx.delivery_id))
        )
    return names


@router.register("github", "installation")
async def installation(ctx: HandlerContext) -> None:
    payload = ctx.delivery.payload
    action = payload.get("action")
    inst = dig(payload, "installation", "id")
    inst_id = inst if isinstance(inst, int) else None
    names = [
        n
        for n in (
            dig(r, "full_name") for r in payload.get("repositories") or [] if isinstance(r, dict)
        )
        if isinstance(n, str)
    ]
    if action == "created":
        ctx.note(registered=await _register(ctx, payload.get("repositories"), inst_id))
    elif action in ("deleted", "suspend"):
        await _set_enabled(ctx, names, False, inst_id)
        ctx.note(disabled=names or f"installation {inst_id}")
    elif action == "unsuspend":
        await _set_enabled(ctx, names, True, inst_id)
        ctx.note(enabled=names or f"installation {inst_id}")


@router.register("github", "installation_repositories")
async def installation_repositories(ctx: HandlerContext) -> None:
    payload = ctx.delivery.payload
    inst = dig(payload, "installation", "id")
    inst_id = inst if isinstance(inst, int) else None
    if payload.get("action") == "added":
        ctx.note(registered=await _register(ctx, payload.get("repositories_added"), inst_id))
    elif payload.get("action") == "removed":
        removed = [
            n
            for n in (
                dig(r, "full_name")
                for r in payload.get("repositories_removed") or []
                if isinstance(r, dict)
            )
            if isinstance(n, str)
        ]
        if removed:
            await _set_enabled(ctx, removed, False, inst_id)
        ctx.note(disabled=removed)


# -- pull requests ----------------------------------------------------------------------------


@router.register("github", "pull_request", "closed")
async def github_pr_closed(ctx: HandlerContext) -> None:
    payload = ctx.delivery.payload
    repo = github_repo(payload)
    branch = dig(payload, "pull_request", "head", "ref")
    if repo is None or not isinstance(branch, str):
        return
    run = await run_for_branch(ctx, "github", repo.full_name, branch)
    if run is not None:
        ctx.note(
            protocol=run.protocol_name,
            result=await pr_finished(
                ctx.services, run.id, bool(dig(payload, "pull_request", "merged"))
            ),
        )


@router.register("gitlab", "merge request hook")
async def gitlab_mr(ctx: HandlerContext) -> None:
    payload = ctx.delivery.payload
    repo = gitlab_repo(payload)
    action = dig(payload, "object_attributes", "action")
    branch = dig(payload, "object_attributes", "source_branch")
    if repo is None or action not in ("merge", "close") or not isinstance(branch, str):
        return
    run = await run_for_branch(ctx, "gitlab", repo.full_name, branch)
    if run is not None:
        ctx.note(
            protocol=run.protocol_name,
            result=await pr_finished(ctx.services, run.id, action == "merge"),
        )


# -- CI ---------------------------------------------------------------------------------------


async def _github_ci(ctx: HandlerContext, branch: Any, sha: Any) -> None:
    payload = ctx.delivery.payload
    repo = github_repo(payload)
    if repo is None or not isinstance(branch, str) or not isinstance(sha, str):
        return
    run = await run_for_branch(ctx, "github", repo.full_name, branch)
    if run is None:
        return
    if not await _gated_commit(ctx, run, sha):
        ctx.note(ignored="not a step's commit")
        return
    project = await _project(ctx, run.project_id)
    forge = ctx.services["forges"].forge_for(project)
    repo_ref = ctx.services["forges"].repo_ref(project)
    suites = await forge.list_check_suites(repo_ref, sha)
    app_id = ctx.services["settings"].github_app_id
    others = [s for s in suites if dig(s, "app", "id") != app_id]
    if any(dig(s, "status") != "completed" for s in others):
        ctx.note(waiting="other check suites still running")
        return
    failing = sorted(
        (
            str(dig(s, "app", "name") or dig(s, "app", "slug") or s.get("id")),
            str(s.get("conclusion")),
        )
        for s in others
        if s.get("conclusion") not in PASSING
    )
    result: CIResult = "failure" if failing else "success"

    async def evidence() -> CIEvidence:  # fetched only if the failure is acted on
        return await github_evidence(forge, repo_ref, sha, app_id)

    outcome = await apply_ci_result(
        ctx.services, run.id, sha, result, failing, source="github-checks", evidence=evidence
    )
    ctx.note(ci=result, outcome=outcome)


async def _gated_commit(ctx: HandlerContext, run: ProtocolRun, sha: str) -> bool:
    """Whether CI on `sha` concerns the protocol: a step's commit, or the protocol branch's head
    after a graph's merges (no step's commit, but it gates the protocol's completion)."""

    return about_protocol_head(run, sha) or await ci_step_for(ctx.services, run.id, sha) is not None


async def _project(ctx: HandlerContext, project_id: int) -> Project:
    async with ctx.services["db"].sessions() as session:
        project: Project | None = await session.get(Project, project_id)
        if project is None:
            raise NotFound(f"project {project_id} is gone")
        return project


@router.register("github", "check_suite", "completed")
async def github_check_suite(ctx: HandlerContext) -> None:
    payload = ctx.delivery.payload
    if dig(payload, "check_suite", "app", "id") == ctx.services["settings"].github_app_id:
        return  # our own checks are not CI
    await _github_ci(
        ctx, dig(payload, "check_suite", "head_branch"), dig(payload, "check_suite", "head_sha")
    )


@router.register("github", "workflow_run", "completed")
async def github_workflow_run(ctx: HandlerContext) -> None:
    payload = ctx.delivery.payload
    await _github_ci(
        ctx, dig(payload, "workflow_run", "head_branch"), dig(payload, "workflow_run", "head_sha")
    )


@router.register("github", "status")
async def github_status(ctx: HandlerContext) -> None:
    payload = ctx.delivery.payload
    state = payload.get("state")
    sha = payload.get("sha")
    branches = [dig(b, "name") for b in payload.get("branches") or [] if isinstance(b, dict)]
    repo = github_repo(payload)
    if repo is None or state == "pending" or not isinstance(sha, str):
        return
    for branch in branches:
        run = (
            await run_for_branch(ctx, "github", repo.full_name, branch)
            if isinstance(branch, str)
            else None
        )
        if run is None:
            continue
        if not await _gated_commit(ctx, run, sha):
            ctx.note(ignored="not a step's commit")
            return
        if state in ("failure", "error"):
            context = str(payload.get("context") or "status")
            failing = [(context, str(state))]
            found = status_evidence(context, str(state), str(payload.get("description") or ""))
            outcome = await apply_ci_result(
                ctx.services,
                run.id,
                sha,
                "failure",
                failing,
                source="github-status",
                evidence=found,
            )
            ctx.note(outcome=outcome)
        else:
            await _github_ci(ctx, branch, sha)
        return


@router.register("gitlab", "pipeline hook")
async def gitlab_pipeline(ctx: HandlerContext) -> None:
    payload = ctx.delivery.payload
    repo = gitlab_repo(payload)
    status = dig(payload, "object_attributes", "status")
    branch = dig(payload, "object_attributes", "ref")
    sha = dig(payload, "object_attributes", "sha")
    if (
        repo is None
        or status not in ("success", "failed", "canceled")
        or not isinstance(branch, str)
    ):
        return
    run = await run_for_branch(ctx, "gitlab", repo.full_name, branch)
    if run is None or not isinstance(sha, str):
        return
    if not await _gated_commit(ctx, run, sha):
        ctx.note(ignored="not a step's commit")
        return
    raw_builds = payload.get("builds")
    builds: list[Any] = raw_builds if isinstance(raw_builds, list) else []
    failing = sorted(
        (str(dig(b, "name")), str(dig(b, "status")))
        for b in builds
        if isinstance(b, dict) and dig(b, "status") in ("failed", "canceled")
    ) or ([("pipeline", str(status))] if status != "success" else [])
    result: CIResult = "success" if status == "success" else "failure"
    pipeline_id = dig(payload, "object_attributes", "id")

    async def evidence() -> CIEvidence:  # fetched only if the failure is acted on
        project = await _project(ctx, run.project_id)
        forge = ctx.services["forges"].forge_for(project)
        found = await gitlab_evidence(
            forge, ctx.services["forges"].repo_ref(project), int(pipeline_id)
        )
        return found if found.jobs else names_only("gitlab-ci", failing)

    outcome = await apply_ci_result(
        ctx.services, run.id, sha, result, failing, source="gitlab-ci",
        evidence=evidence if isinstance(pipeline_id, int) else None,
    )  # fmt: skip
    ctx.note(ci=result, outcome=outcome)


@router.register("ci", "report")
async def ci_report(ctx: HandlerContext) -> None:
    """A report of the CI hook (POST /webhooks/ci), stored by the intake like a forge's."""
    await handle_report(ctx)


# -- check-run buttons --------------------------------------------------------------------------


@router.register("github", "check_run", "requested_action", "rerequested")
async def github_check_run(ctx: HandlerContext) -> None:
    payload = ctx.delivery.payload
    parsed = parse_check_name(str(dig(payload, "check_run", "name") or ""))
    repo = github_repo(payload)
    branch = dig(payload, "check_run", "check_suite", "head_branch")
    if parsed is None or repo is None or not isinstance(branch, str):
        return
    kind, index = parsed
    run = await run_for_branch(ctx, "github", repo.full_name, branch)
    if run is None:
        return
    if payload.get("action") == "rerequested":
        identifier = ACTION_RUN_QA if kind == "qa" else ACTION_RETRY
    else:
        identifier = str(dig(payload, "requested_action", "identifier") or "")
    try:
        if identifier == ACTION_RUN_NEXT:
            result: Any = await actions.run_step(ctx.services, run.id, None)
        elif identifier == ACTION_RUN_QA:
            result = await actions.run_qa(ctx.services, run.id, index)
        elif identifier == ACTION_RETRY:
            result = await actions.retry(ctx.services, run.id, index)
        else:
            ctx.note(ignored=f"unknown action {identifier!r}")
            return
    except (TransitionConflict, NotFound) as exc:
        await record_event(ctx.services["db"], "action.refused", str(exc), protocol_run_id=run.id)
        ctx.note(action=identifier, result="refused")
        return
    except DeksdenFlowError:
        raise
    ctx.note(action=identifier, step=result)
