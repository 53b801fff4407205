"""Mirrors and worktrees against a real local bare origin."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.core.errors import GitError
from bot.git import GitCache, head_sha, push, remote_ref

# conftest.py cannot be imported under --import-mode=importlib; these mirror its fixtures' types.
Git = Callable[..., str]
Origin = Any

BRANCH = "0004-new-feature"


async def test_mirror_created_then_refreshed(cache: GitCache, origin: Origin, git: Git) -> None:
    mirror = await cache.ensure_mirror(origin.url)
    assert mirror == cache.mirror_path(origin.url)
    assert mirror.parent == cache.data_dir / "mirrors"
    main = git("rev-parse", "refs/remotes/origin/main", cwd=mirror)
    assert main == git("rev-parse", "main", cwd=origin.bare)

    origin.commit({"new.txt": "x\n"}, "third")
    origin.commit({"f.txt": "y\n"}, "on a side branch", branch="side")
    await cache.ensure_mirror(origin.url)
    assert git("rev-parse", "refs/remotes/origin/main", cwd=mirror) == git(
        "rev-parse", "main", cwd=origin.bare
    )
    assert git("rev-parse", "refs/remotes/origin/side", cwd=mirror)

    git("push", "-q", "origin", ":side", cwd=origin.seed)
    await cache.ensure_mirror(origin.url)  # --prune drops the deleted branch
    assert "side" not in git("for-each-ref", "--format=%(refname)", cwd=mirror)
    assert not list(mirror.parent.glob("*.tmp-*"))


async def test_missing_remote_leaves_no_half_mirror(cache: GitCache, tmp_path: Path) -> None:
    url = str(tmp_path / "nope.git")
    with pytest.raises(GitError):
        await cache.ensure_mirror(url)
    assert not cache.mirror_path(url).exists()
    assert not list((cache.data_dir / "mirrors").glob("*.tmp-*"))


async def test_worktree_created_from_base(cache: GitCache, origin: Origin, git: Git) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert wt.created
    assert wt.path == cache.data_dir / "worktrees" / wt.path.parent.name / BRANCH
    assert (wt.path / "src/app.py").read_text() == "print('hi')\n"
    assert git("symbolic-ref", "HEAD", cwd=wt.path) == f"refs/heads/{BRANCH}"
    assert wt.head == git("rev-parse", "main", cwd=origin.bare) == await head_sha(wt.path)
    # No upstream configured: pushes always name their URL and ref explicitly.
    assert f"branch.{BRANCH}" not in git("config", "--list", cwd=wt.path)

    again = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert not again.created and again.path == wt.path and again.head == wt.head


async def test_unknown_base_is_an_error(cache: GitCache, origin: Origin) -> None:
    with pytest.raises(GitError, match="base branch"):
        await cache.ensure_worktree(origin.url, BRANCH, "develop")


async def test_deleted_worktree_rebuilt_from_pushed_branch(
    cache: GitCache, origin: Origin, git: Git
) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    (wt.path / "step1.txt").write_text("one\n")
    git("add", "-A", cwd=wt.path)
    git("commit", "-q", "-m", "step 1", cwd=wt.path)
    pushed = await push(wt.path, BRANCH, origin.url, None)
    assert git("rev-parse", f"refs/heads/{BRANCH}", cwd=origin.bare) == pushed

    shutil.rmtree(wt.path)  # the worker's disk was wiped, or another machine picks this up
    rebuilt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert rebuilt.created and rebuilt.head == pushed
    assert (rebuilt.path / "step1.txt").read_text() == "one\n"


async def test_other_worker_starts_from_pushed_branch(
    tmp_path: Path, origin: Origin, git: Git
) -> None:
    one, two = GitCache(tmp_path / "w1"), GitCache(tmp_path / "w2")
    wt1 = await one.ensure_worktree(origin.url, BRANCH, "main")
    (wt1.path / "a.txt").write_text("a\n")
    git("add", "-A", cwd=wt1.path)
    git("commit", "-q", "-m", "a", cwd=wt1.path)
    sha = await push(wt1.path, BRANCH, origin.url, None)

    wt2 = await two.ensure_worktree(origin.url, BRANCH, "main")
    assert wt2.head == sha and (wt2.path / "a.txt").exists()

    # Worker two moves the branch on; worker one's stale worktree catches up on reuse.
    (wt2.path / "b.txt").write_text("b\n")
    git("add", "-A", cwd=wt2.path)
    git("commit", "-q", "-m", "b", cwd=wt2.path)
    sha2 = await push(wt2.path, BRANCH, origin.url, None)
    again = await one.ensure_worktree(origin.url, BRANCH, "main")
    assert not again.created and again.head == sha2 and (again.path / "b.txt").exists()


async def test_unpushed_local_commit_survives_reuse(
    cache: GitCache, origin: Origin, git: Git
) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    await push(wt.path, BRANCH, origin.url, None)
    (wt.path / "c.txt").write_text("c\n")
    git("add", "-A", cwd=wt.path)
    git("commit", "-q", "-m", "crash before push", cwd=wt.path)
    local = git("rev-parse", "HEAD", cwd=wt.path)
    again = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert again.head == local


async def test_diverged_worktree_reset_to_remote(cache: GitCache, origin: Origin, git: Git) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    await push(wt.path, BRANCH, origin.url, None)
    remote = origin.commit({"r.txt": "remote\n"}, "remote work", branch=BRANCH)
    (wt.path / "l.txt").write_text("local\n")
    git("add", "-A", cwd=wt.path)
    git("commit", "-q", "-m", "local work", cwd=wt.path)
    again = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert again.head == remote
    assert (again.path / "r.txt").exists() and not (again.path / "l.txt").exists()


@pytest.mark.parametrize("damage", ["index", "locked", "gitfile", "emptydir"])
async def test_broken_worktree_is_rebuilt(
    cache: GitCache, origin: Origin, git: Git, damage: str
) -> None:
    """What a crash in the middle of `worktree add` (or a careless cleanup) leaves behind."""
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    admin = Path(git("rev-parse", "--path-format=absolute", "--git-dir", cwd=wt.path))
    if damage == "index":
        (admin / "index").unlink()
    elif damage == "locked":
        (admin / "locked").write_text("initializing")
    elif damage == "gitfile":
        (wt.path / ".git").unlink()
    else:
        shutil.rmtree(wt.path)
        wt.path.mkdir()
        (wt.path / "junk").write_text("x")
    # A leftover local branch with a commit the remote never saw must be reset.
    git(
        "update-ref",
        f"refs/heads/{BRANCH}",
        git("rev-parse", "HEAD~1", cwd=origin.bare),
        cwd=wt.mirror,
    )
    rebuilt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert rebuilt.created
    assert rebuilt.head == git("rev-parse", "main", cwd=origin.bare)
    assert (rebuilt.path / "README.md").exists() and not (rebuilt.path / "junk").exists()
    listed = git("worktree", "list", "--porcelain", cwd=wt.mirror)
    assert listed.count(f"worktree {rebuilt.path}") == 1
    assert "prunable" not in listed


async def test_concurrent_workers_on_one_machine(tmp_path: Path, origin: Origin) -> None:
    """Two processes' worth of caches on one data dir: the file lock serializes them."""
    a, b = GitCache(tmp_path / "data"), GitCache(tmp_path / "data")
    results = await asyncio.gather(
        a.ensure_worktree(origin.url, BRANCH, "main"),
        b.ensure_worktree(origin.url, BRANCH, "main"),
        a.ensure_worktree(origin.url, "0005-other", "main"),
        b.ensure_mirror(origin.url),
    )
    assert sorted(r.created for r in results[:2]) == [False, True]
    assert results[2].created


