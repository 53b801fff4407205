"""The GitHub App loop end to end: signed deliveries into the real app, GitHub faked by respx,
a local bare repository as the remote; the exact GitHub requests are asserted."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from bot.domain.states import ProtocolStatus, StepStatus
from bot.forge.github import GitHubForge
from tests.github_e2e.conftest import GitHubLoop
from tests.github_e2e.fake_github import FULL_NAME, INSTALLATION_ID
from tests.gitutil import git

R = f"/repos/{FULL_NAME}"
STATUS_MARKER = "<!-- deksdenflow:status protocol=0001-add-a-greeting -->"
PROTOCOL = "0001-add-a-greeting"


def pairs(calls: list[Any]) -> list[tuple[str, str]]:
    return [(c.method, c.path) for c in calls]


def planned(gh: GitHubLoop) -> None:
    """install → /plan, without assertions (the full-loop test asserts those requests)."""
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    assert gh.run().run.status == ProtocolStatus.PLANNED


def executed(gh: GitHubLoop) -> None:
    """… → /approve → /run-step: step 01 executed and QA'd on its own (PASS), waiting for CI."""
    planned(gh)
    gh.deliver("issue_comment", gh.comment("/approve"))
    gh.deliver("issue_comment", gh.comment("/run-step"))
    state = gh.run()
    assert [s.status for s in state.steps] == [StepStatus.NEEDS_QA, StepStatus.PENDING]
    assert state.step(1).runtime_state["qa_verdict"] == "PASS"


