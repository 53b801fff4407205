"""Fixtures for the git layer tests: a local bare "origin" with history, and a git helper."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.git import GitCache

Git = Callable[..., str]

IDENT = {
    "GIT_AUTHOR_NAME": "Seeder",
    "GIT_AUTHOR_EMAIL": "seed@example.com",
    "GIT_COMMITTER_NAME": "Seeder",
    "GIT_COMMITTER_EMAIL": "seed@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
}


def _git(*args: str | Path, cwd: Path | None = None) -> str:
    res = subprocess.run(
        ["git", *map(str, args)],
        cwd=cwd,
        env={**os.environ, **IDENT},
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise AssertionError(f"git {args} failed: {res.stderr}")
    return res.stdout.strip()


@pytest.fixture
def git() -> Git:
    return _git


@dataclass
class Origin:
    """A bare repo standing in for GitHub, plus a clone of it to push "other people's" work."""

    url: str
    bare: Path
    seed: Path

    def commit(self, files: dict[str, str], message: str, branch: str = "main") -> str:
        _git("fetch", "-q", "--prune", "origin", cwd=self.seed)
        start = [f"origin/{branch}"] if _has(self.seed, f"origin/{branch}") else []
        _git("checkout", "-q", "-B", branch, *start, cwd=self.seed)
        for name, text in files.items():
            p = self.seed / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        _git("add", "-A", cwd=self.seed)
        _git("commit", "-q", "-m", message, cwd=self.seed)
        _git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=self.seed)
        _git("fetch", "-q", "origin", cwd=self.seed)
        return _git("rev-parse", "HEAD", cwd=self.seed)


def _has(repo: Path, rev: str) -> bool:
    try:
        _git("rev-parse", "--verify", "-q", rev, cwd=repo)
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="session")
def _origin_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("origin-template")
    bare, seed = root / "origin.git", root / "seed"
    _git("init", "-q", "--bare", "-b", "main", bare)
    _git("clone", "-q", bare, seed)
    o = Origin(url=str(bare), bare=bare, seed=seed)
    o.commit({"README.md": "hello\n", ".deksdenflow.yml": "qa: light\n"}, "initial")
    o.commit(
        {".protocols/0003-old-task/plan.md": "# old\n", "src/app.py": "print('hi')\n"},
        "second",
    )
    return root


@pytest.fixture
def origin(tmp_path: Path, _origin_template: Path) -> Origin:
    """A fresh copy per test of an origin with two commits on main (built once per session)."""
    bare, seed = tmp_path / "origin.git", tmp_path / "seed"
    shutil.copytree(_origin_template / "origin.git", bare, symlinks=True)
    shutil.copytree(_origin_template / "seed", seed, symlinks=True)
    _git("remote", "set-url", "origin", bare, cwd=seed)
    return Origin(url=str(bare), bare=bare, seed=seed)


@pytest.fixture
def cache(tmp_path: Path) -> GitCache:
    return GitCache(tmp_path / "data")
