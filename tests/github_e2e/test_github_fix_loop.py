"""The fix loop on the GitHub fake with the product's DEFAULT settings: red CI's evidence (check
run output, annotations and the Actions job log) reaches the next attempt's prompt, the fix
goes green and the protocol completes; the same failure twice stops and asks a human."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.domain.states import ProtocolStatus, StepStatus
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.conftest import GITHUB_SECRET
from tests.github_e2e.conftest import GitHubLoop
from tests.github_e2e.test_github_gaps import labeled

PROTOCOL = "0001-add-a-greeting"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "ci_logs"
ACTIONS = {"id": 15368, "slug": "github-actions", "name": "GitHub Actions"}


@pytest.fixture
def gh(loop_factory: Callable[..., GitHubLoop]) -> GitHubLoop:
    return loop_factory()


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EngineRequest]]:
    """Every request the (scripted) engine is given, prompts included."""
    seen: list[EngineRequest] = []
    original = ScriptedEngine.run

    async def run(self: ScriptedEngine, request: EngineRequest) -> EngineResult:
        seen.append(request)
        return await original(self, request)

    monkeypatch.setattr(ScriptedEngine, "run", run)
    yield seen


def executes(prompts: list[EngineRequest], step: int) -> list[str]:
    return [
        r.prompt for r in prompts if r.phase == "execute" and r.context.get("step_index") == step
    ]


def job_log(got: int) -> str:
    """The recorded Actions log, failing with `expected 3, got <got>`, and our secret echoed."""
    text = (SAMPLES / "github_actions_job.log").read_bytes().decode("utf-8")
    leak = f"2026-11-30T10:22:01.2674000Z HOOK_SECRET={GITHUB_SECRET}\r\n"
    text = text.replace("2026-11-30T10:22:01.2674930Z", leak + "2026-11-30T10:22:01.2674930Z", 1)
    return text.replace("got 4", f"got {got}")


def red_ci(gh: GitHubLoop, sha: str, got: int = 4) -> dict[str, Any]:
    """GitHub Actions fails on `sha`: a failed check run (output, an annotation, a job log)."""
    run_id = 70_000 + len(gh.fake.job_logs)
    gh.fake.check_runs[run_id] = {
        "id": run_id,
        "name": "ci",
        "head_sha": sha,
        "status": "completed",
        "conclusion": "failure",
        "app": ACTIONS,
        "output": {
            "title": "Process completed with exit code 1.",
            "summary": "",
            "text": None,
            "annotations_count": 1,
        },
    }
    gh.fake.annotations[run_id] = [
        {
            "path": "tests/test_greeting.py",
            "start_line": 14,
            "end_line": 14,
            "annotation_level": "failure",
            "title": "test_count",
            "message": f"AssertionError: expected 3, got {got}",
        },
    ]
    gh.fake.job_logs[run_id] = job_log(got)
    gh.ci_suite("failure", name="GitHub Actions")
    return gh.deliver("workflow_run", gh.workflow_run(PROTOCOL, sha, "failure"))


def step_commit(gh: GitHubLoop, index: int) -> str:
    sha: str = gh.run().step(index).runtime_state["commit_sha"]
    return sha


def check_titles(gh: GitHubLoop, name: str) -> list[str]:
    return [
        str(r.get("output", {}).get("title"))
        for r in gh.fake.check_runs.values()
        if r["name"] == name
    ]


def test_red_ci_log_reaches_the_next_attempt_and_the_fix_completes(
    gh: GitHubLoop, prompts: list[EngineRequest]
) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    # planning gave every step the default loop: at most 2 automatic fix attempts
    assert [s.policy["loop"]["max_iterations"] for s in gh.run().steps] == [2, 2]
    assert [s.status for s in gh.run().steps] == [
        StepStatus.NEEDS_QA,
        StepStatus.PENDING,
    ]  # QA passed, CI to come
    first = step_commit(gh, 1)
    assert "AssertionError" not in executes(prompts, 1)[0]

    out = red_ci(gh, first)
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "retry"}
    state = gh.run()
    step = state.step(1)
    assert (
        step.retries == 1 and step.status == StepStatus.NEEDS_QA
    )  # executed again and QA passed again
    # the second attempt was told why: the failing step's log, the annotation, the check output
    second = executes(prompts, 1)[1]
    assert "AssertionError: expected 3, got 4" in second
    assert "tests/test_greeting.py:14: AssertionError: expected 3, got 4" in second
    assert "Process completed with exit code 1." in second
    assert "Syncing repository" not in second  # only the step that failed, not the whole log
    # the log came through the redirect, and our token never went to the storage host
    assert gh.fake.log_downloads and all(auth is None for _, auth in gh.fake.log_downloads)
    assert gh.fake.requests("GET", r".*/actions/jobs/\d+/logs")
    # the worker's own secret never reaches the prompt or the database
    assert GITHUB_SECRET not in second and "HOOK_SECRET=[REDACTED" in second
    assert GITHUB_SECRET not in json.dumps(step.runtime_state)
    assert all(GITHUB_SECRET not in json.dumps(e.metadata_) for e in gh.events("ci.failure"))
    # each attempt is visible: the status comment and the step's check run
    body = gh.fake.comments[1002]["body"]
    assert "attempt 2/3: CI failed: ci: E AssertionError: expected N, got N" in body
    assert any("(attempt 2/3)" in t for t in check_titles(gh, "deksdenflow/step-01"))

    # the fix is green: the step completes, step 02 runs, green too: the protocol is done
    second_sha = step_commit(gh, 1)
    assert second_sha != first
    gh.ci_green(second_sha)
    assert [s.status for s in gh.run().steps] == [StepStatus.COMPLETED, StepStatus.NEEDS_QA]
    gh.ci_green()
    assert gh.run().run.status == ProtocolStatus.COMPLETED


def test_the_same_failure_twice_stops_and_asks_a_human(
    gh: GitHubLoop, prompts: list[EngineRequest]
) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    out = red_ci(gh, step_commit(gh, 1), got=4)
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "retry"}
    # attempt 2 fails the same way (other numbers, same failure): no third attempt
    out = red_ci(gh, step_commit(gh, 1), got=5)
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "block"}
    state = gh.run()
    assert state.run.status == ProtocolStatus.BLOCKED and state.step(1).status == StepStatus.FAILED
    digest = state.run.runtime_state["ci_fingerprints"]["1"]
    reason = state.run.runtime_state["message"]
    assert "CI failed the same way twice on step 01" in reason
    assert "ci: E AssertionError: expected N, got N" in reason and f"fingerprint {digest}" in reason
    assert "needs a human" in reason
    assert "CI failed the same way twice" in gh.fake.comments[1002]["body"]
    assert len(executes(prompts, 1)) == 2
    # the evidence stays with the step: a human's /retry with guidance sees both
    gh.deliver("issue_comment", gh.comment("/retry 1 count_words must split on any whitespace"))
    third = executes(prompts, 1)[2]
    assert "count_words must split on any whitespace" in third and "Guidance from @alice" in third
    assert "AssertionError: expected 3, got 5" in third


def test_a_log_that_cannot_be_fetched_leaves_the_rest_of_the_evidence(
    gh: GitHubLoop, prompts: list[EngineRequest]
) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    gh.fake.fail_next("GET", r".*/actions/jobs/\d+/logs", 500)
    out = red_ci(gh, step_commit(gh, 1))
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "retry"}
    second = executes(prompts, 1)[1]
    assert "Not available: the log of ci (GitHubHTTPError)." in second
    # the annotation and the check's output still came through
    assert "tests/test_greeting.py:14: AssertionError: expected 3, got 4" in second
    assert "Process completed with exit code 1." in second


def repo_file(gh: GitHubLoop, path: str, content: str) -> None:
    """Commit a file to the base branch (main) of the repository's 'GitHub remote'."""
    from tests.gitutil import git

    seed = gh.origin.parent / f"seed-{gh.origin.name}"
    (seed / path).write_text(content)
    git("add", path, cwd=seed)
    git("commit", "-q", "-m", f"add {path}", cwd=seed)
    git("push", "-q", str(gh.origin), "main", cwd=seed)


