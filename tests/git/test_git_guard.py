"""The bot's git runs nothing an agent wrote: hooks, fsmonitor, swapped `.git` links, GIT_* env."""

from __future__ import annotations

import base64
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.git import (
    GitCache,
    SecretLeak,
    commit_all,
    head_sha,
    push,
    run_git,
    status_porcelain,
)
from bot.git.guard import (
    GitConfigError,
    GitLinkError,
    cache_worktree_of,
    check_worktree_link,
    config_problems,
)

Git = Callable[..., str]
Origin = Any
BRANCH = "0001-guarded"


def _script(path: Path, marker: Path) -> Path:
    """An executable that leaves `marker` (and the environment it saw) behind when run."""
    path.write_text(f"#!/bin/sh\nenv > {marker}\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


async def test_hooks_in_the_mirror_never_run(
    cache: GitCache, origin: Origin, tmp_path: Path, git: Git
) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    marker = tmp_path / "hook-ran"
    hooks = wt.mirror / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in ("post-commit", "pre-commit", "commit-msg", "post-checkout", "pre-push",
                 "reference-transaction", "post-index-change"):  # fmt: skip
        _script(hooks / name, marker)
    (wt.path / "new.txt").write_text("x\n")
    sha = await commit_all(wt.path, "add new", "Bot", "bot@example.invalid")
    assert sha is not None
    await push(wt.path, BRANCH, origin.url, None)
    await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("core.fsmonitor", "SCRIPT"),
        ("core.hooksPath", "HOOKS"),
        ("filter.evil.clean", "SCRIPT"),
        ("diff.evil.textconv", "SCRIPT"),
        ("include.path", "/elsewhere/config"),
        ("url.http://evil.invalid/.insteadOf", "ORIGIN"),
        ("remote.origin.url", "/elsewhere/repo.git"),
    ],
)
async def test_tampered_mirror_config_is_refused_and_runs_nothing(
    cache: GitCache, origin: Origin, tmp_path: Path, git: Git, key: str, value: str
) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    marker = tmp_path / "config-program-ran"
    script = _script(tmp_path / "prog.sh", marker)
    value = value.replace("SCRIPT", str(script)).replace("HOOKS", str(wt.mirror / "hooks"))
    git("config", key.replace("ORIGIN", ""), value.replace("ORIGIN", origin.url), cwd=wt.mirror)
    (wt.path / ".gitattributes").write_text("* filter=evil diff=evil\n")
    (wt.path / "a.txt").write_text("a\n")
    with pytest.raises(GitConfigError) as info:
        await commit_all(wt.path, "a", "Bot", "bot@example.invalid")
    assert key.split(".")[0].lower() in str(info.value).lower()
    with pytest.raises(GitConfigError):  # in the mirror itself too (fetch, push bookkeeping)
        await cache.ensure_mirror(origin.url)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["link-to-evil-repo", "directory", "symlink", "missing"])
async def test_a_swapped_git_link_is_refused(
    cache: GitCache, origin: Origin, tmp_path: Path, how: str, git: Git
) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    marker = tmp_path / "fsmonitor-ran"
    script = _script(tmp_path / "fsmonitor.sh", marker)
    evil = tmp_path / "evil"
    git("init", "-q", str(evil))
    git("config", "core.fsmonitor", str(script), cwd=evil)
    git("config", "core.hooksPath", str(tmp_path), cwd=evil)
    dotgit = wt.path / ".git"
    dotgit.unlink()
    if how == "link-to-evil-repo":
        dotgit.write_text(f"gitdir: {evil / '.git'}\n")
    elif how == "directory":
        shutil.copytree(evil / ".git", dotgit)
    elif how == "symlink":
        dotgit.symlink_to(evil / ".git")
    with pytest.raises(GitLinkError) as info:
        await status_porcelain(wt.path)
    assert str(wt.path) in str(info.value)
    with pytest.raises(GitLinkError):
        await commit_all(wt.path, "x", "Bot", "bot@example.invalid")
    # a subdirectory of the worktree is guarded too
    (wt.path / "src").mkdir(exist_ok=True)
    with pytest.raises(GitLinkError):
        await run_git(["status"], cwd=wt.path / "src")
    assert not marker.exists()
    # the next ensure_worktree rebuilds it from the branch instead of trusting it
    again = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert again.created and again.path == wt.path
    check_worktree_link(again.path, again.mirror)
    assert await head_sha(again.path) == again.head
    assert not marker.exists()


