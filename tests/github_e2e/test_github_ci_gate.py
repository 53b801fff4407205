"""CI as a gate, on the GitHub fake with the product's DEFAULT settings (QA right after a step
executes, green CI required to complete a step in a repository with workflows)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bot.domain.states import ProtocolStatus, StepStatus
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.github_e2e.conftest import GitHubLoop, sample
from tests.github_e2e.fake_github import FULL_NAME
from tests.github_e2e.test_github_gaps import check_suite, labeled
from tests.gitutil import git

R = f"/repos/{FULL_NAME}"
PROTOCOL = "0001-add-a-greeting"


@pytest.fixture
def gh(loop_factory: Callable[..., GitHubLoop]) -> GitHubLoop:
    return loop_factory()


def statuses(gh: GitHubLoop) -> list[str]:
    return [s.status for s in gh.run().steps]


def step_of_event(gh: GitHubLoop, event_type: str) -> list[int | None]:
    """The step index each event of this type is attributed to, in order."""
    by_id = {s.id: s.step_index for s in gh.run().steps}
    return [by_id.get(e.step_run_id) if e.step_run_id else None for e in gh.events(event_type)]


def step_commit(gh: GitHubLoop, index: int) -> str:
    sha: str = gh.run().step(index).runtime_state["commit_sha"]
    return sha


def red(gh: GitHubLoop, sha: str, event: str = "workflow_run") -> dict[str, Any]:
    gh.ci_suite("failure", name="tests")
    if event == "check_suite":
        payload = check_suite(gh, sha)
        payload["check_suite"]["conclusion"] = "failure"
        return gh.deliver("check_suite", payload)
    return gh.deliver("workflow_run", gh.workflow_run(PROTOCOL, sha, "failure"))


def status_event(gh: GitHubLoop, sha: str, state: str) -> dict[str, Any]:
    payload = gh._repo(sample("status"))
    payload.update(sha=sha, state=state, context="ci/tests")
    payload["branches"] = [{"name": PROTOCOL, "commit": {"sha": sha}, "protected": False}]
    return payload


def first_step_done(gh: GitHubLoop) -> None:
    """install → /plan → /approve → /run-step: step 01 executed and QA'd, waiting on CI."""
    gh.deliver("installation", gh.installation_created())
    assert gh.project() is not None and gh.project().ci_provider == "github-actions"  # type: ignore[union-attr]
    gh.deliver("issue_comment", gh.comment("/plan"))
    gh.deliver("issue_comment", gh.comment("/approve"))
    gh.deliver("issue_comment", gh.comment("/run-step"))


def test_qa_passes_first_then_green_ci_completes_the_step(gh: GitHubLoop) -> None:
    first_step_done(gh)
    state = gh.run()
    # QA ran on its own (default AUTO_QA_AFTER_EXEC) and passed, but CI has not spoken
    assert statuses(gh) == [StepStatus.NEEDS_QA, StepStatus.PENDING]
    assert state.step(1).runtime_state["qa_verdict"] == "PASS"
    assert gh.events("step.waiting-ci") and state.run.status == ProtocolStatus.RUNNING
    assert "PASS · waiting for CI" in gh.fake.comments[1002]["body"]  # the status comment says so
    # CI on the step's own commit (not the QA-report head) completes it
    out = gh.ci_green(step_commit(gh, 1))
    assert out["outcome"]["handled"][-1] == {"ci": "success", "outcome": "complete"}
    assert statuses(gh) == [StepStatus.COMPLETED, StepStatus.PENDING]
    # CI on the QA-report commit is the same step's, read and recorded, and changes nothing
    out = gh.ci_green()
    assert out["outcome"]["handled"][-1] == {"ci": "success", "outcome": "recorded"}
    assert step_of_event(gh, "ci.success") == [1, 1]


@pytest.fixture
def qa_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """QA engine calls wait until the test sets the event (so CI can arrive first)."""
    release = threading.Event()
    original = ScriptedEngine.run

    async def run(self: ScriptedEngine, request: EngineRequest) -> EngineResult:
        if request.phase == "qa":  # the test thread sets a threading.Event: poll it
            await asyncio.to_thread(release.wait, 30)
        return await original(self, request)

    monkeypatch.setattr(ScriptedEngine, "run", run)
    yield release
    release.set()


