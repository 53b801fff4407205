"""CI discovery with the real codex CLI against the fake model server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.git.onboarding import SETUP_BRANCH
from bot.jobs.onboard import project_onboard
from engines.codex import CodexEngine
from tests.fakes.codex_fixtures import FAKE_KEY_NAME, FakeCodex
from tests.fakes.fake_model import apply_patch_call, final, tool_then
from tests.gitutil import git
from tests.protocol.conftest import (
    Harness,
    commit_to_origin,
    make_harness,
    origin_file,
    protocol_settings,
)

pytestmark = pytest.mark.codex

PATCH = (
    "*** Begin Patch\n"
    "*** Update File: scripts/ci/test.sh\n"
    "@@\n"
    '-echo "test: nothing configured yet"\n'
    "+python3 -m pytest -q\n"
    "*** End Patch\n"
)


@pytest.fixture
async def codex_harness(
    tmp_path: Path, origin: Path, fake_codex: FakeCodex
) -> AsyncIterator[Harness]:
    settings = protocol_settings(
        tmp_path,
        engine="codex",
        codex_bin=fake_codex.codex_bin,
        protocol_discovery_model="gpt-5.5",
        engine_timeout_s=120,
    )
    engine = CodexEngine(
        fake_codex.codex_bin,
        codex_home=str(fake_codex.home),
        env_allow=[FAKE_KEY_NAME],
        base_env={**os.environ, **fake_codex.env},
    )
    async with make_harness(settings, origin) as h:
        h.use(engine)
        yield h


async def test_codex_discovery_fills_the_hooks_in_the_setup_pr(
    codex_harness: Harness, fake_codex: FakeCodex
) -> None:
    h = codex_harness
    commit_to_origin(
        h.origin, "main", {"pyproject.toml": "[project]\nname = 'x'\n"}, "python project"
    )
    server = fake_codex.server
    server.enqueue(
        tool_then(apply_patch_call(PATCH)),
        final("Detected a Python project; test.sh runs pytest."),
    )
    assert await project_onboard(h.ctx, project_id=h.project.id, run_discovery=True) == "ok"
    assert not server.unexpected and not server.errors and server.pending() == 0
    [request, *_] = server.response_requests()
    prompt = "\n".join(request.user_texts())
    assert "scripts/ci/test.sh" in prompt and "Detect the stack" in prompt
    hook = origin_file(h.origin, SETUP_BRANCH, "scripts/ci/test.sh")
    assert "python3 -m pytest -q" in hook and "nothing configured yet" not in hook
    assert git("ls-tree", SETUP_BRANCH, "scripts/ci/test.sh", cwd=h.origin).split()[0] == "100755"
    log = git("log", "--format=%s", f"main..{SETUP_BRANCH}", cwd=h.origin).splitlines()
    assert log[0] == "ci(setup): fill the CI hooks for the detected stack"
    assert git("diff", "--name-only", f"{SETUP_BRANCH}~1", SETUP_BRANCH, cwd=h.origin).split() == [
        "scripts/ci/test.sh"
    ]
