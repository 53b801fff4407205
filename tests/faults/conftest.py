"""Fault-test fixtures: a Redis server of the test's own, a worker as a real subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from tests.conftest import GITHUB_SECRET, free_port

ROOT = Path(__file__).resolve().parents[2]


class OwnRedis:
    """`redis-server` on a free port without persistence: killing it loses every job."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client = redis_sync.Redis.from_url(self.url, socket_connect_timeout=0.5)
                client.ping()
                client.close()
                return
            except redis_sync.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class WorkerProcess:
    """`deksdenflow worker` as a subprocess with the product's defaults (plus the test's stores)."""

    def __init__(self, tmp_path: Path, db_url: str, redis_url: str) -> None:
        self.log = tmp_path / "worker.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")},
            "DEKSDENFLOW_DB_URL": db_url,
            "DEKSDENFLOW_REDIS_URL": redis_url,
            "DEKSDENFLOW_DATA_DIR": str(tmp_path / "data"),
            "DEKSDENFLOW_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
            "DEKSDENFLOW_ENGINE": "scripted",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bot", "worker"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]
