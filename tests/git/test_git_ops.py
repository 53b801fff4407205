"""Job-level git operations: commit, push, history checks, base-branch reads, numbering."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bot.core.errors import GitError
from bot.git import (
    GitCache,
    StatusEntry,
    commit_all,
    has_commit_with_trailer,
    last_commit,
    list_remote_branches,
    log_messages,
    next_protocol_number,
    push,
    push_commits,
    read_file_at,
    remote_branch_sha,
    status_porcelain,
)

# conftest.py cannot be imported under --import-mode=importlib; these mirror its fixtures' types.
Git = Callable[..., str]
Origin = Any

BRANCH = "0004-new-feature"
MARKER = "[protocol-0004/02]"


async def test_commit_push_and_trailer_idempotency(
    cache: GitCache, origin: Origin, git: Git
) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert await commit_all(wt.path, "nothing", "Bot", "bot@example.com") is None
    assert await has_commit_with_trailer(wt.path, MARKER, "main") is None

    (wt.path / "src/feature.py").write_text("x = 1\n")
    (wt.path / "README.md").write_text("changed\n")
    message = f"feat(app): add feature {MARKER}\n\n# Notes\nbody line\n"
    sha = await commit_all(wt.path, message, "Bot", "bot@example.com")
    assert sha is not None and len(sha) == 40
    assert git("log", "-1", "--format=%an <%ae>|%cn", cwd=wt.path) == "Bot <bot@example.com>|Bot"
    info = await last_commit(wt.path)
    assert info.sha == sha
    assert info.message == message.strip()  # Markdown headings survive
    assert "src/feature.py" in info.stat and "2 files changed" in info.stat

    assert await has_commit_with_trailer(wt.path, MARKER, "main") == sha
    assert await has_commit_with_trailer(wt.path, "[protocol-0004/03]", "main") is None

    pushed = await push(wt.path, BRANCH, origin.url, None)
    assert pushed == sha == git("rev-parse", f"refs/heads/{BRANCH}", cwd=origin.bare)
    # The mirror learned about the push without a fetch.
    assert await remote_branch_sha(wt.mirror, BRANCH) == sha
    assert await remote_branch_sha(origin.url, BRANCH) == sha

    # A re-run after a crash: the worktree is rebuilt and the step commit is found, not redone.
    await cache.remove_worktree(origin.url, BRANCH)
    again = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert await has_commit_with_trailer(again.path, MARKER, "main") == sha
    assert await log_messages(again.path, "refs/remotes/origin/main..HEAD") == [message.strip()]


async def test_push_tells_heads_stat_as_last_commit_does(
    cache: GitCache, origin: Origin, git: Git
) -> None:
    """The push's secret scan already read HEAD's commit: its sha and stat come from there (no
    rev-parse, no show --stat), the same as git tells them; HEAD already on the remote: None."""
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    (wt.path / "src/first.py").write_text("a = 1\n")
    await commit_all(wt.path, "first\n\nbody", "Bot", "bot@example.com")
    deep = wt.path / "src" / "a-rather-long-directory-name" / "and-another-one-below-it"
    deep.mkdir(parents=True)
    (deep / "with_a_long_file_name_too.py").write_text("b = 2\n")
    (wt.path / "README.md").write_text("changed\n")
    sha = await commit_all(wt.path, "second\n---\nnot a stat | 1 +", "Bot", "bot@example.com")
    info = await last_commit(wt.path)

    pushed = await push_commits(wt.path, BRANCH, origin.url, None)
    assert pushed.sha == sha == git("rev-parse", f"refs/heads/{BRANCH}", cwd=origin.bare)
    assert pushed.head_stat == info.stat and "2 files changed" in info.stat

    again = await push_commits(wt.path, BRANCH, origin.url, None)
    assert (again.sha, again.head_stat) == (sha, None)


async def test_log_messages_newest_first(cache: GitCache, origin: Origin) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    for i in (1, 2):
        (wt.path / f"f{i}.txt").write_text(str(i))
        await commit_all(wt.path, f"step {i}\n\nbody {i}", "Bot", "bot@example.com")
    assert await log_messages(wt.path, "refs/remotes/origin/main..HEAD") == [
        "step 2\n\nbody 2",
        "step 1\n\nbody 1",
    ]
    with pytest.raises(GitError):
        await log_messages(wt.path, "--all")


async def test_status_porcelain(cache: GitCache, origin: Origin, git: Git) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert await status_porcelain(wt.path) == []
    (wt.path / "README.md").write_text("changed\n")
    (wt.path / "dir with space").mkdir()
    (wt.path / "dir with space/new.txt").write_text("n\n")
    git("mv", "src/app.py", "src/main.py", cwd=wt.path)
    entries = await status_porcelain(wt.path)
    assert StatusEntry(" M", "README.md") in entries
    assert StatusEntry("??", "dir with space/new.txt") in entries
    assert StatusEntry("R ", "src/main.py", "src/app.py") in entries


async def test_force_with_lease(cache: GitCache, origin: Origin, git: Git) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    (wt.path / "a.txt").write_text("a")
    await commit_all(wt.path, "a", "Bot", "bot@example.com")
    await push(wt.path, BRANCH, origin.url, None)
    # Someone else pushes to the branch; our amended history must not clobber it.
    origin.commit({"theirs.txt": "t"}, "theirs", branch=BRANCH)
    git("commit", "-q", "--amend", "-m", "a (amended)", cwd=wt.path)
    with pytest.raises(GitError):
        await push(wt.path, BRANCH, origin.url, None, force_with_lease=True)
    # Once we have seen their commit (fetched), the lease holds and the force push goes through.
    await cache.ensure_mirror(origin.url)
    sha = await push(wt.path, BRANCH, origin.url, None, force_with_lease=True)
    assert git("rev-parse", f"refs/heads/{BRANCH}", cwd=origin.bare) == sha


async def test_read_file_at_reads_the_base_branch_only(
    cache: GitCache, origin: Origin, git: Git
) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    (wt.path / ".deksdenflow.yml").write_text("qa: full\n")
    await commit_all(wt.path, "tamper with config", "Bot", "bot@example.com")
    await push(wt.path, BRANCH, origin.url, None)

    assert await read_file_at(wt.mirror, "main", ".deksdenflow.yml") == "qa: light\n"
    assert await read_file_at(wt.mirror, BRANCH, ".deksdenflow.yml") == "qa: full\n"
    assert await read_file_at(wt.mirror, "main", "missing.txt") is None
    assert await read_file_at(wt.mirror, "main", "src") is None  # a directory is not a file
    # A local branch named like the base must not shadow the remote's base branch.
    git("update-ref", "refs/heads/main", git("rev-parse", "HEAD", cwd=wt.path), cwd=wt.mirror)
    assert await read_file_at(wt.mirror, "main", ".deksdenflow.yml") == "qa: light\n"
    with pytest.raises(GitError):
        await read_file_at(wt.mirror, "no-such-branch", "README.md")


async def test_next_protocol_number_combines_sources(
    cache: GitCache, origin: Origin, git: Git
) -> None:
    mirror = await cache.ensure_mirror(origin.url)
    # Base branch has .protocols/0003-old-task.
    assert await next_protocol_number(mirror, "main", []) == 4
    assert await next_protocol_number(mirror, "main", ["0009-from-db", "junk"]) == 10

    origin.commit({"x.txt": "x"}, "protocol branch", branch="0007-remote-only")
    await cache.ensure_mirror(origin.url)
    assert await next_protocol_number(mirror, "main", ["0005-db"]) == 8
    assert await next_protocol_number(mirror, "main", ["0012-db"]) == 13
    # A directory on the base branch beats branches that were deleted after merging.
    origin.commit({".protocols/0020-merged/plan.md": "p"}, "merge protocol 20")
    await cache.ensure_mirror(origin.url)
    assert await next_protocol_number(mirror, "main", []) == 21


async def test_next_protocol_number_empty_repo(cache: GitCache, tmp_path: Any, git: Git) -> None:
    bare = tmp_path / "empty.git"
    git("init", "-q", "--bare", bare)
    mirror = await cache.ensure_mirror(str(bare))
    assert await next_protocol_number(mirror, "main", []) == 1


async def test_list_remote_branches(cache: GitCache, origin: Origin) -> None:
    origin.commit({"x.txt": "x"}, "side", branch="0002-x")
    mirror = await cache.ensure_mirror(origin.url)
    live = await list_remote_branches(origin.url)
    cached = await list_remote_branches(mirror)
    assert set(live) == {"main", "0002-x"}
    assert live == cached
    assert await remote_branch_sha(mirror, "nope") is None
    assert await remote_branch_sha(origin.url, "nope") is None
