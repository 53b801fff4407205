"""An engine process dies with the worker that started it (Linux PR_SET_PDEATHSIG)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the kernel send `sig` to the child when its parent dies.

    A SIGKILLed worker runs no cleanup, so without this its engine (and the commands the agent
    started in its process group) would keep running, orphaned. SIGTERM rather than SIGKILL:
    the codex CLI forwards it to the native binary (or is that binary, after execve, which
    keeps the setting) and ends its own children. None where prctl does not exist.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: the child only calls it
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec
