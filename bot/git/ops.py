"""What a job does with git: commit, push, inspect history, read the base branch, number
protocols."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from bot.core.errors import GitError
from bot.domain.secrets_scan import Finding, SecretScanner, process_scanner
from bot.git.cache import (
    LOCAL_TIMEOUT,
    NETWORK_TIMEOUT,
    NO_MAINTENANCE,
    REMOTE_PREFIX,
    remote_ref,
)
from bot.git.guard import GitRefused, cache_worktree_of, mirror_config_value
from bot.git.locks import mirror_lock
from bot.git.names import check_branch_name, normalize_remote, parse_protocol_number
from bot.git.runner import Auth, GitCommandFailed, resolve_auth, run_git, secrets_of

StrPath = str | os.PathLike[str]
PROTOCOLS_DIR = ".protocols"
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_NOTHING_TO_COMMIT = re.compile(r"^(nothing|no changes) (added )?to commit", re.MULTILINE)
# commit's summary line, `[branch 0123…] subject` (`[branch (root-commit) …]`, `[detached HEAD …]`),
# with the full sha when core.abbrev=no
_COMMITTED = re.compile(r"^\[.*? ([0-9a-f]{40}(?:[0-9a-f]{24})?)\] ", re.MULTILINE)
_MISSING_PATH = re.compile(r"does not exist in|exists on disk, but not in|bad file")


class SecretLeak(GitRefused):
    """A push was refused: the commits to push hold a secret. Names files, never values."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        places = sorted({f.where for f in findings})
        kinds = sorted({f.kind for f in findings})
        shown = ", ".join(places[:10]) + (
            f" and {len(places) - 10} more" if len(places) > 10 else ""
        )
        super().__init__(
            f"push blocked: {' / '.join(kinds)} found in {shown}; nothing was pushed and the "
            "commits were dropped from the worktree"
        )


@dataclass(frozen=True)
class StatusEntry:
    """One line of `git status --porcelain`: XY code, path, and the old path for renames."""

    code: str
    path: str
    orig_path: str | None = None


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    message: str
    stat: str


async def head_sha(worktree: StrPath) -> str:
    res = await run_git(
        ["rev-parse", "--verify", "HEAD^{commit}"], cwd=worktree, timeout=LOCAL_TIMEOUT
    )
    return res.out.strip()


async def commit_all(
    worktree: StrPath, message: str, author_name: str, author_email: str
) -> str | None:
    """Stage everything and commit; the new sha, or None when there was nothing to commit."""
    await run_git(["add", "--all"], cwd=worktree, timeout=LOCAL_TIMEOUT)
    ident = {
        "GIT_AUTHOR_NAME": author_name,
        "GIT_AUTHOR_EMAIL": author_email,
        "GIT_COMMITTER_NAME": author_name,
        "GIT_COMMITTER_EMAIL": author_email,
    }
    # The message goes through a file: it can exceed the per-argument limit of a command line.
    # --cleanup=whitespace keeps Markdown `#` headings that the default mode would strip.
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".msg", delete=False) as fh:
        fh.write(message)
    try:
        # No `diff --cached --quiet` first (a git process per step): with nothing staged, commit
        # exits 1 and says so (in English: the runner sets LC_ALL=C). Not --quiet: the summary
        # line names the new commit (in full with core.abbrev=no), so no `rev-parse` after it;
        # --no-status spares the status listing of the editor template.
        res = await run_git(
            ["commit", "--no-status", "--no-verify", "--cleanup=whitespace", "-F", fh.name],
            cwd=worktree,
            env=ident,
            # housekeeping: the mirror's fetch does it (bot.git.cache.MAINTAIN_EVERY)
            config={
                "commit.gpgsign": "false",
                "core.abbrev": "no",
                "diff.renames": "false",  # the summary's stat: no rename search
                **NO_MAINTENANCE,
            },
            timeout=LOCAL_TIMEOUT,
            check=False,
        )
    finally:
        os.unlink(fh.name)
    if res.returncode == 1 and _NOTHING_TO_COMMIT.search(res.out):
        return None
    if res.returncode != 0:
        raise GitCommandFailed(
            res.argv, res.returncode, res.err.strip()[-2000:] or res.out.strip()[-2000:]
        )
    made = _COMMITTED.search(res.out)
    return made.group(1) if made else await head_sha(worktree)


async def _git_common_dir(worktree: StrPath) -> Path:
    res = await run_git(
        ["rev-parse", "--path-format=absolute", "--git-common-dir"],
        cwd=worktree,
        timeout=LOCAL_TIMEOUT,
    )
    return Path(res.out.strip())


