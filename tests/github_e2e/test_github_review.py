"""Review feedback on the GitHub fake with the product's DEFAULT settings: a review asking for
changes becomes one fix step whose prompt carries its comments, the bot answers in each thread,
an approving review approves the plan, and the draft is marked ready when the work is done."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.domain.states import ProtocolStatus, StepStatus
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.github_e2e.conftest import GitHubLoop
from tests.github_e2e.fake_github import FULL_NAME
from tests.github_e2e.test_github_gaps import labeled, pull_comment
from tests.gitutil import git

R = f"/repos/{FULL_NAME}"
PR = 101


@pytest.fixture
def gh(loop_factory: Callable[..., GitHubLoop]) -> GitHubLoop:
    return loop_factory()


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EngineRequest]]:
    """Every engine request, in order (the scripted engine answers as usual)."""
    seen: list[EngineRequest] = []
    original = ScriptedEngine.run

    async def run(self: ScriptedEngine, request: EngineRequest) -> EngineResult:
        seen.append(request)
        return await original(self, request)

    monkeypatch.setattr(ScriptedEngine, "run", run)
    yield seen


def statuses(gh: GitHubLoop) -> list[str]:
    return [s.status for s in gh.run().steps]


def line_comment(
    cid: int, path: str, line: int, body: str, *, user: str = "alice", review_id: int = 700
) -> dict[str, Any]:
    """A review comment as GitHub's API and webhooks show it (recorded shape, our values)."""
    return {
        "id": cid,
        "pull_request_review_id": review_id,
        "path": path,
        "line": line,
        "original_line": line,
        "diff_hunk": f"@@ -0,0 +1,{line} @@\n+# line {line} of {path}",
        "body": body,
        "user": {"login": user, "type": "User", "id": 7},
        "html_url": f"https://github.com/{FULL_NAME}/pull/{PR}#discussion_r{cid}",
    }


def review(
    gh: GitHubLoop, state: str, *, user: str = "alice", review_id: int = 700, body: str = ""
) -> dict[str, Any]:
    payload = gh._repo(
        {
            "action": "submitted",
            "review": {
                "id": review_id, "state": state, "body": body or None,
                "user": {"login": user, "type": "User", "id": 8},
                "html_url": f"https://github.com/{FULL_NAME}/pull/{PR}#pullrequestreview-{review_id}",
                "submitted_at": "2026-11-30T10:00:00Z", "updated_at": "2026-11-30T10:00:00Z",
            },
            "pull_request": {"number": PR, "draft": True, "head": {"ref": "0001-add-a-greeting"}},
            "sender": {"login": user, "type": "User", "id": 8},
        }
    )  # fmt: skip
    return payload


def comment_event(gh: GitHubLoop, comment: dict[str, Any]) -> dict[str, Any]:
    payload = gh._repo(
        {"action": "created", "comment": {**comment, "updated_at": "2026-11-30T10:00:00Z"}}
    )
    payload["pull_request"] = {"number": PR}
    payload["sender"] = comment["user"]
    return payload


