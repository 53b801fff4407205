"""The on-disk cache: one bare mirror per repository and one worktree per protocol."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.core.errors import GitError
from bot.git.guard import GitLinkError, check_worktree_link
from bot.git.locks import mirror_lock
from bot.git.names import check_branch_name, normalize_remote, safe_repo_name
from bot.git.runner import Auth, run_git

log = logging.getLogger(__name__)

NETWORK_TIMEOUT = 900.0
LOCAL_TIMEOUT = 300.0
# Remote branches live under refs/remotes/origin/* in the mirror, not refs/heads/* as with
# `clone --mirror`: refs/heads/* holds the worktrees' protocol branches, which a mirror refspec
# would overwrite (fetch refuses to touch a checked-out branch) or prune before they are pushed.
REMOTE_PREFIX = "refs/remotes/origin/"
FETCH_REFSPEC = "+refs/heads/*:refs/remotes/origin/*"
GENERATION_FILE = ".generation"
# git's own housekeeping (`git maintenance run --auto`: packs loose objects once there are
# thousands) runs after every fetch and commit unless told not to: a process per step each. A
# mirror's objects are all its worktrees' too, so one fetch in this many does it for them all.
MAINTAIN_EVERY = 16
# for the commands that leave the housekeeping to the mirror's fetch
NO_MAINTENANCE = {"maintenance.auto": "false"}
FILE_CACHE_SIZE = 256  # base-branch files kept (prompt overrides: a few per repository)
# (mirror, ref, path) -> the file's text at ref, None if absent
FileReader = Callable[[Path, str, str], Awaitable[str | None]]


@dataclass(frozen=True)
class Worktree:
    """A protocol's checkout: where it is, which branch, and the commit it was left at."""

    path: Path
    branch: str
    mirror: Path
    head: str
    created: bool  # False: an existing healthy worktree was reused


def remote_ref(branch: str) -> str:
    """The mirror's copy of a remote branch (what other tools call `origin/<branch>`)."""
    return REMOTE_PREFIX + check_branch_name(branch)


def _gitdir_of(worktree: Path) -> Path | None:
    """The admin dir a linked worktree's `.git` file points to, if it is such a file."""
    try:
        text = (worktree / ".git").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("gitdir: "):
        return None
    gitdir = Path(text[len("gitdir: ") :].strip())
    return gitdir if gitdir.is_absolute() else (worktree / gitdir).resolve()


def _looks_complete(path: Path, mirror: Path) -> bool:
    """A linked worktree of `mirror` whose `worktree add` ran to the end."""
    gitdir = _gitdir_of(path)
    if gitdir is None or not gitdir.is_dir():
        return False
    try:
        common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
    except OSError:
        return False
    # `worktree add` writes the index last and drops its "initializing" lock at the end: a
    # missing index or a leftover lock means it was interrupted mid-checkout.
    return (
        common == mirror.resolve()
        and (gitdir / "index").is_file()
        and not (gitdir / "locked").exists()
    )


def _remove_worktree_files(mirror: Path, path: Path) -> None:
    """Delete the directory and unlock its registration so `worktree prune` can drop it."""
    admin_root = mirror / "worktrees"
    target = (path / ".git").resolve()
    if admin_root.is_dir():
        for admin in admin_root.iterdir():
            try:
                registered = Path((admin / "gitdir").read_text().strip()).resolve()
            except OSError:
                continue
            if registered == target:
                # prune skips locked entries; a lock on our own path can only be stale.
                (admin / "locked").unlink(missing_ok=True)
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