async def test_remove_worktree(cache: GitCache, origin: Origin, git: Git) -> None:
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    await cache.remove_worktree(origin.url, BRANCH)
    assert not wt.path.exists()
    assert BRANCH not in git("for-each-ref", cwd=wt.mirror)
    assert remote_ref("main") in git("for-each-ref", cwd=wt.mirror)


async def test_worktree_path_rejects_nested_names(cache: GitCache, origin: Origin) -> None:
    with pytest.raises(GitError):
        cache.worktree_path(origin.url, "a/b")
    with pytest.raises(GitError):
        await cache.ensure_worktree(origin.url, "--force", "main")


async def test_warm_spare_becomes_the_next_protocol_worktree(tmp_path: Path) -> None:
    """With spares on, the second protocol start takes the spare prepared after the first."""
    from bot.git.cache import GitCache as Cache
    from tests.gitutil import make_origin

    origin = make_origin(tmp_path)
    cache = Cache(tmp_path / "data", warm_spares=True)
    try:
        first = await cache.ensure_worktree(str(origin), "0001-a", "main")
        await cache.wait_spares()
        spare = cache.spare_path(str(origin))
        assert (spare / "README.md").exists()
        second = await cache.ensure_worktree(str(origin), "0002-b", "main")
        assert second.created and (second.path / "README.md").read_text() == "# hello\n"
        assert not spare.exists() or spare != second.path
        head = (second.path / ".git").read_text()
        assert "0002-b" in head or "worktrees" in head
        # the moved spare is a proper worktree on the new branch
        from bot.git.runner import run_git

        branch = (await run_git(["symbolic-ref", "--short", "HEAD"], cwd=second.path)).out.strip()
        assert branch == "0002-b"
        assert first.path != second.path
        await cache.wait_spares()
        # a broken spare is discarded and a fresh worktree made instead
        (cache.spare_path(str(origin)) / ".git").write_text("gitdir: /nowhere\n")
        third = await cache.ensure_worktree(str(origin), "0003-c", "main")
        assert (third.path / "README.md").exists()
    finally:
        await cache.aclose()