def test_repository_max_tokens_is_applied(gh: GitHubLoop) -> None:
    repo_file(gh, ".deksdenflow.yml", "policies:\n  max_tokens: 100\n")
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    state = gh.run()
    assert state.run.template_config["max_tokens"] == 100
    # planning alone used more than 100 tokens: the first step never starts
    assert state.run.status == ProtocolStatus.BLOCKED and [s.status for s in state.steps] == [
        StepStatus.PENDING,
        StepStatus.PENDING,
    ]
    assert "token budget" in state.run.runtime_state["message"]


def test_repository_policies_turn_the_ci_gate_off_and_set_qa(gh: GitHubLoop) -> None:
    repo_file(
        gh,
        ".deksdenflow.yml",
        "policies:\n  ci_gates: false\n  qa_policy: light\n  max_fix_attempts: 1\n",
    )
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    state = gh.run()
    assert [s.policy["qa"]["policy"] for s in state.steps] == ["light", "light"]
    assert [s.policy["loop"]["max_iterations"] for s in state.steps] == [1, 1]
    # QA alone gates although the repository has workflows: done without any CI result
    assert state.run.status == ProtocolStatus.COMPLETED
    out = red_ci(gh, step_commit(gh, 2))
    assert out["outcome"]["handled"][-1] == {"ci": "failure", "outcome": "recorded"}
    assert gh.run().run.status == ProtocolStatus.COMPLETED
