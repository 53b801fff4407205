"""Commands answer only those who may act: permission first, one reply per comment, a cap on
commands, a reply budget per user, nothing hidden from the reader runs (issue 20, points 8-9)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bot.domain.commands import Command
from tests.github_e2e.conftest import GitHubLoop
from tests.github_e2e.fake_github import FULL_NAME

R = f"/repos/{FULL_NAME}"


def pairs(calls: list[Any]) -> list[tuple[str, str]]:
    return [(c.method, c.path) for c in calls]


async def _run_count(gh: GitHubLoop) -> int:
    from sqlalchemy import func, select

    from bot.storage.models import ProtocolRun

    async with gh.db.sessions() as session:
        return int((await session.execute(select(func.count(ProtocolRun.id)))).scalar() or 0)


def test_unknown_command_from_read_only_user_gets_no_reply(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.fake.permissions["bob"] = "read"
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/paln", user="bob"))
    assert out["outcome"]["handled"][-1] == {"command": "paln", "result": "unknown-unanswered"}
    assert pairs(gh.fake.since(mark)) == [("GET", f"{R}/collaborators/bob/permission")]


def test_unknown_command_far_from_ours_gets_no_reply(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/assign @me"))
    assert out["outcome"]["handled"][-1]["result"] == "unknown-unanswered"
    assert [c.method for c in gh.fake.since(mark)] == ["GET"]


@pytest.mark.parametrize(
    ("user", "permission", "replies"), [("mallory", "none", 0), ("alice", "write", 1)]
)
def test_ten_thousand_commands_run_nothing_and_reply_at_most_once(
    gh: GitHubLoop, user: str, permission: str, replies: int
) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.fake.permissions[user] = permission
    mark = gh.fake.mark()
    body = "\n".join("/plan" if i % 2 else "/bogus" for i in range(10_000))
    out = gh.deliver("issue_comment", gh.comment(body, user=user))
    assert out["outcome"]["handled"][-1] == {
        "result": "too-many-commands",
        "permission": permission,
    }
    posts = [c for c in gh.fake.since(mark) if c.method == "POST"]
    assert len(posts) == replies
    if posts:
        assert "more than 5 commands" in posts[0].body["body"]
    assert gh.call(_run_count, gh) == 0


@pytest.mark.parametrize(
    "body",
    [
        "looks harmless\n\n    /plan",
        "looks harmless\n\n\t/plan",
        "looks harmless\n<!--\n/plan\n-->",
        "> /plan",
        "```\n/plan\n```",
    ],
)
def test_commands_the_reader_cannot_see_do_not_run(gh: GitHubLoop, body: str) -> None:
    gh.deliver("installation", gh.installation_created())
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment(body))
    assert out["outcome"]["handled"][-1] == {"ignored": "no command"}
    assert gh.fake.since(mark) == []
    assert gh.call(_run_count, gh) == 0


def test_several_commands_get_one_reply(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/help\n/stauts\n/qa zero\n/status"))
    assert [h.get("result") for h in out["outcome"]["handled"][1:]] == [
        "help",
        "unknown",
        "malformed",
        "no-protocol",
    ]
    posts = [c for c in gh.fake.since(mark) if c.method == "POST" and c.path.endswith("/comments")]
    assert len(posts) == 1
    text = posts[0].body["body"]
    assert "DeksdenFlow commands" in text and "`/stauts`" in text and "There is no protocol" in text


def test_replies_are_rate_limited_per_user_and_repository(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    mark = gh.fake.mark()
    for _ in range(12):
        gh.deliver("issue_comment", gh.comment("/help"))
    posts = [c for c in gh.fake.since(mark) if c.method == "POST" and c.path.endswith("/comments")]
    assert len(posts) == 10  # the default budget: 10 replies per user and repository in 10 minutes
    gh.deliver("issue_comment", gh.comment("/help", user="carol"))
    posts = [c for c in gh.fake.since(mark) if c.method == "POST" and c.path.endswith("/comments")]
    assert len(posts) == 11  # another user has a budget of their own


def test_gitlab_quick_actions_are_never_answered() -> None:
    from bot.domain.commands import GITLAB_QUICK_ACTIONS, parse_commands
    from bot.handlers.commands_flow import _answer_error

    (err,) = parse_commands("/unapprove")  # within edit distance 2 of /approve
    assert not isinstance(err, Command)
    assert _answer_error(err, "write", True, frozenset(), None)
    assert not _answer_error(err, "write", True, GITLAB_QUICK_ACTIONS, None)
    assert not _answer_error(err, "read", False, frozenset(), None)


def test_replayed_signed_plan_under_a_new_delivery_id_is_a_duplicate(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    payload = gh.comment("/plan", comment_id=7777)
    first = gh.post("issue_comment", payload)
    gh.wait_idle(first["id"])
    assert gh.call(_run_count, gh) == 1
    replay = gh.post("issue_comment", payload)  # the same signed body, a fresh X-GitHub-Delivery
    assert (replay["status"], replay["id"]) == ("duplicate", first["id"])
    gh.wait_idle()
    assert gh.call(_run_count, gh) == 1


def test_the_command_prefix_is_configurable(loop_factory: Callable[..., GitHubLoop]) -> None:
    # not the default "/": the point is that another prefix is honoured
    gh = loop_factory(command_prefix="!df ")
    gh.deliver("installation", gh.installation_created())
    out = gh.deliver("issue_comment", gh.comment("/help"))
    assert out["outcome"]["handled"][-1] == {"ignored": "no command"}
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("!df help"))
    assert out["outcome"]["handled"][-1] == {"command": "help", "result": "help"}
    posts = [c for c in gh.fake.since(mark) if c.method == "POST" and c.path.endswith("/comments")]
    assert len(posts) == 1 and "`!df plan [free text]`" in posts[0].body["body"]
