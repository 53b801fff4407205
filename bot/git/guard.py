"""What makes the bot's git trust nothing an agent can write: config overrides and the `.git` link
check.

An agent runs in a protocol worktree and may write any file there, `.git` included when its
sandbox is weak or absent. Git reads hooks, `core.fsmonitor`, pagers, ssh commands and diff
drivers from repository config and runs them with the *bot's* environment, outside any sandbox.
So every bot git command:

- carries `-c` overrides for each config key that makes git run a program (command-line config
  beats repository config);
- reads no system or global config (`GIT_CONFIG_NOSYSTEM`, `GIT_CONFIG_GLOBAL=/dev/null`) and no
  inherited `GIT_*` variable;
- in a worktree of the cache, first checks that the worktree's `.git` file still points at its
  mirror's `worktrees/<name>` directory and that directory points back: the mirror lives outside
  the worktree, where the agent cannot write, so its config is the only repository config read.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from bot.core.errors import GitError
from bot.git.names import safe_repo_name

# /dev/null is a file, so `<hooksPath>/<hook>` can never exist: no hook runs, and there is no
# directory anyone (agent or not) could later put a hook into.
EMPTY_HOOKS = "/dev/null"

# Each key here makes git run a program of the config's choosing. (`diff.external` cannot be
# emptied with -c, git would run ""; the commands that diff pass --no-ext-diff instead.)
HARDENING_CONFIG: Mapping[str, str] = {
    "core.hooksPath": EMPTY_HOOKS,
    "core.fsmonitor": "false",
    "core.untrackedCache": "false",
    "core.sshCommand": "ssh",
    "core.pager": "cat",
    "core.editor": ":",
    "sequence.editor": ":",
    "core.askPass": "",
    "gpg.program": "gpg",
    "commit.gpgsign": "false",
    "tag.gpgsign": "false",
}

# Defaults a caller's own `config` may change (bot code, never repository content, decides).
HARDENING_DEFAULTS: Mapping[str, str] = {"protocol.ext.allow": "never"}

# Environment the bot sets for every git command; nothing inherited named GIT_* survives.
HARDENING_ENV: Mapping[str, str] = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_PAGER": "cat",
    "PAGER": "cat",
    "GIT_EDITOR": ":",
    "GIT_TERMINAL_PROMPT": "0",
}

_LINK_MAX = 4096


class GitRefused(GitError):
    """The bot refused a git step because of what was found in the worktree (a job blocks on it)."""


class GitLinkError(GitRefused):
    """A worktree's `.git` no longer points at its mirror: someone other than git changed it."""

    def __init__(self, worktree: Path, reason: str) -> None:
        self.worktree = worktree
        self.reason = reason
        super().__init__(f"refusing to run git in {worktree}: {reason}")


class GitConfigError(GitRefused):
    """A mirror's config holds a key the bot never writes and that would make git run a program
    or talk to another host: someone other than the bot wrote it."""

    def __init__(self, mirror: Path, keys: Iterable[str]) -> None:
        self.mirror = mirror
        self.keys = sorted(set(keys))
        super().__init__(
            f"refusing to use {mirror}: its config holds {', '.join(self.keys[:8])}, which the bot "
            "never writes; delete the mirror to let the bot re-create it"
        )


# Keys the bot never writes into a mirror and that run a program, pull in more config, or send
# the bot's requests (and credentials) elsewhere. The overridable ones are overridden by -c as
# well; finding any of them means the config was tampered with.
_DANGEROUS_CONFIG = re.compile(
    r"^(filter\.|include\.|includeif\.|url\.|credential(\.|$)|http\.|uploadpack\.|protocol\.|gpg\."
    r"|core\.(worktree|gitproxy|alternaterefscommand|sshcommand|fsmonitor|hookspath|askpass|editor"
    r"|pager)$|diff\..+\.(command|textconv)$|merge\..+\.driver$|sequence\.editor$"
    r"|remote\..+\.(uploadpack|receivepack|proxy|vcs)$|extensions\.worktreeconfig$)",
    re.IGNORECASE,
)
# config path -> (stat signature, its entries as parsed when it was checked)
_checked_configs: dict[str, tuple[tuple[int, int, int, int], dict[str, str]]] = {}


def config_problems(entries: Iterable[tuple[str, str]], mirror_name: str) -> list[str]:
    """The keys of a mirror's config (name, value) that the bot would never have written (pure).

    `remote.origin.url` must be the URL the mirror is named after (its name carries a hash of
    it): a changed URL would send the bot's fetch, and its credentials, to another host.
    """
    problems: list[str] = []
    urls: list[str] = []
    for name, value in entries:
        if _DANGEROUS_CONFIG.match(name):
            problems.append(name)
        elif name.lower() == "remote.origin.url":
            urls.append(value)
    if len(urls) > 1:
        problems.append("remote.origin.url (several)")
    elif urls:
        try:
            expected = safe_repo_name(urls[0]) + ".git"
        except GitError:
            expected = None
        if expected != mirror_name:
            problems.append("remote.origin.url (not the mirror's own)")
    return problems


def _parse_config_list(out: bytes) -> list[tuple[str, str]]:
    """`git config --list -z`: entries end with NUL, a newline separates name and value."""
    entries = []
    for raw in out.split(b"\0"):
        if raw:
            name, _, value = raw.decode("utf-8", "replace").partition("\n")
            entries.append((name, value))
    return entries


