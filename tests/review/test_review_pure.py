"""Review batching, mention parsing and the fix step's text, on recorded payload shapes (pure)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bot.domain.commands import help_text
from bot.domain.mentions import bot_handles, mentions_bot, mentions_to_commands
from bot.domain.review import (
    ReviewComment,
    fix_step_markdown,
    github_pr_comment,
    github_review,
    github_review_comment,
    github_review_comment_event,
    gitlab_approval,
    gitlab_mr_note,
    gitlab_note_type,
    hunk_for_line,
    is_feedback,
    reply_body,
    review_body_comment,
    select_comments,
    threads_to_answer,
    unthreaded_reply,
)
from bot.jobs.ready import next_step_message

SAMPLES = Path(__file__).with_name("samples")


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / name).read_text())
    return data


def diff_note(**attrs: Any) -> dict[str, Any]:
    """GitLab's MR note sample as a DiffNote: the fields a line comment adds."""
    payload = load("gitlab_note_hook_mr.json")
    payload["object_attributes"].update(
        type="DiffNote",
        discussion_id="6a9c1750b37d513a43987b574953fceb50b03ce7",
        position={
            "base_sha": "b" * 40, "start_sha": "s" * 40, "head_sha": "h" * 40,
            "old_path": "app/greet.py", "new_path": "app/greet.py", "position_type": "text",
            "old_line": None, "new_line": 12, "line_range": None,
        },
        **attrs,
    )  # fmt: skip
    return payload


# -- payload shapes -----------------------------------------------------------------------------


def test_github_review_submitted_sample() -> None:
    payload = load("github_pull_request_review_submitted.json")
    review = github_review(payload)
    assert review is not None
    assert (review.number, review.review_id, review.state, review.author) == (
        2,
        237895671,
        "commented",
        "Codertocat",
    )
    assert review_body_comment(review) is None  # body null: nothing of its own to say
    changes = copy.deepcopy(payload)
    changes["review"].update(state="CHANGES_REQUESTED", body="Please rename it.")
    found = github_review(changes)
    assert found is not None and found.state == "changes_requested"
    body = review_body_comment(found)
    assert body is not None and body.kind == "review" and body.thread_id == ""
    assert github_review({**payload, "action": "dismissed"}) is None
    assert github_review({"action": "submitted", "review": "x"}) is None


def test_github_review_comment_sample() -> None:
    event = github_review_comment_event(load("github_pull_request_review_comment_created.json"))
    assert event is not None
    number, c = event
    assert number == 2
    assert (c.comment_id, c.thread_id, c.path, c.line) == (284312630, "284312630", "README.md", 265)
    assert c.diff_hunk == "@@ -1 +1 @@\n-# Hello-World" and c.review_id == 237895671
    assert c.body == "Maybe you should use more emojji on this line." and not c.author_is_bot
    # a reply in a thread answers to the thread's first comment
    reply = github_review_comment(
        {"id": 9, "in_reply_to_id": 284312630, "body": "x", "user": {"login": "a"}}
    )
    assert reply is not None and reply.thread_id == "284312630"
    # the bot's own reply is recognised by its login or type
    own = github_review_comment(
        {"id": 10, "body": "x", "user": {"login": "deksdenflow[bot]", "type": "Bot"}}
    )
    assert own is not None and own.author_is_bot
    assert github_review_comment_event({"action": "edited", "comment": {}}) is None


def test_github_pr_comment_only_on_pulls() -> None:
    payload = {
        "action": "created",
        "issue": {"number": 5, "pull_request": {"url": "u"}},
        "comment": {
            "id": 3,
            "body": "@deksdenflow rename it",
            "user": {"login": "alice", "type": "User"},
        },
    }
    found = github_pr_comment(payload)
    assert found is not None and found[0] == 5 and found[1].kind == "comment"
    assert github_pr_comment({**payload, "issue": {"number": 5}}) is None


def test_gitlab_notes_samples() -> None:
    plain = load("gitlab_note_hook_mr.json")
    found = gitlab_mr_note(plain)
    assert found is not None
    iid, c = found
    assert (iid, c.comment_id, c.author, c.kind, c.path) == (1, 1244, "root", "comment", "")
    assert gitlab_note_type(plain) == ""
    line = gitlab_mr_note(diff_note())
    assert line is not None
    c = line[1]
    assert (c.path, c.line, c.kind, c.thread_id) == (
        "app/greet.py",
        12,
        "line",
        "6a9c1750b37d513a43987b574953fceb50b03ce7",
    )
    # old-side line when the new side has none; a resolved thread says so
    old = gitlab_mr_note(diff_note(resolved_at="2026-01-01 10:00:00 UTC"))
    assert old is not None and old[1].resolved
    # system notes, edits and issue notes are no review feedback
    assert gitlab_mr_note(diff_note(system=True)) is None
    assert gitlab_mr_note(diff_note(action="update")) is None
    assert (
        gitlab_mr_note(
            {**plain, "object_attributes": {**plain["object_attributes"], "noteable_type": "Issue"}}
        )
        is None
    )


def test_gitlab_approval_sample() -> None:
    payload = load("gitlab_merge_request_hook.json")
    assert gitlab_approval(payload) is None  # action open
    payload["object_attributes"]["action"] = "approved"
    review = gitlab_approval(payload)
    assert review is not None and (review.number, review.state, review.author) == (
        1,
        "approved",
        "root",
    )
    payload["object_attributes"]["action"] = "approval"  # one approval of several required
    assert gitlab_approval(payload) is not None
    payload["object_attributes"]["action"] = "unapproved"
    assert gitlab_approval(payload) is None


# -- which comments count -----------------------------------------------------------------------


def rc(cid: int, author: str = "alice", **kw: Any) -> ReviewComment:
    return ReviewComment(comment_id=cid, author=author, body=kw.pop("body", f"comment {cid}"), **kw)


@pytest.mark.parametrize(
    ("comments", "writers", "resolved", "handled", "kept", "dropped"),
    [
        (
            [rc(1, path="a.py", line=3), rc(2, path="a.py", line=1)],
            {"alice": True},
            (),
            (),
            [2, 1],
            [],
        ),
        (
            [rc(1), rc(2, "eve")],
            {"alice": True, "eve": False},
            (),
            (),
            [1],
            [(2, "author lacks write access")],
        ),
        (
            [rc(1), rc(2, "mallory")],
            {"alice": True},
            (),
            (),
            [1],
            [(2, "author lacks write access")],
        ),
        ([rc(1, author_is_bot=True)], {"alice": True}, (), (), [], [(1, "written by a bot")]),
        (
            [rc(1, thread_id="t1"), rc(2, thread_id="t2")],
            {"alice": True},
            ("t1",),
            (),
            [2],
            [(1, "thread resolved")],
        ),
        ([rc(1, resolved=True)], {"alice": True}, (), (), [], [(1, "thread resolved")]),
        (
            [rc(1), rc(1), rc(2)],
            {"alice": True},
            (),
            (2,),
            [1],
            [(1, "already taken"), (2, "already taken")],
        ),
        ([rc(1, body="  ")], {"alice": True}, (), (), [], [(1, "empty")]),
        ([rc(1, "Alice")], {"alice": True}, (), (), [1], []),  # logins compare without case
        (
            [
                rc(5, path="b.py", line=1),
                rc(4, kind="review", review_id=9),
                rc(3, path="a.py", line=9),
            ],
            {"alice": True},
            (),
            (),
            [4, 3, 5],
            [],
        ),  # the review's own text first, then by file and line
    ],
)
def test_select_comments(
    comments: list[ReviewComment],
    writers: dict[str, bool],
    resolved: tuple[str, ...],
    handled: tuple[int, ...],
    kept: list[int],
    dropped: list[tuple[int, str]],
) -> None:
    selection = select_comments(
        comments, writers=writers, resolved_threads=resolved, handled=handled
    )
    assert [c.comment_id for c in selection.kept] == kept
    assert list(selection.dropped) == dropped


def test_is_feedback_table() -> None:
    assert is_feedback(rc(1, kind="line", path="a"))
    assert is_feedback(rc(1, kind="review"))
    assert is_feedback(rc(1, kind="comment"), note_type="DiscussionNote")
    assert not is_feedback(rc(1, kind="comment"))
    assert is_feedback(rc(1, kind="comment"), mentioned=True)


def test_threads_to_answer_once_each() -> None:
    comments = [
        rc(1, thread_id="10", kind="line"), rc(2, thread_id="10", kind="line"),
        rc(3, kind="review"), rc(4, thread_id="d-1", kind="comment"), rc(5, kind="comment"),
    ]  # fmt: skip
    assert threads_to_answer(comments) == [("10", 1), ("d-1", 4)]


# -- the fix step's text ------------------------------------------------------------------------


def test_fix_step_carries_file_line_hunk_and_text() -> None:
    comments = [
        rc(
            1,
            path="app/greet.py",
            line=12,
            diff_hunk="@@ -10,3 +10,4 @@\n+def greet():",
            body="Rename `greet`.",
        ),
        rc(2, path="README.md", line=3, body="```\nfenced\n```<!-- hidden -->"),
        rc(3, kind="review", body="Overall fine."),
    ]
    text = fix_step_markdown(comments, 3, "github")
    assert "`app/greet.py` line 12 (by @alice)" in text and "`README.md` line 3" in text
    assert "@@ -10,3 +10,4 @@\n+def greet():" in text and "Rename `greet`." in text
    assert "hidden" not in text  # what the reviewer could not see stays out of the prompt
    assert "````text\n```\nfenced\n```\n````" in text  # a fence longer than the comment's own
    assert "the review as a whole" in text and "pull request" in text
    assert "merge request" in fix_step_markdown(comments, 3, "gitlab")


def test_comment_text_is_capped() -> None:
    text = fix_step_markdown([rc(1, body="x" * 50_000)], 2)
    assert len(text) < 6000 and "truncated" in text


DIFF = "\n".join(
    [
        "diff --git a/app/greet.py b/app/greet.py",
        "--- a/app/greet.py",
        "+++ b/app/greet.py",
        "@@ -1,3 +1,4 @@",
        " import os",
        "+import sys",
        " ",
        " x = 1",
        "@@ -20,2 +21,3 @@ def f():",
        "     return 1",
        "+    # new",
        " y = 2",
    ]
)


@pytest.mark.parametrize(
    ("line", "head"),
    [
        (2, "@@ -1,3 +1,4 @@"),
        (22, "@@ -20,2 +21,3 @@ def f():"),
        (None, "@@ -1,3 +1,4 @@"),
        (99, "@@ -1,3 +1,4 @@"),
    ],
)
def test_hunk_for_line(line: int | None, head: str) -> None:
    assert hunk_for_line(DIFF, line).splitlines()[0] == head


def test_hunk_for_line_clips_long_hunks() -> None:
    body = "\n".join(f"+line {i}" for i in range(1, 201))
    hunk = hunk_for_line(f"@@ -0,0 +1,200 @@\n{body}\n", 150)
    lines = hunk.splitlines()
    assert lines[0] == "@@ -0,0 +1,200 @@" and len(lines) <= 30 and "+line 150" in lines
    assert hunk_for_line("", 3) == ""


def test_unthreaded_reply() -> None:
    assert unthreaded_reply([rc(1, thread_id="5", kind="line")], "abcdef0123456789", 2) is None
    text = unthreaded_reply(
        [rc(1, kind="review"), rc(2, "bob", kind="comment"), rc(3, thread_id="d", kind="comment")],
        "abcdef0123456789",
        2,
    )
    assert (
        text == "Addressed in `abcdef012345` (step 02, the fix for this review): "
        "the review of @alice, the comment of @bob."
    )


def test_reply_body_names_the_commit() -> None:
    assert (
        reply_body("0123456789abcdef", 3)
        == "Addressed in `0123456789ab` (step 03, the fix for this review)."
    )


# -- mentions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("@deksdenflow plan add a greeting", "/plan add a greeting"),
        ("@DeksdenFlow approve", "/approve"),
        ("@deksdenflow[bot] run-step 2", "/run-step 2"),
        ("@deksdenflow: status", "/status"),
        ("thanks!\n@deksdenflow approve", "thanks!\n/approve"),
        ("@deksdenflow please rename it", "@deksdenflow please rename it"),  # not a command
        ("@deksdenflowx plan", "@deksdenflowx plan"),  # someone else
        ("hey @deksdenflow plan", "hey @deksdenflow plan"),  # only at the start of a line
        ("```\n@deksdenflow plan\n```", "```\n/plan\n```"),  # still in the code block
    ],
)
def test_mentions_to_commands(body: str, expected: str) -> None:
    assert mentions_to_commands(body, bot_handles("deksdenflow"), "/") == expected


def test_mentions_in_code_are_no_commands() -> None:
    from bot.domain.commands import parse_commands

    body = mentions_to_commands("```\n@bot plan\n```", ("bot",))
    assert parse_commands(body) == []
    assert [c.name for c in parse_commands(mentions_to_commands("@bot plan x", ("bot",)))] == [
        "plan"
    ]


def test_handles_and_mentions() -> None:
    assert bot_handles("deksdenflow", "deksdenflow[bot]", None, "", "@Ops-Bot") == (
        "deksdenflow",
        "ops-bot",
    )
    assert bot_handles("bad name!") == ()
    assert mentions_bot("thanks @deksdenflow, please fix", ("deksdenflow",))
    assert not mentions_bot("mail me at a@deksdenflow.com", ("deksdenflow",))
    assert not mentions_bot("@deksdenflowish", ("deksdenflow",))
    assert not mentions_bot("@bot", ())


def test_gitlab_help_says_approve_is_gitlabs_own() -> None:
    gitlab = help_text(forge="gitlab", bot="df-bot")
    assert "GitLab's own quick actions" in gitlab and "`@df-bot approve`" in gitlab
    assert "`/approve`, `/assign`, `/label`, `/close`, `/merge`" in gitlab
    assert "quick action" not in help_text(bot="deksdenflow")
    assert "`@deksdenflow plan …` is `/plan …`" in help_text(bot="deksdenflow")


def test_next_step_message() -> None:
    assert "marked ready for review" in next_step_message("pull", True)
    assert "request changes in a review" in next_step_message("pull", True)
    assert "merge request" in next_step_message(
        "merge_request", True
    ) and "thread" in next_step_message("merge_request", True)
    assert "could not be marked ready" in next_step_message("merge_request", False)


# -- thread resolution, the review feedback item, the CI hook's branch match --------------------


@pytest.mark.parametrize(
    ("ids", "threads"),
    [
        ({1843219001}, ["PRRT_kwDOKc3Zbc5bHbA1"]),  # the thread's first comment
        ({1843219877}, ["PRRT_kwDOKc3Zbc5bHbA1"]),  # a reply in it
        ({1843219002}, []),  # already resolved: left alone
        ({1843219001, 1843219003, 7}, ["PRRT_kwDOKc3Zbc5bHbA1", "PRRT_kwDOKc3Zbc5bHbA3"]),
        (set(), []),
    ],
)
def test_threads_holding(ids: set[int], threads: list[str]) -> None:
    from bot.forge.github import threads_holding

    assert threads_holding(load("github_graphql_review_threads.json"), ids) == threads


def test_threads_holding_skips_malformed_answers() -> None:
    from bot.forge.github import threads_holding

    for answer in (
        None,
        {},
        {"data": None},
        {"data": {"repository": {"pullRequest": None}}},
        [1, 2],
    ):
        assert threads_holding(answer, {1}) == []
    broken = {"data": {"repository": {"pullRequest": {"reviewThreads": {"nodes": [
        {"id": 5, "isResolved": False, "comments": {"nodes": [{"databaseId": 1}]}},
        {"id": "PRRT_x", "isResolved": None, "comments": {"nodes": [{"databaseId": 1}]}},
        {"id": "PRRT_y", "isResolved": False, "comments": "nope"},
        "not a node",
    ]}}}}}  # fmt: skip
    assert threads_holding(broken, {1}) == []