async def _origin_of(worktree: StrPath) -> tuple[Path, str | None]:
    """The repository holding the worktree's refs, and its `origin` URL.

    A worktree of the git cache: both come from the cache's layout and the config its guard
    already parsed (no git process; the push's guard checked the link and the config). Any
    other checkout: asked of git.
    """
    found = cache_worktree_of(worktree)
    if found is not None:
        return found[1], await mirror_config_value(found[1], "remote.origin.url")
    mirror = await _git_common_dir(worktree)
    origin = await run_git(
        ["config", "--get", "remote.origin.url"], cwd=mirror, timeout=LOCAL_TIMEOUT, check=False
    )
    return mirror, origin.out.strip() if origin.returncode == 0 else None


@dataclass(frozen=True)
class Pushed:
    """What a push sent: the sha, and HEAD's `--stat` lines (as `last_commit` has them) when
    HEAD was among the commits sent (None: HEAD was on the remote already)."""

    sha: str
    head_stat: str | None


async def push(
    worktree: StrPath,
    branch: str,
    remote_url: str,
    auth_header: Auth,
    *,
    force_with_lease: bool = False,
    credential_hosts: Collection[str] = (),
) -> str:
    """Push HEAD to `refs/heads/<branch>` at `remote_url`; return the pushed sha.

    Afterwards the mirror's `origin/<branch>` is set to it, so ensure_worktree on this machine
    sees the push without another fetch (other machines fetch before they act).
    """
    pushed = await push_commits(
        worktree,
        branch,
        remote_url,
        auth_header,
        force_with_lease=force_with_lease,
        credential_hosts=credential_hosts,
    )
    return pushed.sha


async def push_commits(
    worktree: StrPath,
    branch: str,
    remote_url: str,
    auth_header: Auth,
    *,
    force_with_lease: bool = False,
    credential_hosts: Collection[str] = (),
) -> Pushed:
    """push(), also telling what HEAD's commit changed: the secret scan already read it."""
    ref = remote_ref(branch)
    url = normalize_remote(remote_url)
    # Nothing secret leaves: what the agent wrote (or echoed into a report) is pushed only
    # after a scan for every secret this process holds, the push's own credential included.
    # the header is asked for once, right before the push (fresh), and scanned for too
    header = await resolve_auth(auth_header)
    out = await outgoing(worktree, process_scanner(secrets_of(header)))
    if out.findings:
        await _drop_outgoing(worktree)
        raise SecretLeak(out.findings)
    # the scan listed HEAD first when it is outgoing; else HEAD is on the remote already
    sha = out.head or await head_sha(worktree)
    args = ["push", "--quiet", "--no-verify", "--porcelain"]
    if force_with_lease:
        # The lease is what we last saw of the remote branch; nothing seen = it must not exist.
        seen = await _resolve(worktree, ref)
        args.append(f"--force-with-lease=refs/heads/{branch}:{seen or ''}")
    args += ["--end-of-options", url, f"{sha}:refs/heads/{check_branch_name(branch)}"]
    await run_git(
        args,
        cwd=worktree,
        auth_header=header,
        timeout=NETWORK_TIMEOUT,
        remote=url,
        credential_hosts=credential_hosts,
    )
    mirror, origin = await _origin_of(worktree)
    if origin == url:
        async with mirror_lock(mirror):
            await run_git(["update-ref", ref, sha], cwd=mirror, timeout=LOCAL_TIMEOUT)
    return Pushed(sha, out.head_stat)


# The commits a push would send: reachable from HEAD, not from anything the remote had.
_OUTGOING = ["HEAD", "--not", f"--glob={REMOTE_PREFIX}*", "--"]
# `log -p --stat`: each commit's stat comes after this line, then its diff
_STAT_START = "\n---\n"


@dataclass(frozen=True)
class Outgoing:
    """The commits a push would send, as the secret scan read them."""

    findings: list[Finding]
    head: str | None  # HEAD's sha when HEAD is among them (the log lists it first)
    head_stat: str | None  # HEAD's `--stat` lines, as last_commit() has them


async def outgoing(worktree: StrPath, scanner: SecretScanner) -> Outgoing:
    """Secrets in the commits HEAD has that the remote had not (added lines, paths, messages),
    with HEAD's sha and stat read from the same `git log` (a push needs both: no `rev-parse`
    and no `show --stat` after it)."""
    res = await run_git(
        ["-c", "core.quotePath=false", "log", "-p", "--stat", "--text", "--no-ext-diff",
         "--no-textconv", "--no-color", "--no-renames", "--format=%x00%H%n%B%x00", *_OUTGOING],
        cwd=worktree,
        timeout=LOCAL_TIMEOUT,
    )  # fmt: skip
    text = res.stdout.decode("utf-8", "replace")
    head, stat = _head_of_log(text)
    return Outgoing(scan_log_patch(text, scanner), head, stat)


