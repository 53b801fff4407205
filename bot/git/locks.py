"""Per-mirror locking: an asyncio lock within the process plus an fcntl lock across processes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

from bot.core.errors import GitError

# asyncio locks belong to one event loop, so the registry is per loop (tests run one per test).
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def lock_file_for(repo_dir: Path) -> Path:
    """The lock sits next to the mirror, not inside it, so it exists before the mirror does."""
    return repo_dir.with_name(repo_dir.name + ".lock")


def _process_lock(key: str) -> asyncio.Lock:
    per_loop = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(key, asyncio.Lock())


@contextlib.asynccontextmanager
async def mirror_lock(repo_dir: Path, *, timeout: float = 900.0) -> AsyncIterator[None]:
    """Hold the mirror exclusively: fetches, ref updates and worktree (de)registration."""
    lock_path = lock_file_for(repo_dir)
    deadline = time.monotonic() + timeout
    async with _process_lock(str(lock_path)):
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            delay = 0.01
            # Poll with LOCK_NB instead of blocking in a thread: a cancelled job must not leave a
            # thread behind that acquires the lock later and never releases it.
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise GitError(f"timed out after {timeout:g}s waiting for {lock_path}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
