"""`make run`: the port is configurable, the banner follows the bind, a busy port is one line,
and restarting the demo does not pile up protocols. Runs the real CLI in a subprocess."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BANNER = "DeksdenFlow serving on"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Served:
    """A `serve` subprocess whose merged output is read line by line on a thread."""

    def __init__(self, cwd: Path, port: int, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")}
        env["DEKSDENFLOW_DATA_DIR"] = str(cwd / "data")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "serve", "--port", str(port), *extra],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} never printed; output:\n" + "\n".join(self.seen))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def drain(self) -> None:
        """After the process ended: everything it printed, into `seen`."""
        self._reader.join(timeout=10)
        while not self.lines.empty():
            self.seen.append(self.lines.get())


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for server in started:
        server.stop()


def protocol_runs(data: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(data / "deksdenflow.sqlite3") as conn:
        rows = conn.execute("SELECT id, protocol_name FROM protocol_runs ORDER BY id").fetchall()
    return [(int(i), str(n)) for i, n in rows]


def test_two_demo_starts_leave_one_protocol(tmp_path: Path, served: list[Served]) -> None:
    port = free_port()
    first = Served(tmp_path, port, "--demo")
    served.append(first)
    first.wait_for(BANNER)
    # `serve` logged the quick doctor checks before serving
    assert any("✔ database" in line for line in first.seen), first.seen
    assert any("✔ queue" in line for line in first.seen), first.seen
    # the banner comes after the bind: the port answers at once
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    first.wait_for("console:")
    first.stop()

    second = Served(tmp_path, port, "--demo")
    served.append(second)
    second.wait_for(BANNER)
    assert "from an earlier start" in second.wait_for("Demo: protocol")
    second.stop()
    runs = protocol_runs(tmp_path / "data")
    assert len(runs) == 1, runs


def test_busy_port_is_one_clear_line(tmp_path: Path, served: list[Served]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        server = Served(tmp_path, port, "--demo")
        served.append(server)
        code = server.proc.wait(timeout=60)
        server.drain()
    assert code == 1
    assert server.seen == [
        f"port {port} on 127.0.0.1 is already in use: stop the other server, "
        "or choose another port (make run PORT=8081, serve --port 8081)"
    ]
    # nothing was started for a server that could not run
    assert not (tmp_path / "data" / "demo").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_run_takes_the_port() -> None:
    done = subprocess.run(
        ["make", "-n", "run", "PORT=8123"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "serve --demo --host 127.0.0.1 --port 8123" in done.stdout