async def test_a_link_to_another_worktree_of_the_same_mirror_is_refused(
    cache: GitCache, origin: Origin
) -> None:
    one = await cache.ensure_worktree(origin.url, BRANCH, "main")
    two = await cache.ensure_worktree(origin.url, "0002-other", "main")
    (one.path / ".git").write_text((two.path / ".git").read_text())
    with pytest.raises(GitLinkError, match="registers another directory"):
        await head_sha(one.path)


async def test_paths_outside_the_cache_are_not_guarded(
    tmp_path: Path, cache: GitCache, git: Git
) -> None:
    plain = tmp_path / "plain"
    git("init", "-q", str(plain))
    assert cache_worktree_of(plain) is None
    await run_git(["status"], cwd=plain)


async def test_inherited_git_environment_is_ignored(
    cache: GitCache, origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    marker = tmp_path / "env-ran"
    script = _script(tmp_path / "prog.sh", marker)
    monkeypatch.setenv("GIT_EXTERNAL_DIFF", str(script))
    monkeypatch.setenv("GIT_PAGER", str(script))
    monkeypatch.setenv("GIT_SSH_COMMAND", str(script))
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))
    global_config = tmp_path / "gitconfig"
    global_config.write_text(f"[core]\n\tfsmonitor = {script}\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".gitconfig").write_text(global_config.read_text())
    (wt.path / "README.md").write_text("changed\n")
    await run_git(["diff", "HEAD"], cwd=wt.path)
    await commit_all(wt.path, "m", "Bot", "bot@example.invalid")
    assert not marker.exists()
    assert os.environ["GIT_DIR"]  # the worker's own environment is left alone


async def test_a_push_carrying_a_secret_is_refused_and_dropped(
    cache: GitCache, origin: Origin, git: Git, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "worker-only-value-7f3a9c"
    monkeypatch.setenv("GITHUB_TOKEN", secret)
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    start = wt.head
    (wt.path / "ok.txt").write_text("fine\n")
    await commit_all(wt.path, "fine", "Bot", "bot@example.invalid")
    (wt.path / "notes").mkdir()
    encoded = base64.b64encode(f"GITHUB_TOKEN={secret}\n".encode()).decode()
    (wt.path / "notes" / "env.b64").write_text(encoded + "\n")
    await commit_all(wt.path, "leak", "Bot", "bot@example.invalid")
    with pytest.raises(SecretLeak) as info:
        await push(wt.path, BRANCH, origin.url, None)
    assert "notes/env.b64" in str(info.value) and secret not in str(info.value)
    assert encoded not in str(info.value)
    # nothing reached the origin, and the worktree no longer holds the commits
    assert BRANCH not in git("for-each-ref", "--format=%(refname)", cwd=origin.bare)
    assert await head_sha(wt.path) == start
    assert not (wt.path / "notes").exists()


async def test_the_push_credential_itself_is_scanned_for(cache: GitCache, origin: Origin) -> None:
    token = "ghs_" + "Zx9" * 12
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    (wt.path / "t.txt").write_text(f"the token the push uses: {token[:-1]}\n{token}\n")
    await commit_all(wt.path, "t", "Bot", "bot@example.invalid")
    with pytest.raises(SecretLeak, match=r"t\.txt"):
        await push(wt.path, BRANCH, origin.url, f"Authorization: Bearer {token}")


def test_config_problems_is_pure_and_names_keys() -> None:
    name = "example.com-o-r-0000000000.git"
    assert config_problems([("core.bare", "true"), ("remote.origin.fetch", "+x:y")], name) == []
    assert config_problems([("Filter.x.clean", "evil")], name) == ["Filter.x.clean"]
    assert config_problems([("remote.origin.url", "https://example.com/o/r")], name) == [
        "remote.origin.url (not the mirror's own)"
    ]
