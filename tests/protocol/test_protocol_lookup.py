"""A comment finds its own protocol: by issue number on an issue, by PR/MR number on a PR/MR
(on GitLab issue #3 and MR !3 are different objects)."""

from __future__ import annotations

from bot.domain.states import ProtocolStatus
from bot.handlers.commands_flow import handle_comment, latest_run
from bot.handlers.forge_events import CommentEvent, RepoInfo
from bot.handlers.router import HandlerContext
from bot.handlers.sansio import IncomingDelivery
from bot.storage.runs import create_run, load_run, update_run
from tests.protocol.conftest import Harness


async def two_runs(h: Harness) -> tuple[int, int]:
    """A: planned from issue #2, its MR is !1. B: from issue #1, its MR is !2."""
    ids = []
    for name, issue, pr in (("0001-a", 2, 1), ("0002-b", 1, 2)):
        run = await create_run(
            h.ctx["db"],
            project=h.project,
            protocol_name=name,
            description=name,
            base_branch="main",
            issue_number=issue,
        )
        await update_run(h.ctx["db"], run.id, pr_number=pr, status=ProtocolStatus.PLANNED)
        ids.append(run.id)
    return ids[0], ids[1]


def hctx(h: Harness) -> HandlerContext:
    delivery = IncomingDelivery("local", "local-1", "comment", None, "{}")
    return HandlerContext(delivery_id=0, delivery=delivery, services=h.ctx)


async def test_issue_and_merge_request_numbers_are_looked_up_apart(harness: Harness) -> None:
    a, b = await two_runs(harness)
    ctx = hctx(harness)
    found = {
        (kind, n): (await latest_run(ctx, harness.project, n, kind)).id  # type: ignore[union-attr]
        for kind in ("issue", "merge_request", "pull")
        for n in (1, 2)
    }
    assert found == {
        ("issue", 1): b,
        ("issue", 2): a,
        ("merge_request", 1): a,
        ("merge_request", 2): b,
        ("pull", 1): a,
        ("pull", 2): b,
    }
    assert await latest_run(ctx, harness.project, 3, "issue") is None


async def test_cancel_on_an_issue_cancels_that_issues_protocol_only(harness: Harness) -> None:
    a, b = await two_runs(harness)
    repo = RepoInfo("local", harness.project.name, str(harness.origin), "main")
    event = CommentEvent(
        repo=repo,
        issue_number=2,
        is_pull=False,
        comment_id=9001,
        body="/cancel",
        author="alice",
        author_is_bot=False,
        issue_title="A",
        issue_body="",
    )
    await handle_comment(hctx(harness), event)
    assert (await load_run(harness.ctx["db"], a)).run.status == ProtocolStatus.CANCELLED
    assert (await load_run(harness.ctx["db"], b)).run.status == ProtocolStatus.PLANNED
