"""Pytest fixtures that point the real codex CLI at the fake model (import them in a conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from engines.codex import CodexEngine
from tests.fakes.fake_model import FakeModelServer, write_codex_home

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_KEY_NAME = "FAKE_MODEL_KEY"


def find_codex_bin() -> str | None:
    """DEKSDENFLOW_CODEX_BIN, then the project's node_modules, then a scratch install, then PATH."""
    configured = os.environ.get("DEKSDENFLOW_CODEX_BIN")
    if configured:
        return configured
    for candidate in (
        REPO_ROOT / "node_modules" / ".bin" / "codex",
        Path("/tmp/npmcodex/node_modules/.bin/codex"),
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("codex")


def init_git_repo(path: Path) -> Path:
    """A git repository with one commit, like a protocol worktree (codex wants a git repo)."""
    path.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    (path / "README.md").write_text("# test repo\n")
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "README.md"],
        ["commit", "-q", "-m", "init"],
    ):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)
    return path


@dataclass
class FakeCodex:
    """The real codex binary wired to a running FakeModelServer through its own CODEX_HOME."""

    server: FakeModelServer
    codex_bin: str
    home: Path
    # Pass as EngineRequest.env: the key name config.toml's env_key asks for.
    env: dict[str, str]

    def engine(
        self, *, config_overrides: Sequence[str] = (), kill_grace_s: float = 5.0
    ) -> CodexEngine:
        return CodexEngine(
            self.codex_bin,
            codex_home=str(self.home),
            config_overrides=config_overrides,
            kill_grace_s=kill_grace_s,
        )


@pytest.fixture(scope="session")
def codex_bin() -> str:
    found = find_codex_bin()
    if found is None:
        pytest.fail(
            "the codex CLI is not installed: run `npm install @openai/codex@0.169.0` in the "
            "project root or set DEKSDENFLOW_CODEX_BIN to the binary"
        )
    return found


@pytest.fixture
def fake_model() -> Iterator[FakeModelServer]:
    with FakeModelServer() as server:
        yield server


@pytest.fixture
def fake_codex(tmp_path: Path, codex_bin: str, fake_model: FakeModelServer) -> FakeCodex:
    home = write_codex_home(tmp_path / "codex-home", fake_model.base_url, env_key=FAKE_KEY_NAME)
    return FakeCodex(fake_model, codex_bin, home, {FAKE_KEY_NAME: "fake-key-for-tests"})


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    return init_git_repo(tmp_path / "repo")
