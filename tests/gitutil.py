"""Git helpers shared by the end-to-end tests: a pinned identity, `git()`, a bare origin."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    # the developer's own git config must not change what the tests see
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def make_origin(tmp_path: Path, readme: str = "# hello\n", name: str = "origin.git") -> Path:
    """A bare repository with one commit (README.md) on main: a forge repository's remote."""
    seed = tmp_path / f"seed-{name}"
    seed.mkdir()
    git("init", "-q", "-b", "main", cwd=seed)
    (seed / "README.md").write_text(readme)
    git("add", "README.md", cwd=seed)
    git("commit", "-q", "-m", "init", cwd=seed)
    bare = tmp_path / name
    git("clone", "-q", "--bare", str(seed), str(bare), cwd=tmp_path)
    return bare
