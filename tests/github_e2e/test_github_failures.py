"""A forge error that outlives its retries, on the GitHub fake with the product's DEFAULT
settings: the step fails and the protocol blocks, visibly, and /retry gets out of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bot.domain.states import ProtocolStatus, StepStatus
from bot.forge.github import GitHubForge
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.github_e2e.conftest import GitHubLoop
from tests.github_e2e.test_github_tokens import Clock
from tests.gitutil import git

PROTOCOL = "0001-add-a-greeting"
TOKENS = r"/app/installations/\d+/access_tokens"


def step_commits(gh: GitHubLoop) -> list[str]:
    subjects = git("log", "--format=%s", f"refs/heads/{PROTOCOL}", cwd=gh.origin).splitlines()
    return [s for s in subjects if "[protocol-0001/01]" in s]


def test_a_forge_error_that_outlives_its_retries_blocks_visibly_and_retry_recovers(
    monkeypatch: pytest.MonkeyPatch, loop_factory: Callable[..., GitHubLoop]
) -> None:
    clock = Clock()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:  # the client's backoff, recorded instead of slept
        sleeps.append(seconds)

    original_from_app: Callable[..., GitHubForge] = GitHubForge.from_app.__func__  # type: ignore[attr-defined]

    def from_app(cls: type[GitHubForge], /, **kwargs: Any) -> GitHubForge:
        return original_from_app(cls, clock=clock, token_margin=10.0, sleep=sleep, **kwargs)

    monkeypatch.setattr(GitHubForge, "from_app", classmethod(from_app))
    gh = loop_factory()
    gh.fake.clock = clock
    original_run = ScriptedEngine.run
    broken = [True]

    async def long_step(self: ScriptedEngine, request: EngineRequest) -> EngineResult:
        if request.phase == "execute" and broken[0]:
            # the turn outlives the installation token, and GitHub's token endpoint answers 502
            # to every attempt the client makes for the push
            broken[0] = False
            clock.advance(7200)
            for _ in range(3):
                gh.fake.fail_next("POST", TOKENS, 502, {"message": "Bad Gateway"})
        return await original_run(self, request)

    monkeypatch.setattr(ScriptedEngine, "run", long_step)
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    gh.deliver("issue_comment", gh.comment("/approve"))
    before = git("rev-parse", f"refs/heads/{PROTOCOL}", cwd=gh.origin).strip()
    gh.deliver("issue_comment", gh.comment("/run-step"))
    assert (
        len(gh.fake.requests("POST", TOKENS)) >= 4 and sleeps
    )  # three failed attempts, then one for the reply

    state = gh.run()
    assert (state.step(1).status, state.run.status) == (StepStatus.FAILED, ProtocolStatus.BLOCKED)
    reason = state.run.runtime_state["message"]
    assert reason.startswith("step 01 failed: ") and "\n" not in reason and "502" in reason, reason
    # nothing of the failed attempt reached the branch
    assert git("rev-parse", f"refs/heads/{PROTOCOL}", cwd=gh.origin).strip() == before
    # the reason is on the status comment and on the step's check run
    status = [
        c["body"]
        for c in gh.fake.comments.values()
        if "deksdenflow:status" in c["body"] and c["issue"] == 1
    ]
    assert len(status) == 1 and "blocked" in status[0] and reason in status[0]
    # the run opened in progress when the step started is ended with the failure, not left spinning
    step_runs = [r for r in gh.fake.check_runs.values() if r["name"] == "deksdenflow/step-01"]
    assert [(r["status"], r.get("conclusion")) for r in step_runs] == [("completed", "failure")]
    assert "502" in step_runs[0]["output"]["summary"] + step_runs[0]["output"].get("text", "")

    gh.deliver("issue_comment", gh.comment("/retry 1"))
    state = gh.run()
    # executed and QA'd; waiting for CI (the repository has workflows)
    assert (state.step(1).status, state.run.status) == (StepStatus.NEEDS_QA, ProtocolStatus.RUNNING)
    assert state.step(1).runtime_state["qa_verdict"] == "PASS"
    assert len(step_commits(gh)) == 1
