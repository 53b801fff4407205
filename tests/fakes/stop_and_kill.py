"""Helpers of the end-to-end stop tests: an engine that is a real, stubborn process group, and
real worker processes (killed with SIGKILL) for the lease-reclaim tests on both forge fakes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from engines.base import EngineRequest, EngineResult
from engines.codex import CodexEngine
from engines.scripted import ScriptedEngine
from tests.engines.test_engines_codex_process import FAKE_CODEX, alive

ROOT = Path(__file__).resolve().parents[2]
WORKER = (
    "import logging; logging.basicConfig(level=logging.INFO); "
    "from bot.jobs.worker import run_worker; from bot.core.settings import load_settings; "
    "run_worker(load_settings())"
)
# what the cancelled engine wrote before it was stopped: must never reach a commit
EDIT = "cancelled-edit.txt"


def stubborn_execute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Execute turns become the codex engine on a fake binary that ignores SIGTERM, starts a
    child and sleeps for a minute, after editing the worktree. Returns the file the binary
    writes its pid and its child's pid to. Every other phase stays scripted."""
    fake = tmp_path / "fake-codex"
    fake.write_text(f"#!{sys.executable}\n{FAKE_CODEX}")
    fake.chmod(0o755)
    dump = tmp_path / "codex-pids.json"
    codex = CodexEngine(str(fake), codex_home=str(tmp_path / "codex-home"), kill_grace_s=10)
    original = ScriptedEngine.run

    async def run(self: ScriptedEngine, request: EngineRequest) -> EngineResult:
        if request.phase != "execute":
            return await original(self, request)
        (request.workdir / EDIT).write_text("half-done work\n")
        env = {"FAKE_CODEX_MODE": "stubborn", "FAKE_CODEX_DUMP": str(dump)}
        return await codex.run(dataclasses.replace(request, env=env))

    monkeypatch.setattr(ScriptedEngine, "run", run)
    return dump


def wait_for(
    condition: Callable[[], bool], seconds: float, what: str, log: Path | None = None
) -> float:
    """Poll until `condition()`; the seconds it took. Fails (with the worker log's tail) after
    `seconds`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > seconds:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"{what}: not within {seconds} s\n{tail}")
        time.sleep(0.05)
    return time.monotonic() - start


def engine_pids(dump: Path) -> dict[str, int]:
    text = dump.read_text() if dump.exists() else ""
    return json.loads(text) if text else {}


def engine_gone(dump: Path) -> bool:
    pids = engine_pids(dump)
    return bool(pids) and not alive(pids["pid"]) and not alive(pids["child"])


def write_script(path: Path, script: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(script))
    return path


@contextmanager
def worker_process(
    tmp_path: Path, name: str, env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`deksdenflow worker` in a process of its own (own session, so SIGKILL takes its engine
    too) with only the given DEKSDENFLOW_ settings; stopped with SIGKILL at the end."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")}
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            cwd=ROOT,
            env={**clean, **env},
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        yield proc, log
    finally:
        kill(proc)


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's whole process group: no `finally`, no lease release, nothing."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