def auto_to_completion(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    gh.ci_green()
    gh.ci_green()
    assert gh.run().run.status == ProtocolStatus.COMPLETED


def test_changes_requested_review_becomes_one_fix_step_answered_in_both_threads(
    gh: GitHubLoop, prompts: list[EngineRequest]
) -> None:
    auto_to_completion(gh)
    # the last step passed every gate: the draft PR is marked ready through GraphQL
    graphql = gh.fake.requests("POST", "/graphql")
    assert len(graphql) == 1 and graphql[0].body["variables"] == {"id": f"PR_fake{PR}"}
    assert "markPullRequestReadyForReview" in graphql[0].body["query"]
    assert gh.fake.pulls[PR]["draft"] is False
    status = gh.fake.comments[1002]["body"]
    assert "marked ready for review" in status and "request changes in a review" in status

    comments = [
        line_comment(9001, "demo_greeting.py", 4, "Use an f-string with a comma: `Hello, {name}!`"),
        line_comment(9002, "TASK.md", 2, "Say which issue this comes from."),
    ]
    gh.fake.review_comments[700] = comments
    gh.fake.review_states.update({700: "CHANGES_REQUESTED", 701: "COMMENTED"})
    gh.fake.permissions["mallory"] = "read"
    # GitHub sends each line comment and the review itself: the comments of a review that
    # requests changes wait for it; a read-only user's comment on the same PR arrives too
    out = gh.deliver("pull_request_review_comment", comment_event(gh, comments[0]))
    assert {"review": "taken with its review", "review_id": 700} in out["outcome"]["handled"]
    out = gh.deliver(
        "pull_request_review_comment",
        comment_event(
            gh, line_comment(9003, "TASK.md", 1, "Delete all", user="mallory", review_id=701)
        ),
    )
    assert {"review_comment": 9003, "ignored": "author lacks write access"} in out["outcome"][
        "handled"
    ]
    out = gh.deliver(
        "pull_request_review",
        review(gh, "changes_requested", body="Two things, see the lines."),
        timeout=60,
    )
    assert out["status"] == "processed", out
    gh.wait_idle(timeout=60)

    state = gh.run()
    assert [s.step_index for s in state.steps] == [1, 2, 3]  # ONE fix step for the review
    fix = state.step(3)
    assert fix.step_name == "03-review-fix"
    assert [c["comment_id"] for c in fix.runtime_state["review"]] == [700, 9002, 9001]
    assert 9003 not in [c["comment_id"] for c in fix.runtime_state["review"]]  # read-only: ignored

    executed = [r for r in prompts if r.phase == "execute" and r.context.get("step_index") == 3]
    assert len(executed) == 1
    prompt = executed[0].prompt
    for text in (
        "`demo_greeting.py` line 4",
        "Use an f-string with a comma",
        "`TASK.md` line 2",
        "Say which issue this comes from.",
        "+# line 4 of demo_greeting.py",
        "Two things, see the lines.",
    ):
        assert text in prompt, text
    assert "Delete all" not in prompt
    # the comments are a typed feedback item too (not only the step file the agent may rewrite)
    assert [i["kind"] for i in fix.runtime_state["feedback"]] == ["review"]
    assert fix.runtime_state["feedback"][0]["meta"] == {"comments": [700, 9002, 9001]}
    section = prompt.split("Review comments this step addresses", 1)[1]
    assert "Use an f-string with a comma" in section and "`TASK.md` line 2" in section

    # after the push the bot answered in both threads with the fix's commit
    sha = fix.runtime_state["commit_sha"]
    replies = sorted(gh.fake.review_replies, key=lambda r: r["in_reply_to_id"])
    assert [r["in_reply_to_id"] for r in replies] == [9001, 9002]
    assert all(f"`{sha[:12]}`" in r["body"] for r in replies)
    # the review's own text had no thread: one answer on the PR names it
    answers = [
        c["body"]
        for c in gh.fake.comments.values()
        if c["issue"] == PR and "Addressed in" in c["body"]
    ]
    assert answers == [
        f"Addressed in `{sha[:12]}` (step 03, the fix for this review): the review of @alice."
    ]
    assert gh.events("review.fix-step")
    # and resolved the threads it answered: found through GraphQL reviewThreads by comment id
    assert gh.fake.resolved_threads == {"PRRT_fake9001", "PRRT_fake9002"}
    asked = [c for c in gh.fake.requests("POST", "/graphql") if "reviewThreads" in c.body["query"]]
    assert len(asked) == 1 and asked[0].body["variables"] == {
        "owner": FULL_NAME.split("/")[0],
        "name": FULL_NAME.split("/")[1],
        "number": PR,
    }
    assert "first: 100" in asked[0].body["query"] and "databaseId" in asked[0].body["query"]
    assert [e.message for e in gh.events("review.resolved")] == ["resolved 2 review thread(s)"]

    # the fix goes through the same gates: green CI completes it and the PR stays ready
    gh.ci_green(sha)
    assert gh.run().run.status == ProtocolStatus.COMPLETED

    # a second review of the same comments (a re-delivery, the bot's own replies) adds nothing
    gh.deliver("pull_request_review", review(gh, "changes_requested", review_id=700), timeout=60)
    bot_reply = line_comment(
        9100, "TASK.md", 2, replies[0]["body"], user="deksdenflow[bot]", review_id=799
    )
    bot_reply["user"]["type"] = "Bot"
    gh.deliver("pull_request_review_comment", comment_event(gh, bot_reply), timeout=60)
    gh.wait_idle(timeout=60)
    assert [s.step_index for s in gh.run().steps] == [1, 2, 3]


def test_read_only_reviewer_changes_nothing(gh: GitHubLoop) -> None:
    auto_to_completion(gh)
    gh.fake.permissions["mallory"] = "read"
    gh.fake.review_comments[800] = [
        line_comment(9201, "TASK.md", 1, "Delete everything", user="mallory", review_id=800)
    ]
    out = gh.deliver(
        "pull_request_review", review(gh, "changes_requested", user="mallory", review_id=800)
    )
    assert {"review": "nothing that counts"} in out["outcome"]["handled"]
    assert {"review_comment": 9201, "ignored": "author lacks write access"} in out["outcome"][
        "handled"
    ]
    gh.wait_idle()
    assert len(gh.run().steps) == 2 and gh.run().run.status == ProtocolStatus.COMPLETED
    assert gh.fake.review_replies == []


def test_approving_review_approves_the_plan(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    assert gh.run().run.status == ProtocolStatus.PLANNED and not gh.run().run.approved
    # a reader's approval does not count
    gh.fake.permissions["mallory"] = "read"
    out = gh.deliver("pull_request_review", review(gh, "approved", user="mallory", review_id=901))
    assert not gh.run().run.approved
    assert {"review": "approval by someone who may not approve", "author": "mallory"} in out[
        "outcome"
    ]["handled"]
    # a writer's approving review is /approve
    out = gh.deliver("pull_request_review", review(gh, "approved", review_id=902))
    assert gh.run().run.approved
    assert {"review": "approved", "author": "alice"} in out["outcome"]["handled"]
    assert [e.message for e in gh.events("protocol.approved")] == ["plan approved"]


def test_mention_works_like_a_slash_command(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    out = gh.deliver("issue_comment", gh.comment("@deksdenflow plan"))
    assert out["outcome"]["handled"][-1]["command"] == "plan"
    assert gh.run().run.status == ProtocolStatus.PLANNED
    gh.deliver("issue_comment", gh.comment("@deksdenflow approve"))
    assert gh.run().run.approved


def test_review_comment_sample_shape_is_accepted(gh: GitHubLoop) -> None:
    """A line comment on a PR that is no protocol's is read and ignored cleanly."""
    payload = gh._repo(
        {
            "action": "created",
            "comment": line_comment(1, "a", 1, "x"),
            "pull_request": {"number": 55},
        }
    )
    out = gh.deliver("pull_request_review_comment", payload)
    assert out["status"] == "processed"
    assert {"ignored": "not the pull/merge request of a protocol"} in out["outcome"]["handled"]


def test_plan_on_an_existing_pull_request_works_on_its_branch(
    gh: GitHubLoop, tmp_path: Path
) -> None:
    """`/plan` on a PR someone opened: the plan and the steps go to that PR's branch, the PR is
    the protocol's, and later commands on it find the protocol (no second PR is opened)."""
    gh.deliver("installation", gh.installation_created())
    work = tmp_path / "clone"
    git("clone", "-q", str(gh.origin), str(work), cwd=tmp_path)
    git("checkout", "-q", "-b", "feature-x", cwd=work)
    (work / "feature.txt").write_text("half done\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "start feature x", cwd=work)
    git("push", "-q", "origin", "feature-x", cwd=work)
    gh.fake.pulls[55] = {
        "number": 55, "node_id": "PR_human55", "html_url": f"https://github.com/{FULL_NAME}/pull/55",
        "head": {"ref": "feature-x", "repo": {"full_name": FULL_NAME}},
        "base": {"ref": "main", "repo": {"full_name": FULL_NAME}},
        "draft": False, "state": "open", "title": "Feature X", "body": "A human's PR.",
    }  # fmt: skip

    out = gh.deliver("issue_comment", pull_comment(gh, "/plan finish feature x", 55, 7001))
    assert out["outcome"]["handled"][-1]["result"].startswith("planning 0001-")
    state = gh.run()
    assert (
        state.run.status == ProtocolStatus.PLANNED
        and state.run.pr_number == 55
        and state.run.issue_number is None
    )
    assert state.run.runtime_state["branch"] == "feature-x"
    assert list(gh.fake.pulls) == [55] and gh.fake.pulls[55]["body"] == "A human's PR."  # untouched
    log = git("log", "--format=%s", "feature-x", cwd=gh.origin)
    assert (
        "start feature x" in log and "[protocol-0001/00]" in log
    )  # the plan is on the PR's branch

    gh.deliver("issue_comment", pull_comment(gh, "/approve", 55, 7002))
    assert gh.run().run.approved
    gh.deliver("issue_comment", pull_comment(gh, "/run-step", 55, 7003))
    step = gh.run().step(1)
    assert step.status == StepStatus.NEEDS_QA  # executed and pushed; QA passed, CI is next
    assert git("rev-parse", "feature-x", cwd=gh.origin).strip() == gh.run().run.head_sha
    assert not any(
        r.startswith(f"refs/heads/{state.run.protocol_name}")
        for r in git("for-each-ref", "--format=%(refname)", cwd=gh.origin).split()
    )
    # CI on the PR's branch reaches the protocol planned on it
    gh.ci_suite("success")
    out = gh.deliver("workflow_run", gh.workflow_run("feature-x", step.runtime_state["commit_sha"]))
    assert out["outcome"]["handled"][-1] == {"ci": "success", "outcome": "complete"}
    # a second /plan on the same PR does not start an unrelated protocol
    out = gh.deliver("issue_comment", pull_comment(gh, "/plan again", 55, 7004))
    assert out["outcome"]["handled"][-1]["result"] == "already-planned"


def test_ready_for_review_failure_is_said_not_fatal(gh: GitHubLoop) -> None:
    gh.fake.fail_next(
        "POST", r"/graphql", 403, {"message": "Resource not accessible by integration"}
    )
    auto_to_completion(gh)
    assert gh.run().run.status == ProtocolStatus.COMPLETED  # the work is done either way
    assert gh.fake.pulls[PR]["draft"] is True
    assert "could not be marked ready" in gh.fake.comments[1002]["body"]
    assert [e.message for e in gh.events("feedback.failed")] == [
        "ready for review: GitHubHTTPError"
    ]


def test_review_on_a_cancelled_protocol_adds_nothing(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    gh.deliver("issue_comment", gh.comment("/cancel"))
    gh.fake.review_comments[710] = [line_comment(9301, "TASK.md", 1, "Change it")]
    gh.deliver("pull_request_review", review(gh, "changes_requested", review_id=710))
    gh.wait_idle()
    state = gh.run()
    assert state.run.status == ProtocolStatus.CANCELLED and len(state.steps) == 2
    assert [e.message for e in gh.events("review.ignored")] == [
        "review feedback on a cancelled protocol"
    ]


def test_mention_on_the_pr_is_feedback_after_the_quiet_window(
    gh: GitHubLoop, prompts: list[EngineRequest]
) -> None:
    auto_to_completion(gh)
    gh.deliver(
        "issue_comment",
        pull_comment(gh, "@deksdenflow please add a docstring to greet", PR, 7101),
        timeout=60,
    )
    gh.deliver("issue_comment", pull_comment(gh, "Nice work, everyone", PR, 7102))  # names nobody
    gh.wait_idle(timeout=60)
    state = gh.run()
    assert len(state.steps) == 3
    assert [c["comment_id"] for c in state.step(3).runtime_state["review"]] == [7101]
    prompt = next(
        r.prompt for r in prompts if r.phase == "execute" and r.context.get("step_index") == 3
    )
    assert "please add a docstring to greet" in prompt and "the pull request as a whole" in prompt
    assert "Nice work" not in prompt
    assert gh.fake.review_replies == []  # no thread: the answer is a PR comment
    assert any(
        "the comment of @alice" in c["body"] for c in gh.fake.comments.values() if c["issue"] == PR
    )


def test_review_while_a_step_runs_waits_for_it(
    gh: GitHubLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fix step needs the protocol's branch: a review that comes while a step's engine runs
    is kept and appended once the step is done, nothing lost and nothing run twice."""
    release = threading.Event()
    started = threading.Event()
    original = ScriptedEngine.run

    async def run(self: ScriptedEngine, request: EngineRequest) -> EngineResult:
        if request.phase == "execute" and request.context.get("step_index") == 1:
            started.set()
            await asyncio.to_thread(release.wait, 30)
        return await original(self, request)

    monkeypatch.setattr(ScriptedEngine, "run", run)
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    gh.deliver("issue_comment", gh.comment("/approve"))
    gh.post("issue_comment", gh.comment("/run-step"))
    assert started.wait(20)
    gh.fake.review_comments[720] = [line_comment(9401, "TASK.md", 1, "Say more")]
    answer = gh.post("pull_request_review", review(gh, "changes_requested", review_id=720))
    deadline = time.monotonic() + 20
    while not gh.call(_job_busy, gh):
        assert time.monotonic() < deadline, "the fix-step job never found the step running"
        time.sleep(0.05)
    assert len(gh.run().steps) == 2
    release.set()
    gh.wait_idle(answer["id"], timeout=40)
    state = gh.run()
    assert [s.step_index for s in state.steps] == [1, 2, 3]
    assert [c["comment_id"] for c in state.step(3).runtime_state["review"]] == [9401]
    assert state.step(1).status in (StepStatus.NEEDS_QA, StepStatus.COMPLETED)


async def _job_busy(gh: GitHubLoop) -> bool:
    """Whether a fix-step job came back later because the protocol was busy."""
    assert gh.state.redis is not None
    keys = await gh.state.redis.keys("arq:job:review:*:later:*")
    return bool(keys)


def test_line_comments_of_a_commented_review_make_one_step(
    gh: GitHubLoop, prompts: list[EngineRequest]
) -> None:
    """A review in state `commented` does not request changes, but its line comments (each its
    own delivery) are feedback: those within the quiet window make one step."""
    auto_to_completion(gh)
    gh.fake.review_states[730] = "COMMENTED"
    for cid, line in ((9501, 1), (9502, 2)):
        gh.post(
            "pull_request_review_comment",
            comment_event(gh, line_comment(cid, "TASK.md", line, f"nit {cid}", review_id=730)),
        )
    gh.post("pull_request_review", review(gh, "commented", review_id=730))
    gh.wait_idle(timeout=60)
    state = gh.run()
    assert [s.step_index for s in state.steps] == [1, 2, 3]
    assert sorted(c["comment_id"] for c in state.step(3).runtime_state["review"]) == [9501, 9502]
    assert sorted(r["in_reply_to_id"] for r in gh.fake.review_replies) == [9501, 9502]


def request_changes(gh: GitHubLoop, review_id: int = 740) -> list[dict[str, Any]]:
    """A completed protocol, then a review asking for changes in two threads; its fix step runs."""
    auto_to_completion(gh)
    comments = [
        line_comment(9601, "demo_greeting.py", 4, "Greet with a comma", review_id=review_id),
        line_comment(9602, "TASK.md", 2, "Name the issue", review_id=review_id),
    ]
    gh.fake.review_comments[review_id] = comments
    gh.fake.review_states[review_id] = "CHANGES_REQUESTED"
    gh.deliver(
        "pull_request_review", review(gh, "changes_requested", review_id=review_id), timeout=60
    )
    gh.wait_idle(timeout=60)
    return comments


def test_review_comments_reach_every_attempt_of_the_fix_step(
    gh: GitHubLoop, prompts: list[EngineRequest]
) -> None:
    """The comments are a typed feedback item: an automatic fix attempt after red CI and a
    human's `/retry` of the fix step both carry them, next to the CI evidence and the guidance."""
    from tests.github_e2e.test_github_fix_loop import executes, red_ci

    request_changes(gh)
    assert gh.run().step(3).status == StepStatus.NEEDS_QA  # QA passed, CI to come
    out = red_ci(gh, gh.run().step(3).runtime_state["commit_sha"], got=4)
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "retry"}
    out = red_ci(gh, gh.run().step(3).runtime_state["commit_sha"], got=5)
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "block"}
    gh.deliver(
        "issue_comment", pull_comment(gh, "/retry 3 keep the greeting short", PR, 7201), timeout=60
    )
    attempts = executes(prompts, 3)
    assert len(attempts) == 3
    for n, prompt in enumerate(attempts):
        section = prompt.split("Review comments this step addresses", 1)[1]
        assert "Greet with a comma" in section and "Name the issue" in section, n
    assert "AssertionError: expected 3, got 4" in attempts[1]
    assert (
        "AssertionError: expected 3, got 5" in attempts[2]
        and "keep the greeting short" in attempts[2]
    )
    kinds = [i["kind"] for i in gh.run().step(3).runtime_state["feedback"]]
    assert sorted(kinds) == ["ci_failure", "guidance", "review"]


def test_resolving_threads_is_best_effort(gh: GitHubLoop) -> None:
    """GitHub refuses the thread query: the replies stand, the step goes on, an event says so."""
    auto_to_completion(gh)
    gh.fake.fail_next(
        "POST", r"/graphql", 403, {"message": "Resource not accessible by integration"}
    )
    gh.fake.review_comments[750] = [
        line_comment(9701, "TASK.md", 1, "Shorter, please", review_id=750)
    ]
    gh.fake.review_states[750] = "CHANGES_REQUESTED"
    gh.deliver("pull_request_review", review(gh, "changes_requested", review_id=750), timeout=60)
    gh.wait_idle(timeout=60)
    step = gh.run().step(3)
    assert step.status == StepStatus.NEEDS_QA and step.runtime_state["review_replied"] == ["9701"]
    assert [r["in_reply_to_id"] for r in gh.fake.review_replies] == [9701]
    assert gh.fake.resolved_threads == set()
    assert [e.message for e in gh.events("feedback.failed")] == [
        "resolve review threads: GitHubHTTPError"
    ]
    assert step.runtime_state["review_resolved"] == ["9701"]  # tried once, not on every re-run


class WorkerDied(Exception):
    """The worker dies here: the job ends with nothing after this point run."""


@pytest.fixture
def reclaim_held(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The embedded worker's reclaim cron (twice a minute) finds no replies due while the
    list holds True: the test says when the reclaim may take them."""
    import bot.jobs.reclaim as reclaim_job
    import bot.jobs.review as review_job

    held = [True]
    real = review_job.replies_due

    async def gated(ctx: dict[str, Any]) -> list[tuple[int, int]]:
        return [] if held[0] else await real(ctx)

    # the cron calls the name reclaim imported: patching review's alone held nothing, and a
    # cron tick inside the test's window answered the threads before the test meant it to
    monkeypatch.setattr(reclaim_job, "replies_due", gated)
    monkeypatch.setattr(review_job, "replies_due", gated)
    return held


def test_worker_dying_between_the_push_and_the_replies_answers_each_thread_once(
    gh: GitHubLoop, reclaim_held: list[bool]
) -> None:
    """Killed after the fix's push and its first reply: the reclaim cron's job answers the other
    thread (and resolves both); the thread already answered is not answered twice."""
    from bot.jobs.reclaim import reclaim_expired

    worker_ctx: dict[str, Any] = gh.state.extra["worker"].ctx
    kills: list[tuple[str, int, int]] = []

    def die(at: str, run_id: int, step: int) -> None:
        if at == "after_review_reply" and not kills:
            kills.append((at, run_id, step))
            raise WorkerDied(at)

    worker_ctx["crash_hook"] = die
    try:
        request_changes(gh, review_id=760)
    finally:
        del worker_ctx["crash_hook"]
    run_id = gh.run().run.id
    assert kills == [("after_review_reply", run_id, 3)]
    step = gh.run().step(3)
    assert (
        step.status == StepStatus.NEEDS_QA and step.runtime_state["commit_sha"]
    )  # pushed and recorded
    assert [r["in_reply_to_id"] for r in gh.fake.review_replies] == [9602]  # died after the first
    assert gh.call(_due, gh) == {f"{run_id}:3"}

    reclaim_held[0] = False
    assert gh.call(reclaim_expired, worker_ctx) == 1
    gh.wait_idle(timeout=60)
    assert sorted(r["in_reply_to_id"] for r in gh.fake.review_replies) == [9601, 9602]
    assert gh.fake.resolved_threads == {"PRRT_fake9601", "PRRT_fake9602"}
    assert gh.call(_due, gh) == set()
    # nothing is left to take back: a later tick sends nothing again
    assert gh.call(reclaim_expired, worker_ctx) == 0
    gh.wait_idle(timeout=30)
    assert len(gh.fake.review_replies) == 2


async def _due(gh: GitHubLoop) -> set[str]:
    from bot.jobs.review import REPLIES_DUE_KEY

    redis: Any = gh.state.redis
    return {
        m.decode() if isinstance(m, bytes) else m for m in await redis.smembers(REPLIES_DUE_KEY)
    }


def test_worker_dying_right_after_the_push_answers_when_the_job_runs_again(
    gh: GitHubLoop, reclaim_held: list[bool]
) -> None:
    """Killed between the push and the first reply: arq runs a killed worker's job again; that
    run finds the step past running and sends the replies it left (and only those)."""
    from bot.jobs.steps import execute_step

    worker_ctx: dict[str, Any] = gh.state.extra["worker"].ctx
    kills: list[str] = []

    def die(at: str, _run_id: int, _step: int) -> None:
        if at == "before_review_replies" and not kills:
            kills.append(at)
            raise WorkerDied(at)

    worker_ctx["crash_hook"] = die
    try:
        request_changes(gh, review_id=770)
    finally:
        del worker_ctx["crash_hook"]
    assert kills == ["before_review_replies"] and gh.fake.review_replies == []
    run_id = gh.run().run.id

    async def again() -> str:
        outcome: str = await execute_step(worker_ctx, protocol_run_id=run_id, step_index=3)
        return outcome

    assert gh.call(again) == "skipped-needs_qa"
    assert sorted(r["in_reply_to_id"] for r in gh.fake.review_replies) == [9601, 9602]
    assert gh.call(again) == "skipped-needs_qa"  # a third run: every thread has its one reply
    assert len(gh.fake.review_replies) == 2 and gh.call(_due, gh) == set()


def test_worker_dying_between_a_reply_and_its_record_does_not_reply_twice(
    gh: GitHubLoop, reclaim_held: list[bool]
) -> None:
    """Killed after a reply's POST, before it was recorded: the next run finds the reply in
    the PR's review threads (GraphQL) and sends only the one still missing."""
    from bot.jobs.reclaim import reclaim_expired

    worker_ctx: dict[str, Any] = gh.state.extra["worker"].ctx
    kills: list[str] = []

    def die(at: str, _run_id: int, _step: int) -> None:
        if at == "after_review_post" and not kills:
            kills.append(at)
            raise WorkerDied(at)

    worker_ctx["crash_hook"] = die
    try:
        request_changes(gh, review_id=780)
    finally:
        del worker_ctx["crash_hook"]
    assert kills == ["after_review_post"]
    step = gh.run().step(3)
    assert [r["in_reply_to_id"] for r in gh.fake.review_replies] == [9602]
    assert (
        step.runtime_state["review_replying"] == ["9602"]
        and "review_replied" not in step.runtime_state
    )

    reclaim_held[0] = False
    assert gh.call(reclaim_expired, worker_ctx) == 1
    gh.wait_idle(timeout=60)
    assert sorted(r["in_reply_to_id"] for r in gh.fake.review_replies) == [9601, 9602]  # 9602 once
    assert gh.run().step(3).runtime_state["review_replied"] == ["9601", "9602"]
    assert gh.fake.resolved_threads == {"PRRT_fake9601", "PRRT_fake9602"}
