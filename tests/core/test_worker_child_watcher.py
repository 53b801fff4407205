"""`deksdenflow worker` waits for its git processes on pidfds (Python 3.11: not a thread each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# in a process of its own: the watcher is process-wide, as in a worker process
SCRIPT = """
import asyncio, sys, threading
from bot.git.runner import run_git
from bot.jobs.worker import use_pidfd_watcher

loop = asyncio.new_event_loop()
asyncio.set_event_loop(loop)
installed = use_pidfd_watcher(loop)
if sys.version_info < (3, 12):
    assert installed, "pidfd_open is there on this kernel"
    assert isinstance(asyncio.get_child_watcher(), asyncio.PidfdChildWatcher)
else:
    assert not installed  # 3.12+ does it by itself

async def main():
    results = await asyncio.gather(*(run_git(["--version"]) for _ in range(5)))
    assert all(r.returncode == 0 and r.out.startswith("git version") for r in results)
    # no waiter thread per process left behind (ThreadedChildWatcher names them waitpid-N)
    assert not [t for t in threading.enumerate() if t.name.startswith("waitpid-")]

loop.run_until_complete(main())
print("ok")
"""


def test_worker_waits_for_git_on_pidfds() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