async def test_a_spare_is_registered_under_the_mirror_lock(tmp_path: Path) -> None:
    """While `worktree add` runs, the new worktree's HEAD is the null sha, and a fetch in the
    mirror then failed ("bad object worktrees/-spare1/HEAD", seen in CI): the spare's
    registration waits for the mirror lock, so no fetch runs beside it."""
    from bot.git.cache import GitCache as Cache
    from bot.git.locks import mirror_lock
    from tests.gitutil import make_origin

    origin = make_origin(tmp_path)
    cache = Cache(tmp_path / "data", warm_spares=True)
    try:
        first = await cache.ensure_worktree(str(origin), "0001-a", "main")
        async with mirror_lock(first.mirror):  # a fetch under way, say
            await asyncio.sleep(0.5)
            registered = sorted(p.name for p in (first.mirror / "worktrees").iterdir())
            assert len(registered) == 1, registered  # the protocol's worktree alone
        await cache.wait_spares()
        spare = cache.spare_path(str(origin))
        assert (spare / "README.md").read_text() == "# hello\n"  # the files came after
    finally:
        await cache.aclose()


@pytest.mark.parametrize("lost", ["config", "HEAD"])
async def test_half_deleted_mirror_is_rebuilt(
    cache: GitCache, origin: Origin, git: Git, lost: str
) -> None:
    """A disk wiped under a running git leaves half a mirror (a file gone, a directory re-made):
    the next job rebuilds it from the remote instead of refusing it for good."""
    mirror = await cache.ensure_mirror(origin.url)
    (mirror / lost).unlink()
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert (mirror / "HEAD").is_file() and (mirror / "config").is_file()
    assert git("rev-parse", "HEAD", cwd=wt.path) == git("rev-parse", "main", cwd=origin.bare)


def test_generation_marks_one_incarnation_of_the_cache(cache: GitCache) -> None:
    first = cache.generation()
    assert cache.generation() == first and not cache.lost_since(first)
    shutil.rmtree(cache.data_dir)  # the node lost its disk
    assert cache.lost_since(first)
    second = cache.generation()
    assert second != first and not cache.lost_since(second) and cache.lost_since(first)
    assert [p.name for p in cache.data_dir.iterdir()] == [".generation"]  # no temporary left