def test_green_ci_before_qa_then_qa_pass_completes(
    gh: GitHubLoop, qa_held: threading.Event
) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    gh.deliver("issue_comment", gh.comment("/approve"))
    gh.post("issue_comment", gh.comment("/run-step"))
    deadline = time.monotonic() + 20
    while not any(r["name"] == "deksdenflow/qa-01" for r in gh.fake.check_runs.values()):
        assert time.monotonic() < deadline, "QA never started"
        time.sleep(0.05)
    # CI is green while QA is still running: recorded, no second QA job
    gh.ci_suite("success")
    answer = gh.post("workflow_run", gh.workflow_run(PROTOCOL, step_commit(gh, 1)))
    deadline = time.monotonic() + 20
    while gh.call(_delivery_status, gh, answer["id"]) in ("pending", "processing"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert statuses(gh) == [StepStatus.NEEDS_QA, StepStatus.PENDING]
    qa_held.set()
    gh.wait_idle()
    assert statuses(gh) == [StepStatus.COMPLETED, StepStatus.PENDING]
    assert [e.message for e in gh.events("qa.verdict")] == ["step 01: PASS"]  # QA ran once


async def _delivery_status(gh: GitHubLoop, delivery_id: int) -> str:
    from bot.storage.deliveries import load_delivery

    row = await load_delivery(gh.db, delivery_id)
    return "missing" if row is None else str(row.status)


def auto_to_completion(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    assert statuses(gh) == [
        StepStatus.NEEDS_QA,
        StepStatus.PENDING,
    ]  # executed, QA passed, waiting for CI
    gh.ci_green()
    assert statuses(gh) == [
        StepStatus.COMPLETED,
        StepStatus.NEEDS_QA,
    ]  # step 02 ran only once 01 was green
    gh.ci_green()
    assert gh.run().run.status == ProtocolStatus.COMPLETED


def test_red_ci_after_completion_reopens_the_protocol_to_blocked(gh: GitHubLoop) -> None:
    auto_to_completion(gh)
    out = red(gh, step_commit(gh, 2))
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "reopened"}
    state = gh.run()
    assert state.run.status == ProtocolStatus.BLOCKED
    assert statuses(gh) == [StepStatus.COMPLETED, StepStatus.BLOCKED]
    assert "CI failed on step 02 after it completed" in state.run.runtime_state["message"]
    assert step_of_event(gh, "ci.failure") == [2]
    # the status comment says so
    body = gh.fake.comments[1002]["body"]
    assert "step 02" in body and "blocked" in body
    # /retry 2 gets out of it
    gh.deliver("issue_comment", gh.comment("/retry 2"))
    assert gh.run().run.status == ProtocolStatus.RUNNING and statuses(gh)[1] == StepStatus.NEEDS_QA


def test_red_ci_on_an_earlier_step_blames_that_step(gh: GitHubLoop) -> None:
    auto_to_completion(gh)
    out = red(gh, step_commit(gh, 1))
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "reopened"}
    assert statuses(gh) == [StepStatus.BLOCKED, StepStatus.COMPLETED]
    assert step_of_event(gh, "ci.failure") == [1]
    # a human accepts it: every step is completed again, and so is the protocol
    gh.deliver("issue_comment", gh.comment("/approve 1"))
    assert (
        statuses(gh) == [StepStatus.COMPLETED, StepStatus.COMPLETED]
        and gh.run().run.status == ProtocolStatus.COMPLETED
    )


def repo_file(gh: GitHubLoop, path: str, content: str) -> None:
    """Commit a file to the repository's base branch (main) on the 'GitHub remote'."""
    seed = gh.origin.parent / f"seed-{gh.origin.name}"
    (seed / path).write_text(content)
    git("add", path, cwd=seed)
    git("commit", "-q", "-m", f"add {path}", cwd=seed)
    git("push", "-q", str(gh.origin), "main", cwd=seed)


def test_workflow_run_and_check_suite_of_one_failing_run_make_one_decision(gh: GitHubLoop) -> None:
    # the repository's policy: no automatic fix attempt, the first red CI asks a human
    repo_file(gh, ".deksdenflow.yml", "policies:\n  max_fix_attempts: 0\n")
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    assert [s.policy.get("loop") for s in gh.run().steps] == [None, None]
    gh.ci_green()
    assert statuses(gh) == [StepStatus.COMPLETED, StepStatus.NEEDS_QA]
    head = step_commit(gh, 2)
    first = red(gh, head, "workflow_run")
    assert first["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "block"}
    second = red(gh, head, "check_suite")
    assert second["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "duplicate"}
    # a commit status of the same run on the same sha: still the one decision
    third = gh.deliver("status", status_event(gh, head, "failure"))
    assert third["outcome"]["handled"][-1] == {"outcome": "duplicate"}
    state = gh.run()
    assert state.run.status == ProtocolStatus.BLOCKED and statuses(gh) == [
        StepStatus.COMPLETED,
        StepStatus.FAILED,
    ]
    # one decision, about step 02; step 01 (which passed) is never blamed
    assert step_of_event(gh, "ci.failure") == [2]
    assert step_of_event(gh, "ci.duplicate") == [2, 2]
    assert "step 01" not in state.run.runtime_state["message"]
    # a stale sha (the plan commit) is ignored with an event
    gh.ci_suite("failure")
    out = gh.deliver("workflow_run", gh.workflow_run(PROTOCOL, "f" * 40, "failure"))
    assert out["outcome"]["handled"][-1] == {"ignored": "not a step's commit"}
    assert len(gh.events("ci.stale")) == 1
    assert statuses(gh) == [StepStatus.COMPLETED, StepStatus.FAILED]


def test_green_ci_completing_the_protocol_edits_each_status_comment_once(gh: GitHubLoop) -> None:
    """The completion re-renders the status comments; the CI result that caused it does not
    edit them again right after (forge requests per step, issue #11)."""
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    gh.ci_green()
    assert statuses(gh) == [StepStatus.COMPLETED, StepStatus.NEEDS_QA]
    mark = gh.fake.mark()
    out = gh.ci_green()
    assert out["outcome"]["handled"][-1] == {"ci": "success", "outcome": "complete"}
    assert gh.run().run.status == ProtocolStatus.COMPLETED
    edits = [
        c.path for c in gh.fake.since(mark) if c.method == "PATCH" and "/issues/comments/" in c.path
    ]
    assert sorted(edits) == [f"{R}/issues/comments/1001", f"{R}/issues/comments/1002"]  # issue, PR
    assert all("— completed" in gh.fake.comments[int(p.rsplit("/", 1)[1])]["body"] for p in edits)
