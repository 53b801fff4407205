"""Comment and label deliveries on GitHub and GitLab → the shared command flow."""

from __future__ import annotations

from bot.handlers.commands_flow import handle_comment, handle_label
from bot.handlers.forge_events import github_comment, github_label, gitlab_labels, gitlab_note
from bot.handlers.router import HandlerContext, Router

router = Router()


@router.register("github", "issue_comment", "created")
async def github_issue_comment(ctx: HandlerContext) -> None:
    event = github_comment(ctx.delivery.payload)
    if event is None:
        ctx.note(ignored="unusable issue_comment payload")
        return
    await handle_comment(ctx, event)


@router.register("github", "issues", "labeled")
async def github_issue_labeled(ctx: HandlerContext) -> None:
    event = github_label(ctx.delivery.payload)
    if event is not None:
        await handle_label(ctx, event)


@router.register("gitlab", "note hook")
@router.register("gitlab", "confidential note hook")  # same payload, on a confidential issue
async def gitlab_note_hook(ctx: HandlerContext) -> None:
    event = gitlab_note(ctx.delivery.payload)
    if event is None:
        ctx.note(ignored="note not on an issue or merge request")
        return
    await handle_comment(ctx, event)


@router.register("gitlab", "issue hook")
@router.register("gitlab", "confidential issue hook")
async def gitlab_issue_hook(ctx: HandlerContext) -> None:
    event = gitlab_labels(ctx.delivery.payload)
    if event is not None:
        await handle_label(ctx, event)
