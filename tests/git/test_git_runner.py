"""The runner: timeouts kill the whole process group; credentials never persist or leak."""

from __future__ import annotations

import asyncio
import http.server
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.core.errors import GitError
from bot.git import GitCache, GitCommandFailed, GitTimeout, commit_all, push, run_git
from bot.git.credentials import may_send_credentials

Git = Callable[..., str]
Origin = Any

SECRET = "ghs_S3cr3tT0kenValue42"
HEADER = f"Authorization: Bearer {SECRET}"
BASIC = "Authorization: Basic eC1hY2Nlc3MtdG9rZW46Z2hzX1NlY3JldA=="


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_timeout_kills_git_and_its_helpers(tmp_path: Path) -> None:
    pid_file = tmp_path / "helper.pid"
    helper = tmp_path / "slow-remote.sh"
    helper.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    started = time.monotonic()
    with pytest.raises(GitTimeout) as info:
        await run_git(
            ["ls-remote", f"ext::{helper}"],
            config={"protocol.ext.allow": "always"},
            timeout=0.5,
        )
    assert time.monotonic() - started < 5
    assert "ls-remote" in str(info.value) and "0.5s" in str(info.value)
    assert isinstance(info.value, GitError)
    pid = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(pid):
            break
        await asyncio.sleep(0.02)
    assert not _alive(pid), "the remote helper outlived the timeout"


async def test_failure_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(GitCommandFailed) as info:
        await run_git(["rev-parse", "--verify", "nope"], cwd=tmp_path)
    assert "rev-parse" in str(info.value) and info.value.returncode != 0


async def test_stdin_is_not_inherited(tmp_path: Path) -> None:
    # `hash-object --stdin` would block forever on an inherited terminal or pipe.
    res = await run_git(["hash-object", "--stdin"], cwd=tmp_path, timeout=5)
    assert res.out.strip() == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # the empty blob


def _files_containing(root: Path, needle: str) -> list[Path]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            try:
                if needle.encode() in p.read_bytes():
                    hits.append(p)
            except OSError:
                continue
    return hits


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_secret_never_persisted_or_shown(tmp_path: Path, origin: Origin, git: Git) -> None:
    cache = GitCache(tmp_path / "data", network_timeout=20)
    # Local transports ignore the header, but it still travels through the same code path.
    wt = await cache.ensure_worktree(origin.url, "0004-x", "main", HEADER)
    (wt.path / "a.txt").write_text("a")
    await commit_all(wt.path, "a", "Bot", "bot@example.com")
    await push(wt.path, "0004-x", origin.url, HEADER)

    port = _closed_port()
    dead = f"http://127.0.0.1:{port}/o/r.git"
    cache.credential_hosts = frozenset({f"127.0.0.1:{port}"})
    for header in (HEADER, BASIC):
        with pytest.raises(GitError) as pushed:
            await push(wt.path, "0004-x", dead, header, credential_hosts=cache.credential_hosts)
        with pytest.raises(GitError) as fetched:
            await cache.ensure_mirror(dead, header)
        for err in (pushed.value, fetched.value):
            text = f"{err} {err!r} {getattr(err, 'stderr', '')} {getattr(err, 'argv', '')}"
            assert "127.0.0.1" in text
            assert header.split()[-1] not in text and "Bearer ghs" not in text

    for secret in (SECRET, BASIC.split()[-1]):
        assert not _files_containing(cache.data_dir, secret)
        assert not _files_containing(origin.bare, secret)
    assert SECRET not in (wt.mirror / "config").read_text()
    assert SECRET not in git("config", "--list", "--show-origin", cwd=wt.path)


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen: list[str | None] = []  # noqa: RUF012 - shared with the test on purpose

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="x"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def auth_server() -> Iterator[tuple[str, list[str | None]]]:
    _RecordingHandler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/o/r.git", _RecordingHandler.seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_header_reaches_the_server_but_not_the_error(
    tmp_path: Path, auth_server: tuple[str, list[str | None]]
) -> None:
    url, seen = auth_server
    host = url.split("/")[2]
    cache = GitCache(tmp_path / "data", network_timeout=20, credential_hosts={host})
    with pytest.raises(GitError) as info:
        await cache.ensure_mirror(url, HEADER)
    assert f"Bearer {SECRET}" in seen  # it was sent on the wire, as a header
    assert SECRET not in str(info.value)
    assert not _files_containing(cache.data_dir, SECRET)
    # Without a header nothing is sent and git does not prompt (GIT_TERMINAL_PROMPT=0).
    seen.clear()
    with pytest.raises(GitError):
        await cache.ensure_mirror(url)
    assert seen and all(h is None for h in seen)


async def test_credentials_go_only_to_the_forge_host(
    tmp_path: Path, auth_server: tuple[str, list[str | None]], origin: Origin
) -> None:
    """Another host (a changed git_url, a stale mirror) gets no request at all, per command."""
    url, seen = auth_server
    cache = GitCache(tmp_path / "data", network_timeout=20, credential_hosts={"forge.example:443"})
    with pytest.raises(GitError, match="configured forge host"):
        await cache.ensure_mirror(url, HEADER)
    wt = await cache.ensure_worktree(origin.url, "0005-x", "main", HEADER)  # a path: no header sent
    with pytest.raises(GitError, match="configured forge host"):
        await push(wt.path, "0005-x", url, HEADER, credential_hosts=cache.credential_hosts)
    assert seen == []
    assert may_send_credentials("https://forge.example:443/o/r.git", {"forge.example:443"})
    assert not may_send_credentials("https://forge.example.evil/o/r.git", {"forge.example"})
    assert not may_send_credentials("file:///srv/repo.git", {"forge.example"})
    assert not may_send_credentials("ssh://forge.example/o/r.git", {"forge.example"})
    assert may_send_credentials("https://GitHub.com/o/r.git", {"github.com"})


async def test_option_like_remotes_and_branches_are_refused(tmp_path: Path, origin: Origin) -> None:
    cache = GitCache(tmp_path / "data", network_timeout=20)
    for bad in ("--upload-pack=touch /tmp/pwned", "ext::sh -c touch% /tmp/pwned", "fd::17"):
        with pytest.raises(GitError):
            await cache.ensure_mirror(bad)
    with pytest.raises(GitError):
        await cache.ensure_worktree(origin.url, "0006-x", "--upload-pack=x")