def test_full_loop_install_plan_approve_step_qa_ci_merge(gh: GitHubLoop) -> None:
    fake = gh.fake
    # install: the project is registered, then project_setup learns branch, clone URL and CI
    out = gh.deliver("installation", gh.installation_created())
    assert out["status"] == "processed"
    assert pairs(fake.calls) == [
        ("POST", f"/app/installations/{INSTALLATION_ID}/access_tokens"),
        ("GET", R),
        ("GET", f"{R}/contents/.github/workflows"),
    ]
    assert fake.calls[2].query == {"ref": "main"}
    project = gh.project()
    assert project is not None
    assert (project.git_url, project.base_branch, project.ci_provider) == (
        str(gh.origin),
        "main",
        "github-actions",
    )
    assert project.installation_id == INSTALLATION_ID

    # /plan: permission → 👀 → plan job: status comment, draft PR, status on issue and PR, 🚀
    mark = fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/plan", comment_id=5101))
    assert out["outcome"]["handled"][-1] == {"command": "plan", "result": f"planning {PROTOCOL}"}
    calls = fake.since(mark)
    assert pairs(calls) == [
        ("GET", f"{R}/collaborators/alice/permission"),
        ("POST", f"{R}/issues/comments/5101/reactions"),
        ("GET", f"{R}/issues/1/comments"),  # planning: no status comment of ours yet
        ("POST", f"{R}/issues/1/comments"),
        ("GET", f"{R}/pulls"),  # an open PR for the branch already? no
        ("POST", f"{R}/pulls"),
        ("PATCH", f"{R}/issues/comments/1002"),  # the remembered status comment, edited
        ("GET", f"{R}/issues/101/comments"),
        ("POST", f"{R}/issues/101/comments"),
        ("POST", f"{R}/issues/comments/5101/reactions"),
    ]
    assert calls[1].body == {"content": "eyes"}
    assert calls[-1].body == {"content": "rocket"}
    assert calls[4].query == {"head": f"Codertocat:{PROTOCOL}", "state": "open"}
    pr = calls[5].body
    assert pr["draft"] is True and pr["head"] == PROTOCOL and pr["base"] == "main"
    assert "Closes #1" in pr["body"] and f".protocols/{PROTOCOL}/plan.md" in pr["body"]
    assert calls[3].body["body"].startswith(STATUS_MARKER)
    assert "planned" in calls[6].body["body"]
    state = gh.run()
    assert (state.run.status, state.run.pr_number, state.run.issue_number) == (
        ProtocolStatus.PLANNED,
        101,
        1,
    )
    assert state.run.head_sha == git("rev-parse", PROTOCOL, cwd=gh.origin).strip()
    assert git(
        "ls-tree", "--name-only", f"{PROTOCOL}:.protocols/{PROTOCOL}", cwd=gh.origin
    ).split() == [
        "00-setup.md",
        "01-record-task.md",
        "02-add-greeting.md",
        "context.md",
        "log.md",
        "plan.md",
        "spec.json",
    ]

    # /approve: permission, 👀, the status comment shows it
    mark = fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/approve", comment_id=5102))
    assert out["outcome"]["handled"][-1] == {"command": "approve", "result": "approved"}
    assert pairs(fake.since(mark)) == [
        ("GET", f"{R}/collaborators/alice/permission"),
        ("POST", f"{R}/issues/comments/5102/reactions"),
    ]
    assert gh.run().run.approved

    # /run-step: one step executed, committed and pushed; check run in_progress → completed;
    # then QA runs on its own (the default AUTO_QA_AFTER_EXEC) and commits its report
    start_sha = gh.run().run.head_sha
    mark = fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/run-step", comment_id=5103))
    assert out["outcome"]["handled"][-1] == {"command": "run-step", "result": "step 1"}
    calls = fake.since(mark)
    state = gh.run()
    step_sha = state.step(1).runtime_state["commit_sha"]
    head = state.run.head_sha
    assert head == git("rev-parse", PROTOCOL, cwd=gh.origin).strip()
    assert step_sha == git("rev-parse", f"{PROTOCOL}~1", cwd=gh.origin).strip()
    assert start_sha not in (step_sha, head)
    assert (
        git("log", "-1", "--format=%s", head, cwd=gh.origin).strip()
        == "test(qa): quality report for step 01: PASS [protocol-0001/01-qa]"
    )
    assert (
        git("log", "-1", "--format=%s", step_sha, cwd=gh.origin)
        .strip()
        .endswith("[protocol-0001/01]")
    )
    assert pairs(calls) == [
        ("GET", f"{R}/collaborators/alice/permission"),
        ("POST", f"{R}/issues/comments/5103/reactions"),
        ("POST", f"{R}/check-runs"),  # in_progress on the commit the step starts from
        ("PATCH", f"{R}/check-runs/1007"),  # … completed there, so it never stays in progress
        ("POST", f"{R}/check-runs"),  # completed on the step's own commit, with buttons
        ("PATCH", f"{R}/issues/comments/1002"),
        ("PATCH", f"{R}/issues/comments/1003"),
        ("POST", f"{R}/issues/comments/5103/reactions"),
        # QA right after execution: its own job, after the command's 🚀
        ("POST", f"{R}/check-runs"),  # QA in progress on the step's commit
        ("PATCH", f"{R}/check-runs/1010"),
        ("POST", f"{R}/check-runs"),  # QA completed on the quality-report commit
        ("PATCH", f"{R}/issues/comments/1002"),
        ("PATCH", f"{R}/issues/comments/1003"),
    ]
    started, closed, done = calls[2].body, calls[3].body, calls[4].body
    assert started["name"] == "deksdenflow/step-01" and started["status"] == "in_progress"
    assert started["head_sha"] == start_sha
    assert (
        closed["status"] == "completed"
        and closed["conclusion"] == "success"
        and "actions" not in closed
    )
    assert done["head_sha"] == step_sha and done["conclusion"] == "success"
    assert [a["identifier"] for a in done["actions"]] == ["run-qa", "run-next"]
    assert calls[7].body == {"content": "rocket"}
    # the executed step's own GitHub traffic (bench figure): ≤ 6 requests, tokens included
    assert len(calls[:8]) - 2 <= 6
    qa_started, qa_done = calls[8].body, calls[10].body
    assert qa_started["name"] == "deksdenflow/qa-01" and qa_started["head_sha"] == step_sha
    assert qa_done["head_sha"] == head
    assert qa_done["conclusion"] == "success" and "PASS" in qa_done["output"]["summary"]
    # QA passed, but the repository has CI: the step waits for it (CI_GATES by default)
    assert [s.status for s in state.steps] == [StepStatus.NEEDS_QA, StepStatus.PENDING]
    assert state.steps[0].runtime_state["qa_verdict"] == "PASS"

    # CI: a workflow_run for another sha is ignored; green on the step's commit (suites
    # aggregated) completes the step
    mark = fake.mark()
    out = gh.deliver("workflow_run", gh.workflow_run(PROTOCOL, "0" * 40))
    assert out["outcome"]["handled"][-1] == {"ignored": "not a step's commit"}
    assert fake.since(mark) == []
    gh.ci_suite("success")
    out = gh.deliver("workflow_run", gh.workflow_run(PROTOCOL, step_sha))
    assert out["outcome"]["handled"][-1] == {"ci": "success", "outcome": "complete"}
    calls = fake.since(mark)
    assert pairs(calls) == [
        ("GET", f"{R}/commits/{step_sha}/check-suites"),
        ("PATCH", f"{R}/issues/comments/1002"),
        ("PATCH", f"{R}/issues/comments/1003"),
    ]
    state = gh.run()
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED, StepStatus.PENDING]
    assert state.steps[0].runtime_state["qa_verdict"] == "PASS"

    # the PR is merged: protocol completed, status comments say so
    mark = fake.mark()
    out = gh.deliver("pull_request", gh.pr_closed(PROTOCOL, 101, merged=True))
    assert out["outcome"]["handled"][-1] == {"protocol": PROTOCOL, "result": "completed"}
    calls = fake.since(mark)
    assert pairs(calls) == [
        ("PATCH", f"{R}/issues/comments/1002"),
        ("PATCH", f"{R}/issues/comments/1003"),
    ]
    assert "completed" in calls[0].body["body"]
    assert gh.run().run.status == ProtocolStatus.COMPLETED
    # one status comment per target, ever; only one token for the whole loop
    assert len(fake.requests("POST", f"{R}/issues/1/comments")) == 1
    assert len(fake.requests("POST", f"{R}/issues/101/comments")) == 1
    assert len(fake.requests("POST", r"/app/installations/\d+/access_tokens")) == 1


