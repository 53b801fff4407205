"""Slash-commands and labels → permission check, 👀, an action; the same flow on every forge."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.exceptions import RedisError
from sqlalchemy import select

from bot.core.errors import DeksdenFlowError, NotFound, TransitionConflict
from bot.domain.commands import (
    MAX_COMMANDS_PER_COMMENT,
    Command,
    CommandError,
    help_text,
    label_intent,
    least_required,
    near_a_command,
    parse_commands,
    permission_allows,
    permission_refusal,
    render_command_error,
    required_permission,
    sanitize_prompt_text,
)
from bot.domain.mentions import bot_handles, mentions_to_commands
from bot.domain.states import ProtocolStatus
from bot.forge.base import CommentRef, Forge, IssueRef, RepoRef
from bot.handlers.forge_events import CommentEvent, LabelEvent, RepoInfo
from bot.handlers.router import HandlerContext
from bot.jobs import actions
from bot.jobs import catalogue as jobs
from bot.jobs.feedback import publish_status
from bot.storage.models import Project, ProtocolRun
from bot.storage.runs import get_or_create_project, update_run

log = logging.getLogger(__name__)

# a protocol in one of these is over: a new label or /plan on its thread starts another
ENDED = frozenset({ProtocolStatus.COMPLETED, ProtocolStatus.CANCELLED, ProtocolStatus.FAILED})


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


async def latest_run(
    ctx: HandlerContext, project: Project, number: int, kind: str = "issue"
) -> ProtocolRun | None:
    """The newest protocol of an issue (by its issue number) or of a PR/MR (by its number).

    The two are looked up apart: on GitLab issue #3 and MR !3 are different objects, and a
    command on one must never act on the protocol of the other.
    """
    column = ProtocolRun.issue_number if kind == "issue" else ProtocolRun.pr_number
    async with ctx.services["db"].sessions() as session:
        found: ProtocolRun | None = (
            await session.execute(
                select(ProtocolRun)
                .where(ProtocolRun.project_id == project.id, column == number)
                .order_by(ProtocolRun.id.desc())
                .limit(1)
            )
        ).scalar()
        return found


def _kind(ev: CommentEvent, forge: Forge) -> Literal["issue", "pull", "merge_request"]:
    return forge.pull_kind if ev.is_pull else "issue"


async def _reply(forge: Forge, target: IssueRef, body: str, ctx: HandlerContext) -> None:
    try:
        await forge.post_comment(target, body)
    except DeksdenFlowError as exc:
        log.warning("reply failed: %s", exc)
        ctx.note(reply_failed=str(exc))


@dataclass
class Replies:
    """What the bot has to say about one comment or label: posted as ONE reply at the end."""

    parts: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.parts.append(text)


async def reply_allowed(ctx: HandlerContext, provider: str, repo: str, user: str) -> bool:
    """Per-user, per-repository budget of bot replies (a fixed window in Redis).

    Whoever can comment can make the bot answer; the window caps what one person can make it
    post in one repository, which keeps the App clear of the forge's abuse limits.
    """
    settings = ctx.services["settings"]
    limit: int = settings.reply_rate_limit
    redis = ctx.services.get("redis")
    if limit <= 0 or redis is None:
        return True
    key = f"deksdenflow:replies:{provider}:{repo}:{user.casefold()}"
    try:
        await redis.set(key, 0, ex=settings.reply_rate_window_s, nx=True)
        count = int(await redis.incr(key))
    except RedisError as exc:  # the budget is a courtesy to the forge: not worth a lost reply
        log.warning("reply rate limit unavailable: %s", exc)
        return True
    return count <= limit


async def send_replies(
    ctx: HandlerContext, forge: Forge, target: IssueRef, author: str, replies: Replies
) -> None:
    if not replies.parts:
        return
    if not await reply_allowed(ctx, target.repo.provider, target.repo.full_name, author):
        ctx.note(reply="rate-limited", author=author)
        return
    await _reply(forge, target, "\n\n---\n\n".join(replies.parts), ctx)


async def handle_comment(ctx: HandlerContext, ev: CommentEvent) -> None:
    if ev.author_is_bot:
        ctx.note(ignored="comment by a bot")
        return
    prefix: str = ctx.services["settings"].command_prefix
    # one more than allowed, so a comment past the cap is recognised without parsing all of it
    parsed = parse_commands(ev.body, prefix=prefix, limit=MAX_COMMANDS_PER_COMMENT + 1)
    if (
        not parsed and "@" in ev.body
    ):  # `@bot plan …` is `/plan …` (the only way past GitLab's quick actions)
        parsed = await _mentioned_commands(ctx, ev, prefix)
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
    target = IssueRef(repo, ev.issue_number, _kind(ev, forge))
    comment = CommentRef(target, ev.comment_id)
    if ev.author_id is not None and await forge.is_self(author_id=ev.author_id):
        ctx.note(ignored="our own note")  # a token of an ordinary user account is still us
        return
    config = project.config or {}
    overrides = config.get("permissions")
    # Who may act is known before the bot says anything: it answers only those who may.
    permission: str = await forge.get_permission(repo, ev.author)
    may_act = permission_allows(permission, least_required(overrides))
    replies = Replies()
    if len(parsed) > MAX_COMMANDS_PER_COMMENT:
        ctx.note(result="too-many-commands", permission=permission)
        if may_act:
            replies.add(
                f"This comment holds more than {MAX_COMMANDS_PER_COMMENT} commands, so none of "
                f"them ran. Send at most {MAX_COMMANDS_PER_COMMENT} per comment."
            )
        await send_replies(ctx, forge, target, ev.author, replies)
        return
    from_fork: bool | None = ev.from_fork or None  # None: not known yet (GitHub asks the pull)
    for item in parsed:
        if isinstance(item, CommandError):
            if not _answer_error(item, permission, may_act, forge.quick_actions, overrides):
                ctx.note(command=item.name, result=f"{item.kind}-unanswered")
                continue
            replies.add(render_command_error(item, prefix))
            ctx.note(command=item.name, result=item.kind)
            continue
        required = required_permission(item.name, overrides)
        if not permission_allows(permission, required):
            replies.add(
                permission_refusal(
                    ev.author, item.name, required, permission, project.provider, prefix
                )
            )
            ctx.note(command=item.name, result="refused", permission=permission)
            continue
        if not config.get("allow_fork_commands") and item.name not in ("help", "status"):
            if from_fork is None:
                from_fork = await _pull_is_fork(forge, ev, repo)
            if from_fork:
                replies.add(
                    f"`{prefix}{item.name}` is not accepted on {forge.pull_word}s from forks here."
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
            ctx, project, forge, target, item, ev.issue_title, ev.issue_body, reply_to, replies
        )
        ctx.note(command=item.name, result=result)
    await send_replies(ctx, forge, target, ev.author, replies)


async def handles_for(ctx: HandlerContext, project: Project, forge: Forge) -> tuple[str, ...]:
    """The names `@<bot>` mentions use: the App's slug on GitHub, the token's user on GitLab."""
    settings = ctx.services["settings"]
    try:
        return bot_handles(*await forge.own_handles())
    except DeksdenFlowError as exc:  # without our name no mention is ours; commands still work
        log.warning("bot handle unknown: %s", exc)
        return bot_handles(settings.github_app_slug)


async def _mentioned_commands(
    ctx: HandlerContext, ev: CommentEvent, prefix: str
) -> list[Command | CommandError]:
    try:
        project = await project_for(ctx, ev.repo)
    except NotFound:
        return []
    forge: Forge = ctx.services["forges"].forge_for(project)
    body = mentions_to_commands(ev.body, await handles_for(ctx, project, forge), prefix)
    return parse_commands(body, prefix=prefix, limit=MAX_COMMANDS_PER_COMMENT + 1)


def _answer_error(
    err: CommandError,
    permission: str,
    may_act: bool,
    quick_actions: Collection[str],
    overrides: Mapping[str, str] | None,
) -> bool:
    """Whether a command we cannot use deserves an answer (pure).

    An unknown name is answered only for someone who may act and only when it is a likely typo
    of ours (within edit distance 2), never for the forge's own quick actions (GitLab's); a
    malformed known command only for someone allowed to run it.
    """
    if err.kind == "unknown":
        if err.name.replace("-", "_") in quick_actions:
            return False
        return may_act and near_a_command(err.name)
    return permission_allows(permission, required_permission(err.name, overrides))


async def _pull_is_fork(forge: Forge, ev: CommentEvent, repo: RepoRef) -> bool:
    """Only a comment on a pull request can come from a fork; forges whose payloads do not say
    (GitHub's issue_comment) are asked, once per comment."""
    if not ev.is_pull:
        return False
    return await forge.pull_is_fork(repo, ev.issue_number)


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
    replies = Replies()
    existing = await latest_run(ctx, project, ev.issue_number, "issue")
    active = existing if existing is not None and existing.status not in ENDED else None
    permission = await forge.get_permission(target.repo, ev.author)
    for label, intent in wanted:
        if active is not None and (intent.name == "plan" or active.auto_mode):
            # a label starts planning once: a later hook that still (or again) carries it —
            # GitLab sends the labels of an issue opened with them, then its updates — must
            # not plan twice (the auto label on a planned protocol still switches auto on)
            ctx.note(label=label, result=f"{active.protocol_name} is already {active.status}")
            continue
        if not permission_allows(permission, required):
            replies.add(
                f"Sorry @{ev.author}, the `{label}` label needs {required} access "
                "to start a protocol."
            )
            ctx.note(label=label, result="refused")
            continue
        result = await dispatch(
            ctx, project, forge, target, intent, ev.issue_title, ev.issue_body, None, replies
        )
        ctx.note(label=label, result=result)
    await send_replies(ctx, forge, target, ev.author, replies)


def forges_repo(services: dict[str, Any], project: Project) -> RepoRef:
    repo: RepoRef = services["forges"].repo_ref(project)
    return repo


async def dispatch(
    ctx: HandlerContext,
    project: Project,
    forge: Forge,
    target: IssueRef,
    cmd: Command,
    issue_title: str,
    issue_body: str,
    reply_to: dict[str, Any] | None,
    replies: Replies,
) -> str:
    services = ctx.services
    name = cmd.name
    prefix: str = services["settings"].command_prefix
    try:
        if name == "help":
            handles = await handles_for(ctx, project, forge)
            replies.add(
                help_text(prefix, forge=project.provider, bot=handles[0] if handles else "")
            )
            return "help"
        if name == "init":
            return await _enqueue_setup(services, project, target, reply_to)
        if name in ("plan", "auto"):
            return await _plan(
                ctx, project, forge, target, cmd, issue_title, issue_body, reply_to, replies
            )
        found = await latest_run(ctx, project, target.number, target.kind)
        if found is None:
            replies.add(
                f"There is no protocol for #{target.number} yet: "
                f"comment `{prefix}plan` to start one."
            )
            return "no-protocol"
        return await _on_run(services, found, cmd, reply_to, replies)
    except TransitionConflict as exc:
        replies.add(f"Can't `{prefix}{name}` now: {exc}.")
        return "conflict"
    except NotFound as exc:
        replies.add(f"Can't `{prefix}{name}`: {exc}.")
        return "not-found"


async def _enqueue_setup(
    services: dict[str, Any],
    project: Project,
    target: IssueRef,
    reply_to: dict[str, Any] | None,
) -> str:
    """`init`: repository setup is per project, not per protocol: a draft PR/MR with the starter
    files; discovery runs when a discovery model is configured or the repo asks for it."""
    discovery = bool(
        services["settings"].protocol_discovery_model
        or (project.config or {}).get("setup", {}).get("discovery")
    )
    await jobs.submit(
        services["redis"],
        jobs.project_onboard(
            project.id,
            f"{target.number}:{(reply_to or {}).get('comment_id')}",
            run_discovery=discovery,
            reply_to=reply_to or {"number": target.number, "kind": target.kind},
        ),
    )
    return "init-enqueued"


async def _plan(
    ctx: HandlerContext,
    project: Project,
    forge: Forge,
    target: IssueRef,
    cmd: Command,
    issue_title: str,
    issue_body: str,
    reply_to: dict[str, Any] | None,
    replies: Replies,
) -> str:
    """`plan` / `auto`: start a protocol for the issue or PR/MR (`auto` on a running one only
    switches auto mode on)."""
    services = ctx.services
    name = cmd.name
    prefix: str = services["settings"].command_prefix
    existing = await latest_run(ctx, project, target.number, target.kind)
    if name == "auto" and existing is not None and existing.status not in ENDED:
        await update_run(services["db"], existing.id, auto_mode=True, approved=True)
        await actions.approve(services, existing.id)
        return "auto-enabled"
    # prompt text comes only from what existed at trigger time, cleaned of hidden text
    task = sanitize_prompt_text(cmd.text or issue_title or "the task described in the issue", 2000)
    pull = None
    if target.kind != "issue":  # planned on this PR/MR: its branch, found by its number
        if existing is not None and existing.status not in ENDED:
            replies.add(
                f"This already runs {existing.protocol_name} ({existing.status}): "
                f"`{prefix}status` shows it."
            )
            return "already-planned"
        head, base = await forge.pull_branches(forges_repo(services, project), target.number)
        pull = (target.number, head, base)
    run = await actions.start_protocol(
        services,
        project,
        task,
        issue_number=target.number if target.kind == "issue" else None,
        issue_body=sanitize_prompt_text(issue_body),
        auto=name == "auto",
        reply_to=reply_to,
        pull=pull,
    )
    return f"planning {run.protocol_name}"


async def _on_run(
    services: dict[str, Any],
    run: ProtocolRun,
    cmd: Command,
    reply_to: dict[str, Any] | None,
    replies: Replies,
) -> str:
    """A command on the issue's or PR's existing protocol (status, approve, run-step, qa, retry,
    pause, resume, cancel)."""
    name = cmd.name
    prefix: str = services["settings"].command_prefix
    if name == "status":
        await publish_status(services, run.id)
        return "status"
    if name == "approve":
        return await actions.approve(services, run.id, cmd.step)
    if name in ("run-step",):
        if not run.approved:
            replies.add(f"The plan is not approved yet: review it, then comment `{prefix}approve`.")
            return "not-approved"
        index = await actions.run_step(services, run.id, cmd.step, reply_to)
        return f"step {index}"
    if name == "qa":
        return f"qa {await actions.run_qa(services, run.id, cmd.step, reply_to)}"
    if name == "retry":
        retried = await actions.retry(services, run.id, cmd.step, reply_to, guidance=cmd.text)
        return f"retry {retried}"
    by = (reply_to or {}).get("author")
    if name == "pause":
        await actions.pause(services, run.id, by=by)
    elif name == "resume":
        await actions.resume(services, run.id, reply_to)
    elif name == "cancel":
        await actions.cancel(services, run.id, by=by)
    await publish_status(services, run.id)
    return name
