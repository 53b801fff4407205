"""The engine dies with its worker (issue 20, point 14).

A SIGKILLed worker leaves no codex behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.engines.test_engines_codex_process import FAKE_CODEX, alive

ROOT = Path(__file__).resolve().parents[2]

WORKER = """\
import asyncio, sys
from pathlib import Path
from engines.base import EngineRequest
from engines.codex import CodexEngine

fake, workdir, dump = sys.argv[1:4]
request = EngineRequest(prompt="hello", workdir=Path(workdir), phase="execute",
                        env={"FAKE_CODEX_MODE": "sleep", "FAKE_CODEX_DUMP": dump})
asyncio.run(CodexEngine(fake).run(request))
"""


def test_sigkilled_worker_takes_its_engine_with_it(tmp_path: Path) -> None:
    fake = tmp_path / "fake-codex"
    fake.write_text(f"#!{sys.executable}\n{FAKE_CODEX}")
    fake.chmod(0o755)
    dump = tmp_path / "dump.json"
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(fake), str(tmp_path), str(dump)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 20
        while not (dump.exists() and dump.read_text()):
            assert worker.poll() is None and time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.05)
        engine_pid = json.loads(dump.read_text())["pid"]
        assert alive(engine_pid)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(engine_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(engine_pid), "the engine outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()
        if dump.exists() and dump.read_text():
            for pid in json.loads(dump.read_text()).values():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