def test_unmerged_close_cancels(gh: GitHubLoop) -> None:
    planned(gh)
    out = gh.deliver("pull_request", gh.pr_closed(PROTOCOL, 101, merged=False))
    assert out["outcome"]["handled"][-1] == {"protocol": PROTOCOL, "result": "cancelled"}
    assert gh.run().run.status == ProtocolStatus.CANCELLED


def test_read_permission_gets_a_polite_refusal_and_no_job(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.fake.permissions["bob"] = "read"
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/plan", user="bob"))
    assert out["outcome"]["handled"][-1] == {
        "command": "plan",
        "result": "refused",
        "permission": "read",
    }
    calls = gh.fake.since(mark)
    assert pairs(calls) == [
        ("GET", f"{R}/collaborators/bob/permission"),
        ("POST", f"{R}/issues/1/comments"),
    ]
    assert calls[1].body["body"].startswith("Sorry @bob, `/plan` needs **write** access")
    assert gh.events("protocol.created") == [] and gh.call(_run_count, gh) == 0


async def _run_count(gh: GitHubLoop) -> int:
    from sqlalchemy import func, select

    from bot.storage.models import ProtocolRun

    async with gh.db.sessions() as session:
        return int((await session.execute(select(func.count(ProtocolRun.id)))).scalar() or 0)


def test_bot_comment_is_ignored_without_any_request(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/plan", user="other-app[bot]", user_type="Bot"))
    assert out["outcome"]["handled"][-1] == {"ignored": "comment by a bot"}
    assert gh.fake.since(mark) == []
    assert gh.call(_run_count, gh) == 0


def test_unknown_command_replies_with_did_you_mean(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/paln"))
    assert out["outcome"]["handled"][-1]["result"] == "unknown"
    calls = gh.fake.since(mark)
    # who may act is asked before anything is said
    assert pairs(calls) == [
        ("GET", f"{R}/collaborators/alice/permission"),
        ("POST", f"{R}/issues/1/comments"),
    ]
    body = calls[1].body["body"]
    assert "`/paln` is not a DeksdenFlow command" in body and "Did you mean `/plan`?" in body
    assert gh.call(_run_count, gh) == 0


def test_same_ci_failure_twice_blocks_for_a_human(gh: GitHubLoop) -> None:
    executed(gh)
    # give step 01 a CI loop so the first failure re-runs it (without one it blocks at once)
    spec = gh.run().run.template_config
    spec["steps"][0]["loop"] = {
        "max_iterations": 3,
        "back_to": 1,
        "skip_steps": [],
        "on": "ci_fail",
    }
    gh.update_run(template_config=spec)
    first = gh.run().run.head_sha
    gh.ci_suite("failure", name="tests")
    out = gh.deliver("workflow_run", gh.workflow_run(PROTOCOL, first, "failure"))
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "retry"}
    state = gh.run()
    second = state.run.head_sha
    assert second != first  # the step ran again (CI feedback in its prompt) and pushed
    assert state.steps[0].status == StepStatus.NEEDS_QA and state.steps[0].retries == 1
    assert "CI failed" in json.dumps(state.steps[0].runtime_state["feedback"])
    mark = gh.fake.mark()
    out = gh.deliver("workflow_run", gh.workflow_run(PROTOCOL, second, "failure"))
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "block"}
    state = gh.run()
    assert state.run.status == ProtocolStatus.BLOCKED and state.steps[0].status == StepStatus.FAILED
    assert "failed the same way twice" in state.run.runtime_state["message"]
    assert "needs a human" in state.run.runtime_state["message"]
    calls = gh.fake.since(mark)
    assert pairs(calls) == [
        ("GET", f"{R}/commits/{second}/check-suites"),
        ("GET", f"{R}/commits/{second}/check-runs"),  # the evidence: failed runs, their logs
        ("PATCH", f"{R}/issues/comments/1002"),
        ("PATCH", f"{R}/issues/comments/1003"),
    ]
    assert "needs a human" in calls[2].body["body"]


@pytest.mark.parametrize(
    ("identifier", "check", "expected_check", "expected_steps"),
    [
        # QA again (it already ran on its own and passed), CI has not reported yet: the
        # step still waits on its CI gate
        ("run-qa", "deksdenflow/step-01", "deksdenflow/qa-01", ["needs_qa", "pending"]),
        # step 02 executes and is QA'd on its own, then waits for CI like step 01 did
        ("run-next", "deksdenflow/qa-01", "deksdenflow/step-02", ["completed", "needs_qa"]),
        ("retry-step", "deksdenflow/step-01", "deksdenflow/step-01", ["needs_qa", "pending"]),
    ],
)
def test_check_run_buttons_drive_the_protocol(
    gh: GitHubLoop, identifier: str, check: str, expected_check: str, expected_steps: list[str]
) -> None:
    executed(gh)
    if identifier != "run-qa":  # the other buttons sit on a finished QA check (and green CI)
        gh.ci_green(gh.run().step(1).runtime_state["commit_sha"])
        assert [s.status for s in gh.run().steps] == [StepStatus.COMPLETED, StepStatus.PENDING]
    head = gh.run().run.head_sha
    mark = gh.fake.mark()
    out = gh.deliver("check_run", gh.check_run_action(check, PROTOCOL, head, identifier))
    assert out["outcome"]["handled"][-1]["action"] == identifier
    created = [c.body["name"] for c in gh.fake.since(mark) if c.key == ("POST", f"{R}/check-runs")]
    assert created[0] == expected_check
    state = gh.run()
    assert [s.status for s in state.steps] == expected_steps
    if identifier == "retry-step":
        assert state.steps[0].retries == 1


def test_expired_token_is_renewed_and_the_call_retried(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.fake.expire_tokens()
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/status"))
    assert out["outcome"]["handled"][-1] == {"command": "status", "result": "no-protocol"}
    calls = gh.fake.since(mark)
    assert pairs(calls) == [
        ("GET", f"{R}/collaborators/alice/permission"),  # 401: the token expired
        ("POST", f"/app/installations/{INSTALLATION_ID}/access_tokens"),
        ("GET", f"{R}/collaborators/alice/permission"),
        ("POST", f"{R}/issues/comments/5001/reactions"),
        ("POST", f"{R}/issues/1/comments"),
    ]
    assert calls[0].token == "ghs_fake0001" and calls[2].token == "ghs_fake0002"
    assert all(c.token == "ghs_fake0002" for c in calls[3:])


@pytest.fixture
def recorded_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The GitHub client's backoff sleeps, recorded instead of slept."""
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    original: Callable[..., GitHubForge] = GitHubForge.from_app.__func__  # type: ignore[attr-defined]

    def from_app(cls: type[GitHubForge], /, **kwargs: Any) -> GitHubForge:
        return original(cls, sleep=sleep, **kwargs)

    monkeypatch.setattr(GitHubForge, "from_app", classmethod(from_app))
    return delays


def test_secondary_rate_limit_waits_retry_after_then_retries(
    recorded_sleeps: list[float], loop_factory: Callable[..., GitHubLoop]
) -> None:
    gh = loop_factory()
    gh.deliver("installation", gh.installation_created())
    gh.fake.fail_next(
        "POST",
        rf"{R}/issues/comments/\d+/reactions",
        403,
        {
            "message": "You have exceeded a secondary rate limit. "
            "Please wait a few minutes before you try again."
        },
        **{"retry-after": "7"},
    )
    mark = gh.fake.mark()
    gh.deliver("issue_comment", gh.comment("/help", comment_id=5200))
    assert pairs(gh.fake.since(mark)) == [
        ("GET", f"{R}/collaborators/alice/permission"),
        ("POST", f"{R}/issues/comments/5200/reactions"),  # 403 secondary rate limit
        ("POST", f"{R}/issues/comments/5200/reactions"),
        ("POST", f"{R}/issues/1/comments"),
    ]
    assert recorded_sleeps == [7.0]


def test_bad_gateway_is_retried_with_backoff(
    recorded_sleeps: list[float], loop_factory: Callable[..., GitHubLoop]
) -> None:
    gh = loop_factory()
    gh.deliver("installation", gh.installation_created())
    gh.fake.fail_next(
        "GET", rf"{R}/collaborators/alice/permission", 502, {"message": "Bad Gateway"}
    )
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/status", comment_id=5300))
    assert out["outcome"]["handled"][-1] == {"command": "status", "result": "no-protocol"}
    assert pairs(gh.fake.since(mark)) == [
        ("GET", f"{R}/collaborators/alice/permission"),  # 502
        ("GET", f"{R}/collaborators/alice/permission"),
        ("POST", f"{R}/issues/comments/5300/reactions"),
        ("POST", f"{R}/issues/1/comments"),
    ]
    assert recorded_sleeps == [1.0]