def _head_of_log(text: str) -> tuple[str | None, str | None]:
    """(sha, stat lines) of the first commit in `log -p --stat --format=%x00%H%n%B%x00` (pure)."""
    parts = text.split("\0", 3)
    if len(parts) < 3:
        return None, None
    sha = parts[1].partition("\n")[0].strip()
    body = parts[2]
    diff = body.find("\ndiff --git ")
    stat = body if diff < 0 else body[:diff]
    if stat.startswith(_STAT_START):
        stat = stat[len(_STAT_START) :]
    return sha or None, stat.strip("\n")


def scan_log_patch(text: str, scanner: SecretScanner) -> list[Finding]:
    """Findings in `git log -p --format=%x00%H%n%B%x00` output (pure)."""
    added: dict[str, list[str]] = {}
    findings: list[Finding] = []
    parts = text.split("\0")
    # parts: [diff-before-first, sha+message, diff, sha+message, diff, ...]
    for n, part in enumerate(parts):
        if n % 2 == 1:
            sha, _, message = part.partition("\n")
            findings += scanner.scan(message, f"the message of commit {sha[:12]}")
            continue
        current: str | None = None
        for line in part.splitlines():
            if line.startswith("diff --git "):
                current = line.split(" b/", 1)[-1] if " b/" in line else line[len("diff --git ") :]
                added.setdefault(current, [current])  # the path itself may carry a secret
            elif line.startswith("+++ ") or line.startswith("--- "):
                continue
            elif line.startswith("+") and current is not None:
                added[current].append(line[1:])
    for path, lines in added.items():
        # Joined without newlines too: `base64` wraps its output at 76 columns.
        kinds = set(scanner.kinds_in("\n".join(lines))) | set(scanner.kinds_in("".join(lines)))
        findings += [Finding(kind, path) for kind in sorted(kinds)]
    return findings


async def _drop_outgoing(worktree: StrPath) -> None:
    """Reset the worktree to where the outgoing commits started, so no retry can push them."""
    res = await run_git(["rev-list", "--reverse", *_OUTGOING], cwd=worktree, timeout=LOCAL_TIMEOUT)
    commits = res.out.split()
    if not commits:
        return
    parent = await _resolve(worktree, f"{commits[0]}^")
    if parent is not None:
        await run_git(["reset", "--hard", "--quiet", parent], cwd=worktree, timeout=LOCAL_TIMEOUT)