def test_review_threads_query_and_resolve_mutation() -> None:
    from bot.forge.base import RepoRef
    from bot.forge.github import build_resolve_thread_mutation, build_review_threads_query

    query = build_review_threads_query(RepoRef("github", "octo/hello"), 7)
    assert query["variables"] == {"owner": "octo", "name": "hello", "number": 7}
    assert "reviewThreads(first: 100)" in query["query"] and "databaseId" in query["query"]
    mutation = build_resolve_thread_mutation("PRRT_1")
    assert "resolveReviewThread" in mutation["query"] and mutation["variables"] == {"id": "PRRT_1"}


def test_review_feedback_item_is_kept_across_failures_and_replaced_by_a_newer_review() -> None:
    from bot.domain.fix_feedback import (
        FeedbackItem,
        add_item,
        guidance_item,
        qa_item,
        render_feedback,
    )
    from bot.domain.review import review_feedback

    comments = [
        ReviewComment(
            1,
            "alice",
            "Rename `x`",
            thread_id="1",
            path="a.py",
            line=3,
            diff_hunk="@@ -1 +1,3 @@\n+x = 1",
        ),
        ReviewComment(2, "bob", "Add a test", kind="review"),
    ]
    item = review_feedback(comments)
    assert (item.kind, item.title, item.meta) == (
        "review",
        "2 comments from @alice, @bob",
        {"comments": [1, 2]},
    )
    stored = add_item(None, item)
    stored = add_item(stored, qa_item("VERDICT: FAIL", 1))
    stored = add_item(stored, guidance_item("carol", "keep it short"))
    stored = add_item(stored, qa_item("VERDICT: FAIL again", 2))
    assert [i["kind"] for i in stored] == ["review", "guidance", "qa_report"]
    text = render_feedback(stored)
    assert "### Review comments this step addresses: 2 comments from @alice, @bob" in text
    assert "`a.py` line 3" in text and "Rename `x`" in text and "Add a test" in text
    newer = add_item(stored, FeedbackItem("review", "1 comment from @dan", "Other"))
    assert [i["title"] for i in newer if i["kind"] == "review"] == ["1 comment from @dan"]


@pytest.mark.parametrize(
    ("name", "runtime", "branch", "expected"),
    [
        ("0001-task", {}, "0001-task", True),
        ("0001-task", {}, "0001-task--02", True),  # a graph step's child branch
        ("0001-task", {}, "0001-tasks", False),
        ("0001-task", {}, "0002-task--02", False),
        ("0001-task", {"branch": "feature-x"}, "feature-x", True),  # planned on a PR
        ("0001-task", {"branch": "feature-x"}, "0001-task", False),  # not a branch it commits to
        ("0001-task", {"branch": "feature-x"}, "feature-x--01", False),
        ("0001-task", {"branch": ""}, "0001-task", True),
    ],
)
def test_ci_report_branch_matches_the_run(
    name: str, runtime: dict[str, Any], branch: str, expected: bool
) -> None:
    from bot.handlers.ci_report import reports_to
    from bot.storage.models import ProtocolRun

    run = ProtocolRun(protocol_name=name, runtime_state=runtime)
    assert reports_to(run, branch) is expected


def test_threads_with_text_finds_an_unrecorded_reply() -> None:
    from bot.forge.github import threads_with_text

    reply = "Addressed in `abc` (step 03, the fix for this review)."
    threads = [
        {"id": "T1", "isResolved": False, "comments": {"nodes": [
            {"databaseId": 11, "body": "fix"}, {"databaseId": 12, "body": reply}]}},
        {"id": "T2", "isResolved": False,
         "comments": {"nodes": [{"databaseId": 21, "body": reply}]}},  # the comment itself
        {"id": "T3", "isResolved": False, "comments": {"nodes": [
            {"databaseId": 31, "body": "x"}, {"databaseId": 32, "body": "other"}]}},
        {"id": "T4", "comments": {"nodes": [{"databaseId": "41", "body": "x"}, {"body": reply}]}},
    ]  # fmt: skip
    answer = {"data": {"repository": {"pullRequest": {"reviewThreads": {"nodes": threads}}}}}
    assert threads_with_text(answer, reply) == {11}
    assert threads_with_text(None, reply) == set()
