"""Reviews on a protocol's PR/MR: changes requested → a fix step, approved → `/approve`.

The decisions are bot/domain/review.py's (pure); this module asks the forge who may act, finds the
protocol, and hands the counted comments to the fix-step job (bot/jobs/review.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from bot.core.errors import DeksdenFlowError, NotFound, TransitionConflict
from bot.domain.commands import parse_commands, permission_allows, required_permission
from bot.domain.mentions import mentions_bot, mentions_to_commands
from bot.domain.review import (
    ReviewComment,
    ReviewSubmitted,
    github_pr_comment,
    github_review,
    github_review_comment,
    github_review_comment_event,
    gitlab_approval,
    gitlab_mr_note,
    gitlab_note_type,
    is_feedback,
    review_body_comment,
    select_comments,
)
from bot.forge.base import Forge
from bot.handlers.commands_flow import handles_for, latest_run, project_for
from bot.handlers.forge_events import RepoInfo, github_repo, gitlab_repo
from bot.handlers.router import HandlerContext, Router
from bot.jobs import actions
from bot.jobs.feedback import publish_status
from bot.jobs.review import buffer_comments, enqueue_flush, resolved_threads, taken_ids
from bot.storage.models import Project, ProtocolRun
from bot.storage.runs import load_run

log = logging.getLogger(__name__)
router = Router()

# who may steer the agent with a review: write / Developer, as for the commands that change a
# protocol; a repository may set its own level under `permissions: {review: …}`
REVIEW_PERMISSION = "review"


async def _protocol(
    ctx: HandlerContext, repo: RepoInfo | None, number: int
) -> tuple[Project, ProtocolRun] | None:
    if repo is None:
        return None
    try:
        project = await project_for(ctx, repo)
    except NotFound as exc:
        ctx.note(ignored=str(exc))
        return None
    kind = ctx.services["forges"].forge_for(project).pull_kind
    run = await latest_run(ctx, project, number, kind)
    if run is None:
        ctx.note(ignored="not the pull/merge request of a protocol")
        return None
    return project, run


async def _writers(
    ctx: HandlerContext, project: Project, forge: Forge, authors: Iterable[str]
) -> dict[str, bool]:
    overrides = (project.config or {}).get("permissions")
    required = required_permission(REVIEW_PERMISSION, overrides)
    repo = ctx.services["forges"].repo_ref(project)
    found: dict[str, bool] = {}
    for author in {a for a in authors if a}:
        found[author.casefold()] = permission_allows(
            await forge.get_permission(repo, author), required
        )
    return found


async def take_feedback(
    ctx: HandlerContext,
    project: Project,
    run: ProtocolRun,
    forge: Forge,
    comments: list[ReviewComment],
    *,
    batch: str,
    quiet_s: float,
) -> int:
    """Count the comments that may steer the agent, keep them, and queue the fix-step job."""
    state = await load_run(ctx.services["db"], run.id)
    own_ids = {c.comment_id for c in comments if await _is_us(forge, c)}
    selection = select_comments(
        [c for c in comments if c.comment_id not in own_ids],
        writers=await _writers(ctx, project, forge, (c.author for c in comments)),
        resolved_threads=resolved_threads(state),
        handled=await taken_ids(ctx.services["redis"], run.id),
    )
    for cid, why in selection.dropped:
        ctx.note(review_comment=cid, ignored=why)
    if not selection.kept:
        ctx.note(review="nothing that counts")
        return 0
    redis = ctx.services["redis"]
    await buffer_comments(redis, run.id, list(selection.kept))
    await enqueue_flush(redis, run.id, batch, quiet_s)
    ctx.note(review=f"{len(selection.kept)} comment(s) for {run.protocol_name}", batch=batch)
    return len(selection.kept)


async def _is_us(forge: Forge, comment: ReviewComment) -> bool:
    # a GitLab token of an ordinary account is us too, though its notes do not say "bot"
    if comment.author_is_bot:
        return False
    try:
        return await forge.is_self(author=comment.author)
    except DeksdenFlowError:
        return False


async def _approve(
    ctx: HandlerContext, project: Project, run: ProtocolRun, forge: Forge, review: ReviewSubmitted
) -> None:
    """An approving review by someone who may `/approve` approves the plan."""
    overrides = (project.config or {}).get("permissions")
    repo = ctx.services["forges"].repo_ref(project)
    may = permission_allows(
        await forge.get_permission(repo, review.author), required_permission("approve", overrides)
    )
    if review.author_is_bot or not may:
        ctx.note(review="approval by someone who may not approve", author=review.author)
        return
    if run.approved:
        ctx.note(review="plan already approved")
        return
    try:
        result = await actions.approve(ctx.services, run.id)
    except TransitionConflict as exc:
        ctx.note(review=f"approval not applied: {exc}")
        return
    await publish_status(ctx.services, run.id, f"plan approved by @{review.author}'s review")
    ctx.note(review=result, author=review.author)


# -- GitHub ------------------------------------------------------------------------------------


@router.register("github", "pull_request_review", "submitted")
async def github_review_submitted(ctx: HandlerContext) -> None:
    review = github_review(ctx.delivery.payload)
    found = (
        await _protocol(ctx, github_repo(ctx.delivery.payload), review.number) if review else None
    )
    if review is None or found is None:
        return
    project, run = found
    forge: Forge = ctx.services["forges"].forge_for(project)
    if review.state == "approved":
        await _approve(ctx, project, run, forge, review)
        return
    if review.state != "changes_requested":
        ctx.note(review=f"{review.state}: its line comments count one by one")
        return
    repo = ctx.services["forges"].repo_ref(project)
    raw = await forge.review_comments(repo, review.number, review.review_id)
    comments = [c for c in (github_review_comment(item) for item in raw) if c is not None]
    body = review_body_comment(review)
    await take_feedback(
        ctx,
        project,
        run,
        forge,
        ([body] if body else []) + comments,
        batch=f"gh-review-{review.review_id}",
        quiet_s=0,
    )


@router.register("github", "pull_request_review_comment", "created")
async def github_line_comment(ctx: HandlerContext) -> None:
    """A line comment: the comments of a review that requests changes are taken by that review
    (whichever delivery comes first); a lone one after the quiet window."""
    event = github_review_comment_event(ctx.delivery.payload)
    found = await _protocol(ctx, github_repo(ctx.delivery.payload), event[0]) if event else None
    if event is None or found is None:
        return
    project, run = found
    forge: Forge = ctx.services["forges"].forge_for(project)
    comment = event[1]
    if comment.review_id is not None and await _review_requests_changes(
        ctx, project, forge, event[0], comment.review_id
    ):
        # its review's own delivery takes every comment of it at once, as one batch
        ctx.note(review="taken with its review", review_id=comment.review_id)
        return
    quiet: float = ctx.services["settings"].review_quiet_s
    await take_feedback(
        ctx, project, run, forge, [comment], batch=f"gh-comment-{comment.comment_id}", quiet_s=quiet
    )


async def _review_requests_changes(
    ctx: HandlerContext, project: Project, forge: Forge, number: int, review_id: int
) -> bool:
    try:
        found = await forge.review_state(
            ctx.services["forges"].repo_ref(project), number, review_id
        )
    except DeksdenFlowError as exc:  # unknown: count the comment on its own (the batch dedupes)
        log.warning("review %s state unknown: %s", review_id, exc)
        return False
    return found == "changes_requested"


@router.register("github", "issue_comment", "created")
async def github_pr_mention(ctx: HandlerContext) -> None:
    """A comment on the PR that talks to the bot (and holds no command) is review feedback."""
    event = github_pr_comment(ctx.delivery.payload)
    if event is None or "@" not in event[1].body:
        return
    found = await _protocol(ctx, github_repo(ctx.delivery.payload), event[0])
    if found is None:
        return
    await _mention_feedback(ctx, *found, event[1], note_type="")


# -- GitLab ------------------------------------------------------------------------------------


@router.register("gitlab", "note hook")
async def gitlab_review_note(ctx: HandlerContext) -> None:
    event = gitlab_mr_note(ctx.delivery.payload)
    if event is None:
        return
    note_type = gitlab_note_type(ctx.delivery.payload)
    if (
        not event[1].path
        and note_type not in ("DiffNote", "DiscussionNote")
        and "@" not in event[1].body
    ):
        return  # a plain MR comment that names nobody: people talking to each other
    found = await _protocol(ctx, gitlab_repo(ctx.delivery.payload), event[0])
    if found is None:
        return
    await _mention_feedback(ctx, *found, event[1], note_type=note_type)


@router.register("gitlab", "merge request hook", "approved", "approval")
async def gitlab_mr_approved(ctx: HandlerContext) -> None:
    review = gitlab_approval(ctx.delivery.payload)
    found = (
        await _protocol(ctx, gitlab_repo(ctx.delivery.payload), review.number) if review else None
    )
    if review is None or found is None:
        return
    project, run = found
    await _approve(ctx, project, run, ctx.services["forges"].forge_for(project), review)


async def _mention_feedback(
    ctx: HandlerContext,
    project: Project,
    run: ProtocolRun,
    comment: ReviewComment,
    *,
    note_type: str,
) -> None:
    forge: Forge = ctx.services["forges"].forge_for(project)
    handles = await handles_for(ctx, project, forge)
    prefix: str = ctx.services["settings"].command_prefix
    if parse_commands(mentions_to_commands(comment.body, handles, prefix), prefix=prefix, limit=1):
        ctx.note(review="a command, not feedback")  # the command flow answers it
        return
    if not is_feedback(comment, note_type=note_type, mentioned=mentions_bot(comment.body, handles)):
        ctx.note(review="not addressed to the bot")
        return
    quiet: float = ctx.services["settings"].review_quiet_s
    await take_feedback(
        ctx, project, run, forge, [comment], batch=f"note-{comment.comment_id}", quiet_s=quiet
    )
