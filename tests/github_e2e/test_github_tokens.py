"""Fresh credentials for each git network command: installation tokens that expire after 60 s
(on a controllable clock) and an engine step that runs past that; the push gets a fresh token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bot.domain.states import StepStatus
from bot.forge.github import GitHubForge
from bot.git import cache, ops, resolve_auth
from bot.git.runner import Auth, run_git
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.github_e2e.conftest import GitHubLoop
from tests.github_e2e.fake_github import basic_token


class Clock:
    """Seconds since the epoch, moved on by the test instead of by waiting."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_push_after_a_long_engine_step_uses_a_fresh_token(
    monkeypatch: pytest.MonkeyPatch, loop_factory: Callable[..., GitHubLoop]
) -> None:
    clock = Clock()
    original_from_app: Callable[..., GitHubForge] = GitHubForge.from_app.__func__  # type: ignore[attr-defined]

    def from_app(cls: type[GitHubForge], /, **kwargs: Any) -> GitHubForge:
        # the bot's token cache runs on the same clock; renew 10 s before expiry
        return original_from_app(cls, clock=clock, token_margin=10.0, **kwargs)

    monkeypatch.setattr(GitHubForge, "from_app", classmethod(from_app))

    original_run = ScriptedEngine.run

    async def long_step(self: ScriptedEngine, request: EngineRequest) -> EngineResult:
        if request.phase == "execute":
            clock.advance(120)  # the agent works for two minutes: longer than a token lives
        return await original_run(self, request)

    monkeypatch.setattr(ScriptedEngine, "run", long_step)

    network: list[tuple[str, str, bool]] = []  # (git command, token, valid when used)
    original_git = run_git

    async def observed(args: Any, *, auth_header: Auth = None, **kwargs: Any) -> Any:
        header = await resolve_auth(auth_header)
        if header is not None:
            token = basic_token(header)
            network.append((str(args[0]), token, gh.fake.token_valid(token)))
        return await original_git(args, auth_header=header, **kwargs)

    monkeypatch.setattr(ops, "run_git", observed)  # push, ls-remote
    monkeypatch.setattr(cache, "run_git", observed)  # fetch

    gh = loop_factory()
    gh.fake.clock = clock
    gh.fake.token_ttl = 60
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    gh.deliver("issue_comment", gh.comment("/approve"))
    before = len(network)
    gh.deliver("issue_comment", gh.comment("/run-step"))
    state = gh.run()
    assert state.step(1).runtime_state.get("commit_sha"), "the step did not commit"
    assert (
        state.step(1).status == StepStatus.NEEDS_QA
    )  # executed, pushed, QA passed, waiting for CI
    step = network[before:]
    pushes = [(token, valid) for command, token, valid in step if command == "push"]
    fetches = [token for command, token, _ in step if command == "fetch"]
    assert pushes and fetches, step
    # every network command had a token valid at that moment …
    assert all(valid for _, _, valid in step), step
    # … and the step's push did not reuse the one its fetch used before the engine ran
    assert pushes[0][0] != fetches[0]
    assert gh.events("step.error") == []
