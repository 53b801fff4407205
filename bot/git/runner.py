"""One async runner for every git command: argv/env builders, timeouts, secret redaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from bot.core.errors import GitError
from bot.domain.secrets_scan import register_secrets
from bot.git.credentials import is_network_url, may_send_credentials
from bot.git.guard import HARDENING_CONFIG, HARDENING_DEFAULTS, guard_git_cwd, sanitize_git_env

log = logging.getLogger(__name__)

GIT = "git"
DEFAULT_TIMEOUT = 300.0
# How much of stderr an error message carries; git can be very chatty on failure.
_STDERR_TAIL = 2000
# Inherited variables that would point git at another repository (e.g. when the bot itself runs
# inside a git hook) and silently redirect every command.
_STRIPPED_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_HEADER_CONFIG = re.compile(r"(http\.(?:[^=\s]*\.)?extraheader=)\S.*", re.IGNORECASE)
_AUTH_WORDS = re.compile(r"\b(Basic|Bearer|token)\s+[A-Za-z0-9+/=._~-]+", re.IGNORECASE)


class GitCommandFailed(GitError):
    """A git command exited non-zero; argv and stderr are already redacted."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"`{' '.join(self.argv)}` failed (exit {returncode}): {stderr}".rstrip())


class GitTimeout(GitError):
    """A git command ran longer than its timeout and was killed (with its children)."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        super().__init__(f"`{' '.join(self.argv)}` timed out after {timeout:g}s and was killed")


@dataclass(frozen=True)
class GitResult:
    """What a finished git command produced."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        """stdout decoded; git output is bytes (paths may not be UTF-8), so never fail on it."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")


def build_git_argv(
    args: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    config: Mapping[str, str] | None = None,
) -> list[str]:
    """The full command line: `git [-C cwd] [-c k=v]... args`. Never put secrets in `config`.

    The hardening overrides come last so no caller's `config` can turn hooks or fsmonitor on.
    """
    argv = [GIT]
    if cwd is not None:
        argv += ["-C", os.fspath(cwd)]
    for key, value in {**HARDENING_DEFAULTS, **(config or {}), **HARDENING_CONFIG}.items():
        argv += ["-c", f"{key}={value}"]
    argv += list(args)
    return argv