async def check_mirror_config(mirror: Path, admin: Path | None = None) -> None:
    """GitConfigError unless the mirror's config (and no per-worktree config) is as the bot left it.

    Reading it costs one `git config --file` (which runs nothing) whenever the file changed;
    otherwise a stat.
    """
    if admin is not None and (admin / "config.worktree").exists():
        raise GitConfigError(mirror, ["worktrees/*/config.worktree"])
    config = mirror / "config"
    try:
        st = os.lstat(config)
    except OSError:
        raise GitConfigError(mirror, ["(config missing)"]) from None
    if not os.path.isfile(config) or os.path.islink(config):
        raise GitConfigError(mirror, ["(config is not a plain file)"])
    signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    checked = _checked_configs.get(str(config))
    if checked is not None and checked[0] == signature:
        return
    proc = await asyncio.create_subprocess_exec(
        "git", "config", "--file", str(config), "--no-includes", "--list", "-z",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=sanitize_git_env(os.environ), cwd="/",
    )  # fmt: skip
    out, _err = await proc.communicate()
    if proc.returncode != 0:
        raise GitConfigError(mirror, ["(config unreadable)"])
    entries = _parse_config_list(out)
    problems = config_problems(entries, mirror.name)
    if problems:
        raise GitConfigError(mirror, problems)
    # a key given twice reads as its last value, as `git config --get` answers
    _checked_configs[str(config)] = (signature, dict(entries))


async def mirror_config_value(mirror: Path, key: str) -> str | None:
    """`git config --get <key>` of a cache mirror (key as git lists it: `remote.origin.url`),
    answered from the entries the config check parsed: no git process unless the file changed."""
    await check_mirror_config(mirror)
    return _checked_configs[str(mirror / "config")][1].get(key)


def sanitize_git_env(base: Mapping[str, str]) -> dict[str, str]:
    """`base` without any GIT_* variable (GIT_SSH, GIT_EXEC_PATH, GIT_DIR…), plus our settings."""
    env = {k: v for k, v in base.items() if not k.upper().startswith("GIT_")}
    env.update(HARDENING_ENV)
    return env


def cache_worktree_of(cwd: str | os.PathLike[str]) -> tuple[Path, Path] | None:
    """(worktree, mirror) when `cwd` lies in a worktree of a GitCache, else None.

    The cache's layout says which mirror a worktree belongs to:
    `<root>/worktrees/<repo>/<name>` belongs to `<root>/mirrors/<repo>.git`. The layout is read
    from the path alone, so nothing the agent writes inside the worktree can change the answer.
    """
    path = Path(os.path.abspath(cwd))
    for candidate in (path, *path.parents):
        group = candidate.parent
        if group.parent.name != "worktrees" or candidate == group:
            continue
        mirror = group.parent.parent / "mirrors" / f"{group.name}.git"
        if (mirror / "HEAD").is_file():
            return candidate, mirror
    return None


def _read_small(path: Path) -> str:
    # O_NOFOLLOW: a symlink planted in place of the file is refused, not followed.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return os.read(fd, _LINK_MAX).decode("utf-8", "strict")
    finally:
        os.close(fd)


def check_worktree_link(worktree: Path, mirror: Path) -> Path:
    """The worktree's admin dir in `mirror`, after checking the link both ways; else
    GitLinkError."""
    dotgit = worktree / ".git"
    try:
        text = _read_small(dotgit)
    except FileNotFoundError:
        raise GitLinkError(worktree, ".git is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        # a directory, a symlink, a fifo… git would take any of them as a repository
        raise GitLinkError(
            worktree, f".git is not a plain link file ({exc.__class__.__name__})"
        ) from None
    if not text.startswith("gitdir: ") or text.count("\n") > 1:
        raise GitLinkError(worktree, ".git is not a `gitdir:` link")
    target = Path(text[len("gitdir: ") :].strip())
    if not target.is_absolute():
        target = worktree / target
    admin = Path(os.path.realpath(target))
    admin_root = Path(os.path.realpath(mirror / "worktrees"))
    if admin.parent != admin_root:
        raise GitLinkError(worktree, f".git points outside {mirror}/worktrees")
    try:
        back = _read_small(admin / "gitdir").strip()
        common = _read_small(admin / "commondir").strip()
    except (OSError, UnicodeDecodeError):
        raise GitLinkError(worktree, "its registration in the mirror is incomplete") from None
    if os.path.realpath(back) != os.path.realpath(dotgit):
        raise GitLinkError(worktree, "the mirror registers another directory under that name")
    if os.path.realpath(admin / common) != os.path.realpath(mirror):
        raise GitLinkError(worktree, "its registration names another repository")
    return admin


def cache_mirror_of(cwd: str | os.PathLike[str]) -> Path | None:
    """The mirror when `cwd` is one of a GitCache's (`<root>/mirrors/<name>.git`), else None."""
    path = Path(os.path.abspath(cwd))
    if path.parent.name == "mirrors" and path.name.endswith(".git") and (path / "HEAD").is_file():
        return path
    return None


def guard_cwd(cwd: str | os.PathLike[str] | None) -> None:
    """Refuse (GitLinkError) to run git in a cache worktree whose `.git` link was tampered with."""
    if cwd is None:
        return
    found = cache_worktree_of(cwd)
    if found is not None:
        check_worktree_link(*found)


async def guard_git_cwd(cwd: str | os.PathLike[str] | None) -> None:
    """Before a git command: the `.git` link of a cache worktree, and its mirror's config."""
    if cwd is None:
        return
    found = cache_worktree_of(cwd)
    if found is not None:
        admin = check_worktree_link(*found)
        await check_mirror_config(found[1], admin)
        return
    mirror = cache_mirror_of(cwd)
    if mirror is not None:
        await check_mirror_config(mirror)