class GitCache:
    """Mirrors under `<data_dir>/mirrors/`, worktrees under `<data_dir>/worktrees/`."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        network_timeout: float = NETWORK_TIMEOUT,
        local_timeout: float = LOCAL_TIMEOUT,
        warm_spares: bool = False,
        credential_hosts: Collection[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        # `host[:port]` of the configured forges: the only places an auth header may go
        self.credential_hosts = frozenset(credential_hosts)
        self.network_timeout = network_timeout
        self.local_timeout = local_timeout
        # A spare worktree per repository, checked out in the background after each protocol
        # start, turns the next start into a rename plus a checkout of the few files that differ:
        # on a big repository writing every file is what a new worktree costs.
        self.warm_spares = warm_spares
        self._spare_tasks: dict[Path, asyncio.Task[None]] = {}
        # The base branch heads the last ensure_worktree saw, as (sha, the mirror's refresh
        # count then): a note holds until the mirror is fetched or rebuilt again. And files read
        # at those commits: a commit's files never change, so a step reads its prompt override
        # once per base commit instead of once per step.
        self._bases: dict[tuple[Path, str], tuple[str, int]] = {}
        self._fetches: dict[Path, int] = {}
        self._files: OrderedDict[tuple[Path, str, str], str | None] = OrderedDict()

    def generation(self) -> str:
        """A token naming this incarnation of the cache directory, created on first use.

        A job notes it when it starts. When the job fails and the token is gone or changed, the
        worker's disk was wiped under it (a node's emptyDir lost, a DATA_DIR deleted): the error
        says nothing about the step, and the job runs again on a rebuilt worktree.
        """
        marker = self.data_dir / GENERATION_FILE
        try:
            return marker.read_text()
        except (FileNotFoundError, NotADirectoryError):
            pass
        token = uuid.uuid4().hex
        tmp = marker.with_name(f"{GENERATION_FILE}.{token}")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(token)
            try:
                # link, not rename: of two jobs racing here the first token stays, the other reads
                # it
                os.link(tmp, marker)
            except FileExistsError:
                token = marker.read_text()
            finally:
                tmp.unlink(missing_ok=True)
        except OSError:
            # the directory is being wiped right now: an unstored token reads as "lost" later
            log.warning("could not record the generation of %s", self.data_dir, exc_info=True)
        return token

    def lost_since(self, generation: str) -> bool:
        """Whether the cache directory was wiped since `generation` was read."""
        try:
            return (self.data_dir / GENERATION_FILE).read_text() != generation
        except OSError:
            return True

    def spare_path(self, repo_url: str) -> Path:
        return self.data_dir / "worktrees" / safe_repo_name(repo_url) / ".spare"

    async def aclose(self) -> None:
        """Stop spare preparation (a half-made spare is discarded the next time it is looked at)."""
        tasks = list(self._spare_tasks.values())
        self._spare_tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_spares(self) -> None:
        """Wait until every scheduled spare is ready (benchmarks, tests)."""
        if self._spare_tasks:
            await asyncio.gather(*self._spare_tasks.values(), return_exceptions=True)

    def _schedule_spare(self, mirror: Path, spare: Path, start: str) -> None:
        if not self.warm_spares:
            return
        running = self._spare_tasks.get(spare)
        if running is not None and not running.done():
            return
        self._spare_tasks[spare] = asyncio.create_task(self._make_spare(mirror, spare, start))

    async def _make_spare(self, mirror: Path, spare: Path, start: str) -> None:
        try:
            if spare.exists():
                return
            spare.parent.mkdir(parents=True, exist_ok=True)
            # Registered under the mirror lock: while `worktree add` runs, the new worktree's
            # HEAD is a placeholder (the null sha), and a fetch in the mirror meanwhile failed
            # with "bad object worktrees/…/HEAD" (it reads every worktree's HEAD). Without its
            # files that takes milliseconds; the checkout of a big tree, which takes long and
            # touches only the spare's own index and files, comes after, outside the lock.
            async with mirror_lock(mirror):
                await run_git(
                    [
                        "worktree",
                        "add",
                        "--quiet",
                        "--no-checkout",
                        "--detach",
                        os.fspath(spare),
                        start,
                    ],
                    cwd=mirror,
                    timeout=self.local_timeout,
                )
            await run_git(["reset", "--quiet", "--hard"], cwd=spare, timeout=self.local_timeout)
        except GitError as exc:
            log.warning("could not prepare a spare worktree: %s", exc)

    async def _take_spare(
        self, mirror: Path, spare: Path, path: Path, branch: str, start: str
    ) -> bool:
        """Turn a ready spare into the protocol's worktree; False when there is none to take."""
        task = self._spare_tasks.get(spare)
        if task is not None and not task.done():
            return False  # still being checked out: a fresh `worktree add` is as fast
        existing = await self._inspect(spare, mirror)
        if existing is None or existing[1] != "HEAD":
            if spare.exists():
                await self._discard(mirror, spare)
            return False
        try:
            await run_git(
                ["worktree", "move", os.fspath(spare), os.fspath(path)],
                cwd=mirror,
                timeout=self.local_timeout,
            )
            # -f: the spare is ours and untouched; only the files that differ are written
            await run_git(
                ["checkout", "--quiet", "-f", "--no-track", "-B", branch, start],
                cwd=path,
                timeout=self.local_timeout,
            )
        except GitError as exc:
            log.warning("spare worktree unusable (%s); creating a fresh one", exc)
            for leftover in (spare, path):
                if leftover.exists():
                    await self._discard(mirror, leftover)
            return False
        return True

    def mirror_path(self, repo_url: str) -> Path:
        return self.data_dir / "mirrors" / f"{safe_repo_name(repo_url)}.git"

    def worktree_path(self, repo_url: str, protocol_branch: str) -> Path:
        name = check_branch_name(protocol_branch)
        if "/" in name:
            raise GitError(f"protocol branch {name!r} must be a single path component")
        return self.data_dir / "worktrees" / safe_repo_name(repo_url) / name

    async def ensure_mirror(
        self, repo_url: str, auth_header: Auth = None, *, fetch: bool = True
    ) -> Path:
        """Create the bare mirror if missing, else `fetch --prune` it (unless fetch=False)."""
        mirror = self.mirror_path(repo_url)
        async with mirror_lock(mirror):
            await self._ensure_mirror_locked(mirror, repo_url, auth_header, fetch=fetch)
        return mirror

    async def _ensure_mirror_locked(
        self,
        mirror: Path,
        repo_url: str,
        auth_header: Auth,
        *,
        fetch: bool,
        only: Sequence[str] = (),
    ) -> None:
        # refs may move now (a fetch, a rebuild): what was noted of them holds no longer
        self._fetches[mirror] = self._fetches.get(mirror, 0) + 1
        if (mirror / "HEAD").is_file() and (mirror / "config").is_file():
            if fetch:
                maintain = self._fetches[mirror] % MAINTAIN_EVERY == 0
                await self._fetch(mirror, auth_header, normalize_remote(repo_url), maintain, only)
            return
        if mirror.is_symlink() or mirror.exists():
            # Half a mirror: the disk was wiped under a running git (which re-creates the odd
            # directory or file it writes), or a wipe is still going on. git cannot use it and the
            # config guard would refuse it for good; the remote has everything, so build it anew.
            log.warning("rebuilding broken mirror %s", mirror)
            if mirror.is_symlink() or not mirror.is_dir():
                mirror.unlink()
            else:
                await asyncio.to_thread(shutil.rmtree, mirror, True)
        url = normalize_remote(repo_url)
        # Build under a temporary name and rename: a crash mid-clone never leaves a mirror that
        # looks complete but lacks objects or refs.
        for stale in mirror.parent.glob(mirror.name + ".tmp-*"):
            await asyncio.to_thread(shutil.rmtree, stale, True)
        tmp = mirror.with_name(f"{mirror.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            t = self.local_timeout
            await run_git(["init", "--quiet", "--bare", str(tmp)], timeout=t)
            await run_git(
                ["remote", "add", "--no-tags", "--end-of-options", "origin", url],
                cwd=tmp,
                timeout=t,
            )
            await run_git(["config", "remote.origin.fetch", FETCH_REFSPEC], cwd=tmp, timeout=t)
            await self._fetch(tmp, auth_header, url)
            tmp.rename(mirror)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            raise
        log.info("created mirror %s", mirror)

    async def _fetch(
        self,
        mirror: Path,
        auth_header: Auth,
        url: str,
        maintain: bool = True,
        only: Sequence[str] = (),
    ) -> None:
        """`fetch --prune` every branch, or with `only`, the branches named so and those whose
        names go on from them (a protocol branch's `--NN` children, say).

        A pattern, not the exact name: an exact refspec fails the whole fetch when the remote
        lacks the branch, and a new protocol's branch does not exist yet. Git refuses `*` in
        branch names, so a name cannot widen its own pattern. `--prune` then drops only the
        remote refs under these patterns; the mirror's other refs wait for a full fetch.
        """
        # --no-show-forced-updates: that check walks history on every forced update, which is
        # slow on big repositories and tells us nothing we use.
        argv = ["fetch", "--quiet", "--prune", "--no-tags", "--no-show-forced-updates", "origin"]
        argv.extend(f"+refs/heads/{name}*:{remote_ref(name)}*" for name in only)
        await run_git(
            argv,
            cwd=mirror,
            auth_header=auth_header,
            timeout=self.network_timeout,
            config={
                "advice.fetchShowForcedUpdates": "false",
                **({} if maintain else NO_MAINTENANCE),
            },
            remote=url,
            credential_hosts=self.credential_hosts,
        )

    async def ensure_worktree(
        self,
        repo_url: str,
        protocol_branch: str,
        base_branch: str,
        auth_header: Auth = None,
        *,
        fetch: bool = True,
        narrow: bool = False,
    ) -> Worktree:
        """The protocol's worktree, at the remote branch head (or created from the base).

        Idempotent and crash-safe: a healthy worktree is reused (fast-forwarded or reset to the
        remote branch when that moved); a missing or broken one is rebuilt from the pushed
        branch if the remote has it, else from `origin/<base>`.

        `narrow` fetches only the branch and the base (and the branches named after them), for
        a caller that reads no other remote branch: with many protocols pushing to one
        repository, a full fetch brings every other protocol's new commits on every step. (On
        the scale bench at 8 workers git took 0.12–0.16 s of a step's 0.29–0.34 s of CPU; with
        this and worktree affinity, 0.07–0.09 s of 0.23 s.)
        """
        branch = check_branch_name(protocol_branch)
        base = check_branch_name(base_branch)
        mirror = self.mirror_path(repo_url)
        path = self.worktree_path(repo_url, branch)
        async with mirror_lock(mirror):
            await self._ensure_mirror_locked(
                mirror, repo_url, auth_header, fetch=fetch, only=(branch, base) if narrow else ()
            )
            refs, head = await self._refs_and_head(mirror, path, branch, base)
            self._note_base(mirror, base, refs.get(remote_ref(base)))
            remote_sha = refs.get(remote_ref(branch))
            if head is not None:
                head = await self._reconcile(path, head, remote_sha)
                return Worktree(path, branch, mirror, head, created=False)
            if path.exists() or path.is_symlink():
                log.warning("rebuilding broken worktree %s", path)
                await self._discard(mirror, path)
            start = remote_sha or refs.get(remote_ref(base))
            if start is None:
                raise GitError(f"base branch {base!r} does not exist on the remote")
            spare = self.spare_path(repo_url)
            if not (
                self.warm_spares and await self._take_spare(mirror, spare, path, branch, start)
            ):
                await self._add(mirror, path, branch, start)
            base_sha = refs.get(remote_ref(base))
            if base_sha is not None:
                self._schedule_spare(mirror, spare, base_sha)
            return Worktree(path, branch, mirror, start, created=True)

    def _note_base(self, mirror: Path, base: str, sha: str | None) -> None:
        if sha is None:
            self._bases.pop((mirror, base), None)
        else:
            self._bases[(mirror, base)] = (sha, self._fetches.get(mirror, 0))

    def _base_seen(self, mirror: Path, base: str) -> str | None:
        """The base head noted since the mirror's last refresh here (a later fetch, say for a
        graph step's worktree that is cut from another branch, may have moved it)."""
        noted = self._bases.get((mirror, base))
        if noted is None or noted[1] != self._fetches.get(mirror, 0):
            return None
        return noted[0]

    async def base_file(
        self, repo_url: str, base_branch: str, path: str, read_file_at: FileReader
    ) -> str | None:
        """A file's text on the base branch as the last ensure_worktree here saw it (the commit
        the protocol's worktree came from, if no fetch came since), else at the branch's head
        now; None if absent.

        Read once per commit: the text of a path at a commit cannot change. `read_file_at` is
        `bot.git.ops.read_file_at`, passed in because ops builds on this module.
        """
        mirror = self.mirror_path(repo_url)
        sha = self._base_seen(mirror, base_branch)
        if sha is None:
            return await read_file_at(mirror, base_branch, path)
        key = (mirror, sha, path)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        try:
            text = await read_file_at(mirror, sha, path)
        except GitError:  # the commit is gone (a mirror rebuilt elsewhere): read the branch
            return await read_file_at(mirror, base_branch, path)
        self._files[key] = text
        while len(self._files) > FILE_CACHE_SIZE:
            self._files.popitem(last=False)
        return text

    async def remove_worktree(
        self, repo_url: str, protocol_branch: str, *, delete_branch: bool = True
    ) -> None:
        """Drop the worktree (and its local branch); the remote branch is left alone."""
        mirror = self.mirror_path(repo_url)
        path = self.worktree_path(repo_url, protocol_branch)
        if not (mirror / "HEAD").is_file():
            return
        async with mirror_lock(mirror):
            await self._discard(mirror, path)
            if delete_branch:
                await run_git(
                    ["update-ref", "-d", f"refs/heads/{protocol_branch}"],
                    cwd=mirror,
                    timeout=self.local_timeout,
                )

    async def _refs(self, repo: Path, names: list[str]) -> dict[str, str]:
        res = await run_git(
            ["for-each-ref", "--format=%(objectname) %(refname)", *names],
            cwd=repo,
            timeout=self.local_timeout,
        )
        wanted = set(names)
        out: dict[str, str] = {}
        for line in res.out.splitlines():
            sha, _, name = line.partition(" ")
            if name in wanted:  # for-each-ref also matches refs *below* a given name
                out[name] = sha
        return out

    async def _refs_and_head(
        self, mirror: Path, path: Path, branch: str, base: str
    ) -> tuple[dict[str, str], str | None]:
        """The remote branch and base heads, and the HEAD of the protocol's worktree when it is
        complete and on its branch (else None: it is to be rebuilt).

        One `for-each-ref` run in the worktree answers both (its refs are the mirror's, and
        %(HEAD) marks the branch the worktree's own HEAD names), where reading the mirror's refs
        and then asking the worktree for its HEAD took two git processes per step.
        """
        names = [remote_ref(branch), remote_ref(base)]
        local = f"refs/heads/{branch}"
        if not self._usable(path, mirror):
            return await self._refs(mirror, names), None
        res = await run_git(
            ["for-each-ref", "--format=%(objectname) %(HEAD) %(refname)", *names, local],
            cwd=path,
            timeout=self.local_timeout,
            check=False,
        )
        if res.returncode != 0:
            return await self._refs(mirror, names), None
        refs: dict[str, str] = {}
        head: str | None = None
        for line in res.out.splitlines():
            sha, _, rest = line.partition(" ")
            marker, name = rest[:1], rest[2:]
            if name in names:  # for-each-ref also matches refs *below* a given name
                refs[name] = sha
            elif name == local and marker == "*":
                head = sha
        return refs, head

    def _usable(self, path: Path, mirror: Path) -> bool:
        """A complete worktree of this mirror whose `.git` link is intact (checked both ways)."""
        if not _looks_complete(path, mirror):
            return False
        try:
            check_worktree_link(path, mirror)
        except GitLinkError as exc:
            # Tampered with (by the agent, or a crash): rebuilt from the pushed branch, never used.
            log.warning("%s", exc)
            return False
        return True

    async def _inspect(self, path: Path, mirror: Path) -> tuple[str, str] | None:
        """(HEAD sha, HEAD symref) of a complete worktree of this mirror, else None."""
        if not self._usable(path, mirror):
            return None
        res = await run_git(
            ["rev-parse", "--show-toplevel", "HEAD", "--symbolic-full-name", "HEAD"],
            cwd=path,
            timeout=self.local_timeout,
            check=False,
        )
        lines = res.out.splitlines()
        # Guard against a data_dir inside another repository: git would walk up and answer
        # for that one.
        if res.returncode != 0 or len(lines) != 3 or lines[0] != str(path):
            return None
        return lines[1], lines[2]

    async def _reconcile(self, path: Path, head: str, remote_sha: str | None) -> str:
        """Bring a reused worktree to the remote head; keep local commits not yet pushed."""
        if remote_sha is None or remote_sha == head:
            return head
        if await self._is_ancestor(path, remote_sha, head):
            # Commits made here but not pushed (a crash between commit and push): keep them so
            # the re-run finds its step commit by trailer and only pushes.
            return head
        # Behind (another worker pushed) or diverged: the remote branch is the truth.
        await run_git(
            ["reset", "--hard", "--quiet", remote_sha], cwd=path, timeout=self.local_timeout
        )
        return remote_sha

    async def _is_ancestor(self, repo: Path, older: str, newer: str) -> bool:
        res = await run_git(
            ["merge-base", "--is-ancestor", older, newer],
            cwd=repo,
            timeout=self.local_timeout,
            check=False,
        )
        if res.returncode not in (0, 1):
            raise GitError(f"merge-base failed: {res.err.strip()}")
        return res.returncode == 0

    async def _discard(self, mirror: Path, path: Path) -> None:
        """Delete a worktree directory and any registration of it, however broken."""
        await asyncio.to_thread(_remove_worktree_files, mirror, path)
        await run_git(["worktree", "prune"], cwd=mirror, timeout=self.local_timeout)

    async def _add(self, mirror: Path, path: Path, branch: str, start: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if (mirror / "worktrees").is_dir() and any((mirror / "worktrees").iterdir()):
            # A registration whose directory vanished (crash, manual rm) would make `add` refuse
            # the branch as "already checked out".
            await run_git(["worktree", "prune"], cwd=mirror, timeout=self.local_timeout)
        # -B resets a leftover local branch (from a crashed run) to the start point.
        await run_git(
            ["worktree", "add", "--quiet", "--no-track", "-B", branch, os.fspath(path), start],
            cwd=mirror,
            timeout=self.local_timeout,
        )
