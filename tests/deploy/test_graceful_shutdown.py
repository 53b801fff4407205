"""SIGTERM on a real worker process: stop taking jobs, finish what fits the grace, hand back the
rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from bot.core.settings import Settings
from bot.jobs.shutdown import shutdown_kwargs, termination_grace_period_s

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 3


def test_shutdown_numbers() -> None:
    settings = Settings(worker_shutdown_grace_s=99.5)
    assert shutdown_kwargs(settings) == {"job_completion_wait": 100, "retry_jobs": True}
    assert termination_grace_period_s(settings) == 120


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def workers(
    tmp_path: Path, sqlite_url: str, redis_url: str
) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")}
        env.update(
            PYTHONPATH=str(ROOT),
            WORKER_NAME=name,
            DEKSDENFLOW_REDIS_URL=redis_url,
            DEKSDENFLOW_DB_URL=sqlite_url,
            DEKSDENFLOW_DATA_DIR=str(tmp_path / f"data-{name}"),
            DEKSDENFLOW_ENGINE="scripted",
            DEKSDENFLOW_WORKER_POLL_DELAY_S="0.05",
            DEKSDENFLOW_WORKER_SHUTDOWN_GRACE_S=str(GRACE_S),
        )
        with open(tmp_path / f"worker-{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "deploy" / "sigterm_worker.py")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _enqueue(url: str, function: str, job_id: str, **kwargs: Any) -> None:
    import asyncio

    from arq.connections import RedisSettings, create_pool

    async def go() -> None:
        pool = await create_pool(RedisSettings.from_dsn(url))
        try:
            assert await pool.enqueue_job(function, _job_id=job_id, **kwargs) is not None
        finally:
            await pool.aclose()

    asyncio.run(go())


@pytest.mark.redis
def test_sigterm_finishes_short_jobs_and_hands_the_engine_step_back(
    tmp_path: Path, redis_url: str, workers: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    r = redis_sync.Redis.from_url(redis_url)
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        _enqueue(redis_url, "engine", "engine-1", marks=str(marks))
        a = workers("a")
        _wait(
            lambda: (marks / "grandchild.pid").exists() and (marks / "engine.pid").exists(),
            30,
            "the engine",
        )
        engine_pid = int((marks / "engine.pid").read_text())
        grandchild_pid = int((marks / "grandchild.pid").read_text())
        _enqueue(redis_url, "short", "short-1")
        _wait(lambda: r.exists("t:short:started") == 1, 15, "the short job")

        a.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        time.sleep(0.3)
        # 1. stops taking jobs: this one waits for the next worker
        _enqueue(redis_url, "short", "short-after")
        assert a.wait(timeout=GRACE_S + 20) == 0
        took = time.monotonic() - sent

        # 2. the job that fit into the grace period finished normally
        assert r.exists("t:short:done") == 1
        assert r.exists("arq:result:short-1") == 1
        # 3. the engine step outlived the grace period: its processes are gone...
        assert not _alive(engine_pid) and not _alive(grandchild_pid)
        # ...and it is back in the queue, free to start now (no in-progress key, no result)
        assert r.zscore("arq:queue", "engine-1") is not None
        assert r.exists("arq:in-progress:engine-1") == 0
        assert r.exists("arq:result:engine-1") == 0
        assert r.zscore("arq:queue", "short-after") is not None
        assert took >= GRACE_S - 0.5  # it did wait for the step before giving up on it

        b = workers("b")
        _wait(lambda: r.exists("arq:result:engine-1") == 1, 30, "the handed-back step")
        _wait(lambda: r.exists("arq:result:short-after") == 1, 30, "the job sent during shutdown")
        ran_on: list[bytes] = r.lrange("t:engine:workers", 0, -1)  # type: ignore[assignment]
        assert [w.decode() for w in ran_on] == ["a", "b"]
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=GRACE_S + 20) == 0
    finally:
        r.close()
