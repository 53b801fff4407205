"""What makes the bot's git trust nothing an agent can write: config overrides and the `.git` link check.

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

import os
from collections.abc import Mapping
from pathlib import Path

from bot.errors import GitError

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
    """The worktree's admin dir in `mirror`, after checking the link both ways; else GitLinkError."""
    dotgit = worktree / ".git"
    try:
        text = _read_small(dotgit)
    except FileNotFoundError:
        raise GitLinkError(worktree, ".git is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        # a directory, a symlink, a fifo… git would take any of them as a repository
        raise GitLinkError(worktree, f".git is not a plain link file ({exc.__class__.__name__})") from None
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


def guard_cwd(cwd: str | os.PathLike[str] | None) -> None:
    """Refuse (GitLinkError) to run git in a cache worktree whose `.git` link was tampered with."""
    if cwd is None:
        return
    found = cache_worktree_of(cwd)
    if found is not None:
        check_worktree_link(*found)
