"""When the last step has passed every gate: the draft PR/MR is marked ready for review.

GitHub cannot un-draft over REST (GraphQL's `markPullRequestReadyForReview` does it); GitLab
reads an MR as draft from its title's `Draft:` prefix. The status comment then says what a
human does next. Best effort: the work is done either way, a failure is recorded and shown.
"""

from __future__ import annotations

import logging
from typing import Any

from bot.domain.states import ProtocolStatus
from bot.forge.base import PullKind, PullRef
from bot.jobs.feedback import forge_of, publish_state
from bot.storage.runs import RunState, emit, update_run

log = logging.getLogger(__name__)


def next_step_message(kind: PullKind, marked: bool) -> str:
    """What a human does once the protocol is done (pure)."""
    what = "merge request" if kind == "merge_request" else "pull request"
    if not marked:
        return (
            f"Every step passed its gates, but the {what} could not be marked ready for review: "
            f"take it out of draft by hand, review it and merge it."
        )
    review = (
        "comment on a line or start a thread"
        if kind == "merge_request"
        else "request changes in a review"
    )
    return (
        f"Every step passed its gates and the {what} is marked ready for review. Next: review it "
        f"and merge it — or {review}, and the comments become one fix step."
    )


async def announce_ready(ctx: dict[str, Any], state: RunState) -> None:
    """Un-draft the PR/MR of a completed protocol (once) and say so on the status comment."""
    run = state.run
    if (
        run.status != ProtocolStatus.COMPLETED
        or not run.pr_number
        or state.project.provider not in ("github", "gitlab")
    ):
        await publish_state(ctx, state)
        return
    forge = forge_of(ctx, state)
    repo = ctx["forges"].repo_ref(state.project)
    marked = False
    try:
        marked = await forge.mark_ready(
            PullRef(repo, run.pr_number, run.pr_url or "", head=run.protocol_name)
        )
    except Exception as exc:  # best effort: the protocol is complete either way
        log.warning("marking %s ready failed: %s", run.protocol_name, exc)
        await emit(ctx["db"], state, "feedback.failed", f"ready for review: {type(exc).__name__}")
    message = next_step_message(forge.pull_kind, marked)
    run.runtime_state = {
        **(run.runtime_state or {}),
        "message": message,
        "ready_for_review": marked,
    }
    await update_run(ctx["db"], run.id, runtime_state=run.runtime_state)
    if marked:
        await emit(ctx["db"], state, "protocol.ready", "marked ready for review")
    await publish_state(ctx, state, message)