async def test_base_file_is_read_once_per_base_commit(
    cache: GitCache, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt override on the base branch: read at the commit the last ensure_worktree saw,
    from git once per commit; a new base commit (seen by the next ensure_worktree) is read anew.
    Before any ensure_worktree it is read at the branch's head."""
    import bot.git.ops as ops

    reads: list[str] = []
    real = ops.read_file_at

    async def counted(mirror: Any, ref: str, path: str) -> str | None:
        reads.append(ref)
        return await real(mirror, ref, path)

    monkeypatch.setattr(ops, "read_file_at", counted)
    origin.commit({"prompt.md": "one\n"}, "override")
    await cache.ensure_mirror(origin.url)
    assert await cache.base_file(origin.url, "main", "prompt.md", ops.read_file_at) == "one\n"
    assert reads == ["main"]

    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    for _ in range(3):
        assert await cache.base_file(origin.url, "main", "prompt.md", ops.read_file_at) == "one\n"
        assert await cache.base_file(origin.url, "main", "absent.md", ops.read_file_at) is None
    seen = reads[1]
    assert len(reads) == 3 and seen == (await head_sha(wt.path)) and len(seen) == 40

    second = origin.commit({"prompt.md": "two\n"}, "new override")
    assert (
        await cache.base_file(origin.url, "main", "prompt.md", ops.read_file_at) == "one\n"
    )  # not seen yet
    await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert await cache.base_file(origin.url, "main", "prompt.md", ops.read_file_at) == "two\n"
    assert reads[-1] == second

    # a fetch not followed by a look at this base (a graph step's worktree is cut from the
    # protocol branch): the note may be stale, so the branch's head is read again
    origin.commit({"prompt.md": "three\n"}, "newer override")
    await cache.ensure_mirror(origin.url)
    assert await cache.base_file(origin.url, "main", "prompt.md", ops.read_file_at) == "three\n"
    assert reads[-1] == "main"


async def test_base_file_falls_back_to_the_branch_when_the_commit_is_gone(
    cache: GitCache, origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bot.git.ops as ops

    origin.commit({"prompt.md": "one\n"}, "override")
    await cache.ensure_worktree(origin.url, BRANCH, "main")
    real = ops.read_file_at

    async def gone_at_shas(mirror: Any, ref: str, path: str) -> str | None:
        if len(ref) == 40:
            raise GitError(f"{ref!r} does not exist in {mirror}")
        return await real(mirror, ref, path)

    monkeypatch.setattr(ops, "read_file_at", gone_at_shas)
    assert await cache.base_file(origin.url, "main", "prompt.md", ops.read_file_at) == "one\n"


async def test_worktree_off_its_branch_is_rebuilt(
    cache: GitCache, origin: Origin, git: Git
) -> None:
    """A worktree whose HEAD left the protocol branch (detached by hand, another branch checked
    out) is not reused as if it were on it: it is rebuilt on the branch."""
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    again = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert (again.created, again.head) == (False, wt.head)
    git("checkout", "--quiet", "--detach", "HEAD~1", cwd=wt.path)
    rebuilt = await cache.ensure_worktree(origin.url, BRANCH, "main")
    assert rebuilt.created and rebuilt.head == git("rev-parse", "main", cwd=origin.bare)
    assert git("symbolic-ref", "HEAD", cwd=rebuilt.path) == f"refs/heads/{BRANCH}"


async def test_narrow_fetch_brings_the_branch_and_base_only(
    cache: GitCache, origin: Origin, git: Git
) -> None:
    """`narrow`: another protocol's new commits stay on the remote; the protocol's own branch,
    its `--NN` children and the base come, and a deleted one of them is pruned."""
    mirror = await cache.ensure_mirror(origin.url)
    origin.commit({"other.txt": "1\n"}, "another protocol", branch="0009-other")
    origin.commit({"c.txt": "1\n"}, "a child", branch=f"{BRANCH}--01")
    base = origin.commit({"base.txt": "1\n"}, "the base moved")

    # a new protocol: its branch does not exist on the remote yet, which must not fail the fetch
    wt = await cache.ensure_worktree(origin.url, BRANCH, "main", narrow=True)
    assert wt.created and wt.head == base
    refs = git("for-each-ref", "--format=%(refname)", cwd=mirror).split()
    assert remote_ref("main") in refs and remote_ref(f"{BRANCH}--01") in refs
    assert remote_ref("0009-other") not in refs  # not fetched

    pushed = origin.commit({"x.txt": "1\n"}, "someone pushed to the protocol branch", BRANCH)
    again = await cache.ensure_worktree(origin.url, BRANCH, "main", narrow=True)
    assert again.head == pushed and (again.path / "x.txt").exists()

    git("push", "-q", "origin", f":{BRANCH}--01", cwd=origin.seed)
    await cache.ensure_worktree(origin.url, BRANCH, "main", narrow=True)
    refs = git("for-each-ref", "--format=%(refname)", cwd=mirror).split()
    assert remote_ref(f"{BRANCH}--01") not in refs  # pruned under the pattern

    await cache.ensure_mirror(origin.url)  # a full fetch brings the rest
    assert remote_ref("0009-other") in git("for-each-ref", "--format=%(refname)", cwd=mirror)


async def test_narrow_fetch_with_an_unknown_base_is_still_that_error(
    cache: GitCache, origin: Origin
) -> None:
    with pytest.raises(GitError, match="base branch"):
        await cache.ensure_worktree(origin.url, BRANCH, "develop", narrow=True)