def build_git_env(
    base: Mapping[str, str],
    *,
    auth_header: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for one git command.

    The auth header travels as GIT_CONFIG_COUNT/KEY/VALUE: /proc/<pid>/environ is readable only
    by our own user while the command line is world-readable, and env config is never written to
    any config file.
    """
    env = {k: v for k, v in sanitize_git_env(base).items() if k not in _STRIPPED_ENV}
    env.update(extra or {})
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    for key in [
        k for k in env if k.startswith("GIT_CONFIG_KEY_") or k.startswith("GIT_CONFIG_VALUE_")
    ]:
        del env[key]
    env.pop("GIT_CONFIG_COUNT", None)
    if auth_header is not None:
        if "\n" in auth_header or "\r" in auth_header:
            raise GitError("auth header must be a single line")
        env["GIT_CONFIG_COUNT"] = "2"
        env["GIT_CONFIG_KEY_0"] = "http.extraheader"
        env["GIT_CONFIG_VALUE_0"] = auth_header
        # An empty helper list: no credential helper may be asked for, or store, credentials
        # around the header we supply for this one command.
        env["GIT_CONFIG_KEY_1"] = "credential.helper"
        env["GIT_CONFIG_VALUE_1"] = ""
    return env


def secrets_of(auth_header: str | None) -> list[str]:
    """The strings that must never appear in an error: the header and its credential part."""
    if not auth_header:
        return []
    out = [auth_header]
    _, _, value = auth_header.partition(":")
    value = value.strip()
    if value:
        out.append(value)
        scheme, _, cred = value.partition(" ")
        if cred.strip():
            out.append(cred.strip())
        elif scheme:
            out.append(scheme)
    # Longest first so a shorter secret never leaves half of a longer one behind.
    return sorted({s for s in out if len(s) >= 4}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove secrets, URL userinfo, extraheader values and Basic/Bearer tokens from text."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    text = _HEADER_CONFIG.sub(r"\1***", text)
    return _AUTH_WORDS.sub(r"\1 ***", text)


def shown_argv(argv: Sequence[str], secrets: Sequence[str]) -> list[str]:
    """argv as logs and errors show it: each argument redacted. A pattern that matches inside
    one argument matches in the joined line too, so one pass over that line tells whether any
    argument needs it (it rarely does: the header travels in the environment), instead of three
    regular expressions over each of a command's ~30 arguments."""
    joined = " ".join(argv)
    if redact(joined, secrets) == joined:
        return list(argv)
    return [redact(a, secrets) for a in argv]


def credentials_for(
    remote: str | None, auth_header: str, credential_hosts: Collection[str]
) -> str | None:
    """The header to attach for a command talking to `remote`, or None; GitError when refused."""
    if remote is not None and may_send_credentials(remote, credential_hosts):
        return auth_header
    if remote is not None and not is_network_url(remote):
        return None
    raise GitError("credentials are sent only to the configured forge host; this remote is not one")


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # git forks helpers (remote-https, upload-pack, ssh, ext commands); killing only git would
    # leave them holding our pipes open, so the child runs in its own process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# An auth provider is asked for a header right before each network command (fetch, push,
# ls-remote), so a long engine run between a job's fetch and its push cannot leave the push
# with an expired token. A plain str (or None) is still accepted for callers that hold one.
AuthProvider = Callable[[], Awaitable[str | None]]
Auth = str | AuthProvider | None


async def resolve_auth(auth: Auth) -> str | None:
    """The header to use now: a str as given, or a fresh one from the provider."""
    if auth is None or isinstance(auth, str):
        return auth
    return await auth()


async def run_git(
    args: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    auth_header: Auth = None,
    timeout: float | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    config: Mapping[str, str] | None = None,
    remote: str | None = None,
    credential_hosts: Collection[str] = (),
) -> GitResult:
    """Run one git command; raise GitTimeout on timeout and GitCommandFailed on non-zero exit.

    `auth_header` goes only with a command whose `remote` is an http(s) URL on one of
    `credential_hosts`; a local path gets no header (there is nobody to send it to), and any
    other network remote is refused before git starts. In a cache worktree the `.git` link is
    checked first (GitLinkError when tampered with).
    """
    await guard_git_cwd(cwd)
    # ask the provider at the last moment: a token fetched before a long engine run expires
    auth_header = await resolve_auth(auth_header)
    if auth_header is not None:
        auth_header = credentials_for(remote, auth_header, credential_hosts)
        if auth_header is not None:
            # a redirect must not carry the header to wherever the server points
            config = {**(config or {}), "http.followRedirects": "false"}
    argv = build_git_argv(args, cwd=cwd, config=config)
    full_env = build_git_env(os.environ, auth_header=auth_header, extra=env)
    limit = DEFAULT_TIMEOUT if timeout is None else timeout
    secrets = secrets_of(auth_header)
    # every credential git is handed is remembered, so a push scan or a redaction later finds
    # it in what the agent wrote, even after the forge has minted the next one
    register_secrets(secrets)
    shown = shown_argv(argv, secrets)
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
    except OSError as exc:
        raise GitError(f"cannot start `{' '.join(shown)}`: {exc.strerror}") from None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.communicate(), 10)
        log.warning("git timed out after %.1fs: %s", limit, " ".join(shown))
        raise GitTimeout(shown, limit) from None
    except BaseException:
        # Cancelled (job aborted, worker shutting down): don't leave git running behind us.
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    rc = proc.returncode if proc.returncode is not None else -1
    log.debug("git rc=%d in %.3fs: %s", rc, time.monotonic() - started, " ".join(shown))
    result = GitResult(tuple(shown), rc, stdout, stderr)
    if check and rc != 0:
        err = redact(result.err.strip()[-_STDERR_TAIL:], secrets)
        raise GitCommandFailed(shown, rc, err)
    return result