async def _resolve(repo: StrPath, rev: str) -> str | None:
    res = await run_git(
        ["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=repo,
        timeout=LOCAL_TIMEOUT,
        check=False,
    )
    return res.out.strip() if res.returncode == 0 else None


async def list_remote_branches(
    source: StrPath, *, auth_header: Auth = None, credential_hosts: Collection[str] = ()
) -> dict[str, str]:
    """Branch name -> sha on the remote.

    `source` as a Path (a mirror or one of its worktrees) reads the mirror's view as of its last
    fetch; as a str it is a remote URL (or local path) asked live with `git ls-remote`.
    """
    if isinstance(source, os.PathLike):
        res = await run_git(
            ["for-each-ref", "--format=%(objectname) %(refname)", REMOTE_PREFIX],
            cwd=source,
            timeout=LOCAL_TIMEOUT,
        )
        prefix = REMOTE_PREFIX
    else:
        url = normalize_remote(source)
        res = await run_git(
            ["ls-remote", "--heads", "--end-of-options", url],
            auth_header=auth_header,
            timeout=NETWORK_TIMEOUT,
            remote=url,
            credential_hosts=credential_hosts,
        )
        prefix = "refs/heads/"
    out: dict[str, str] = {}
    for line in res.out.splitlines():
        sha, _, name = line.replace("\t", " ").partition(" ")
        if name.startswith(prefix) and name != REMOTE_PREFIX + "HEAD":
            out[name[len(prefix) :]] = sha
    return out


async def remote_branch_sha(
    source: StrPath,
    branch: str,
    *,
    auth_header: Auth = None,
    credential_hosts: Collection[str] = (),
) -> str | None:
    """The remote branch's sha, or None; `source` as in list_remote_branches."""
    check_branch_name(branch)
    if isinstance(source, os.PathLike):
        return await _resolve(source, remote_ref(branch))
    branches = await list_remote_branches(
        source, auth_header=auth_header, credential_hosts=credential_hosts
    )
    return branches.get(branch)


def _base_rev(ref: str) -> str:
    """Branch names mean the remote's branch, never a local ref that shares the name."""
    if ref.startswith("refs/") or _SHA.match(ref):
        return ref
    return remote_ref(ref)


async def read_file_at(mirror: StrPath, ref: str, path: str) -> str | None:
    """A file's text at `ref` (a branch name = the remote branch) without a checkout; None if
    absent."""
    rev = _base_rev(ref)
    res = await run_git(
        ["cat-file", "blob", f"{rev}:{path.lstrip('/')}"],
        cwd=mirror,
        timeout=LOCAL_TIMEOUT,
        check=False,
    )
    if res.returncode == 0:
        return res.stdout.decode("utf-8", "replace")
    # git says a path is missing only once the revision resolved (`path 'x' does not exist in
    # 'main'`): one command for the usual answers; a step reads a prompt override on every run
    if _MISSING_PATH.search(res.err):
        return None
    if await _resolve(mirror, rev) is None:
        raise GitError(f"{ref!r} does not exist in {mirror}")
    raise GitError(f"cannot read {path!r} at {ref!r}: {res.err.strip()}")


async def status_porcelain(worktree: StrPath) -> list[StatusEntry]:
    res = await run_git(
        ["status", "--porcelain=v1", "-z", "--untracked-files=all"],
        cwd=worktree,
        timeout=LOCAL_TIMEOUT,
    )
    fields = res.stdout.decode("utf-8", "surrogateescape").split("\0")
    entries: list[StatusEntry] = []
    i = 0
    while i < len(fields):
        item = fields[i]
        i += 1
        if len(item) < 4:
            continue
        code, path = item[:2], item[3:]
        if code[0] in "RC":  # -z puts the rename/copy source in the next field
            entries.append(StatusEntry(code, path, fields[i] if i < len(fields) else None))
            i += 1
        else:
            entries.append(StatusEntry(code, path))
    return entries


async def last_commit(worktree: StrPath) -> CommitInfo:
    res = await run_git(
        ["show", "--stat", "--format=%H%x00%B%x00", "HEAD"], cwd=worktree, timeout=LOCAL_TIMEOUT
    )
    sha, message, stat = res.out.split("\0", 2)
    return CommitInfo(sha.strip(), message.strip(), stat.strip("\n"))


async def log_messages(worktree: StrPath, rev_range: str) -> list[str]:
    """Full commit messages in `rev_range` (e.g. `origin/main..HEAD`), newest first."""
    res = await run_git(
        ["log", "-z", "--format=%B", _range(rev_range), "--"], cwd=worktree, timeout=LOCAL_TIMEOUT
    )
    return [m.strip() for m in res.out.split("\0") if m.strip()]


def _range(rev_range: str) -> str:
    if rev_range.startswith("-"):
        raise GitError(f"unacceptable revision range {rev_range!r}")
    return rev_range


async def has_commit_with_trailer(
    worktree: StrPath, marker: str, base_branch: str | None = None
) -> str | None:
    """The newest commit in `origin/<base>..HEAD` whose message contains `marker`, or None.

    Returns the sha (truthy) so a re-run after a crash can push it instead of committing again.
    Without a base the whole history of HEAD is searched.
    """
    rev = f"{remote_ref(base_branch)}..HEAD" if base_branch else "HEAD"
    res = await run_git(
        ["log", "--format=%H", "--fixed-strings", f"--grep={marker}", rev, "--"],
        cwd=worktree,
        timeout=LOCAL_TIMEOUT,
    )
    lines = res.out.split()
    return lines[0] if lines else None


async def next_protocol_number(
    mirror: StrPath, base_branch: str, known_names_from_db: Iterable[str]
) -> int:
    """1 + the highest NNNN among `.protocols/NNNN-*` on the base branch, remote (and local)
    `NNNN-*` branches, and names the database knows. Two workers may still pick the same number:
    the database's unique constraint decides, and the loser asks again.
    """
    base = remote_ref(check_branch_name(base_branch))
    res = await run_git(
        ["for-each-ref", "--format=%(refname)", REMOTE_PREFIX, "refs/heads/"],
        cwd=mirror,
        timeout=LOCAL_TIMEOUT,
    )
    refs = res.out.splitlines()
    names = [r.removeprefix(REMOTE_PREFIX).removeprefix("refs/heads/") for r in refs]
    names += list(known_names_from_db)
    if base in refs:
        tree = await run_git(
            ["ls-tree", "-d", "-z", "--name-only", base, "--", f"{PROTOCOLS_DIR}/"],
            cwd=mirror,
            timeout=LOCAL_TIMEOUT,
        )
        names += [p.rsplit("/", 1)[-1] for p in tree.out.split("\0") if p]
    numbers = [n for n in map(parse_protocol_number, names) if n is not None]
    return max(numbers, default=0) + 1
