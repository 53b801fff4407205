"""Slash-commands and labels → permission check, 👀, an action; the same flow on every forge."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import or_, select

from bot import actions
from bot.commands import (
    Command,
    CommandError,
    help_text,
    label_intent,
    parse_commands,
    permission_allows,
    render_command_error,
    required_permission,
    sanitize_prompt_text,
)
from bot.errors import DeksdenFlowError, NotFound, TransitionConflict
from bot.feedback import publish_status
from bot.forge.base import CommentRef, Forge, IssueRef, RepoRef
from bot.handlers.forge_events import CommentEvent, LabelEvent, RepoInfo
from bot.handlers.router import HandlerContext
from bot.models import Project, ProtocolRun
from bot.runs import get_or_create_project, update_run

log = logging.getLogger(__name__)


async def project_for(ctx: HandlerContext, repo: RepoInfo) -> Project:
    """The Project for a repository, registered on first contact; disabled ones raise NotFound."""
    db = ctx.services["db"]
    project = await get_or_create_project(
        db,
        name=repo.full_name,
        provider=repo.provider,
        git_url=repo.clone_url,
        base_branch=repo.default_branch,
        installation_id=repo.installation_id,
        forge_id=repo.forge_id,
    )
    if not project.enabled:
        raise NotFound(f"project {repo.full_name} is disabled")
    return project


async def latest_run(ctx: HandlerContext, project: Project, number: int) -> ProtocolRun | None:
    async with ctx.services["db"].sessions() as session:
        found: ProtocolRun | None = (
            await session.execute(
                select(ProtocolRun)
                .where(
                    ProtocolRun.project_id == project.id,
                    or_(ProtocolRun.issue_number == number, ProtocolRun.pr_number == number),
                )
                .order_by(ProtocolRun.id.desc())
                .limit(1)
            )
        ).scalar()
        return found


def _kind(ev: CommentEvent, provider: str) -> str:
    if not ev.is_pull:
        return "issue"
    return "merge_request" if provider == "gitlab" else "pull"


async def _reply(forge: Forge, target: IssueRef, body: str, ctx: HandlerContext) -> None:
    try:
        await forge.post_comment(target, body)
    except DeksdenFlowError as exc:
        log.warning("reply failed: %s", exc)
        ctx.note(reply_failed=str(exc))


async def handle_comment(ctx: HandlerContext, ev: CommentEvent) -> None:
    if ev.author_is_bot:
        ctx.note(ignored="comment by a bot")
        return
    parsed = parse_commands(ev.body)
    if not parsed:
        ctx.note(ignored="no command")
        return
    try:
        project = await project_for(ctx, ev.repo)
    except NotFound as exc:  # a suspended or removed installation: not a failed delivery
        ctx.note(ignored=str(exc))
        return
    forges = ctx.services["forges"]
    forge: Forge = forges.forge_for(project)
    repo = forges.repo_ref(project)
    target = IssueRef(repo, ev.issue_number, _kind(ev, project.provider))  # type: ignore[arg-type]
    comment = CommentRef(target, ev.comment_id)
    own_user_id = getattr(forge, "own_user_id", None)
    if ev.author_id is not None and own_user_id is not None and ev.author_id == await own_user_id():
        ctx.note(ignored="our own note")  # a token of an ordinary user account is still us
        return
    config = project.config or {}
    permission: str | None = None
    from_fork: bool | None = ev.from_fork or None  # None: not known yet (GitHub asks the pull)
    for item in parsed:
        if isinstance(item, CommandError):
            await _reply(forge, target, render_command_error(item), ctx)
            ctx.note(command=item.name, result=item.kind)
            continue
        required = required_permission(item.name, config.get("permissions"))
        if permission is None and required != "none":
            permission = await forge.get_permission(repo, ev.author)
        if not permission_allows(permission or "none", required):
            await _reply(
                forge,
                target,
                f"Sorry @{ev.author}, `/{item.name}` needs **{required}** access to this repository "
                f"and you have **{permission}**. A maintainer can run it for you.",
                ctx,
            )
            ctx.note(command=item.name, result="refused", permission=permission)
            continue
        if not config.get("allow_fork_commands") and item.name not in ("help", "status"):
            if from_fork is None:
                from_fork = await _pull_is_fork(forge, ev, repo)
            if from_fork:
                await _reply(
                    forge,
                    target,
                    f"`/{item.name}` is not accepted on "
                    f"{'merge' if project.provider == 'gitlab' else 'pull'} requests from forks here.",
                    ctx,
                )
                ctx.note(command=item.name, result="refused-fork")
                continue
        await _safe_react(forge, comment, "eyes")
        reply_to = {
            "number": ev.issue_number,
            "kind": target.kind,
            "comment_id": ev.comment_id,
            "author": ev.author,
        }
        result = await dispatch(
            ctx, project, forge, target, item, ev.issue_title, ev.issue_body, reply_to
        )
        ctx.note(command=item.name, result=result)


async def _pull_is_fork(forge: Forge, ev: CommentEvent, repo: RepoRef) -> bool:
    """Only a comment on a pull request can come from a fork; forges whose payloads do not say
    (GitHub's issue_comment) are asked, once per comment."""
    checker = getattr(forge, "pull_is_fork", None)
    if not ev.is_pull or checker is None:
        return False
    found: bool = await checker(repo, ev.issue_number)
    return found


async def _safe_react(forge: Forge, comment: CommentRef, reaction: str) -> None:
    try:
        await forge.add_reaction(comment, reaction)  # type: ignore[arg-type]
    except DeksdenFlowError as exc:
        log.warning("reaction failed: %s", exc)


async def handle_label(ctx: HandlerContext, ev: LabelEvent) -> None:
    if ev.author_is_bot:
        ctx.note(ignored="label by a bot")
        return
    try:
        project = await project_for(ctx, ev.repo)
    except NotFound as exc:  # a suspended or removed installation: not a failed delivery
        ctx.note(ignored=str(exc))
        return
    labels_config = (project.config or {}).get("labels") or {}
    settings = ctx.services["settings"]
    table = {settings.label_plan: "plan", settings.label_auto: "auto", **labels_config}
    intents = [(label, label_intent(label, table)) for label in ev.labels_added]
    wanted = [(label, intent) for label, intent in intents if intent is not None]
    if not wanted:
        ctx.note(ignored="no label of ours")
        return
    forges = ctx.services["forges"]
    forge: Forge = forges.forge_for(project)
    target = IssueRef(forges.repo_ref(project), ev.issue_number, "issue")
    required = required_permission("plan", (project.config or {}).get("permissions"))
    for label, intent in wanted:
        permission = await forge.get_permission(target.repo, ev.author)
        if not permission_allows(permission, required):
            await _reply(
                forge, target, f"Sorry @{ev.author}, the `{label}` label needs {required} access to start a protocol.", ctx
            )
            ctx.note(label=label, result="refused")
            continue
        result = await dispatch(ctx, project, forge, target, intent, ev.issue_title, ev.issue_body, None)
        ctx.note(label=label, result=result)


async def dispatch(
    ctx: HandlerContext,
    project: Project,
    forge: Forge,
    target: IssueRef,
    cmd: Command,
    issue_title: str,
    issue_body: str,
    reply_to: dict[str, Any] | None,
) -> str:
    services = ctx.services
    name = cmd.name
    try:
        if name == "help":
            await _reply(forge, target, help_text(), ctx)
            return "help"
        if name == "init":
            # repository setup is per project, not per protocol: a draft PR/MR with the starter
            # files; discovery runs when a discovery model is configured or the repo asks for it
            discovery = bool(
                services["settings"].protocol_discovery_model
                or (project.config or {}).get("setup", {}).get("discovery")
            )
            await services["redis"].enqueue_job(
                "project_onboard",
                _job_id=f"onboard:{project.id}:{target.number}:{(reply_to or {}).get('comment_id')}",
                project_id=project.id,
                run_discovery=discovery,
                reply_to=reply_to or {"number": target.number, "kind": target.kind},
            )
            return "init-enqueued"
        if name in ("plan", "auto"):
            existing = await latest_run(ctx, project, target.number)
            if (
                name == "auto"
                and existing is not None
                and existing.status not in ("completed", "cancelled", "failed")
            ):
                await update_run(services["db"], existing.id, auto_mode=True, approved=True)
                await actions.approve(services, existing.id)
                return "auto-enabled"
            # prompt text comes only from what existed at trigger time, cleaned of hidden text
            task = sanitize_prompt_text(
                cmd.text or issue_title or "the task described in the issue", 2000
            )
            run = await actions.start_protocol(
                services,
                project,
                task,
                issue_number=target.number if target.kind == "issue" else None,
                issue_body=sanitize_prompt_text(issue_body),
                auto=name == "auto",
                reply_to=reply_to,
            )
            return f"planning {run.protocol_name}"
        found = await latest_run(ctx, project, target.number)
        if found is None:
            await _reply(
                forge,
                target,
                f"There is no protocol for #{target.number} yet: comment `/plan` to start one.",
                ctx,
            )
            return "no-protocol"
        run = found
        if name == "status":
            await publish_status(services, run.id)
            return "status"
        if name == "approve":
            return await actions.approve(services, run.id, cmd.step)
        if name in ("run-step",):
            if not run.approved:
                await _reply(
                    forge,
                    target,
                    "The plan is not approved yet: review it, then comment `/approve`.",
                    ctx,
                )
                return "not-approved"
            index = await actions.run_step(services, run.id, cmd.step, reply_to)
            return f"step {index}"
        if name == "qa":
            return f"qa {await actions.run_qa(services, run.id, cmd.step, reply_to)}"
        if name == "retry":
            return f"retry {await actions.retry(services, run.id, cmd.step, reply_to)}"
        by = (reply_to or {}).get("author")
        if name == "pause":
            await actions.pause(services, run.id, by=by)
        elif name == "resume":
            await actions.resume(services, run.id, reply_to)
        elif name == "cancel":
            await actions.cancel(services, run.id, by=by)
        await publish_status(services, run.id)
        return name
    except TransitionConflict as exc:
        await _reply(forge, target, f"Can't `/{name}` now: {exc}.", ctx)
        return "conflict"
    except NotFound as exc:
        await _reply(forge, target, f"Can't `/{name}`: {exc}.", ctx)
        return "not-found"
