"""A real worker process SIGKILLed mid-step: its lease expires, another worker finishes the step.

Worker A is a separate `arq` worker process (real Redis, a shared SQLite database, its own data
directory as on another machine) whose engine sleeps inside step 01. It is killed with SIGKILL,
so nothing of it runs any more: no `finally`, no lease release. Worker B (this process, another
data directory) takes the step back through the reclaim job once the lease expired and finishes
it with exactly one step commit. The lease TTL is shortened to keep the test short; with the
defaults (60 s TTL, the reclaim cron twice a minute) the same takes at most about 90 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from arq.worker import Worker

from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs.actions import start_protocol
from bot.jobs.locks import lease_alive
from bot.jobs.reclaim import orphaned_work, reclaim_expired
from bot.jobs.services import build_services, close_services
from bot.jobs.worker import job_functions, stop_embedded_worker
from bot.storage.db import database_from_settings
from bot.storage.migrate import upgrade_head
from bot.storage.queue import create_redis
from bot.storage.runs import get_or_create_project, load_run
from engines.registry import EngineRegistry
from engines.scripted import ScriptedEngine
from tests.conftest import make_settings
from tests.protocol.conftest import one_step_planning, origin_log, scripted_script

ROOT = Path(__file__).resolve().parents[2]
WORKER = (
    "import logging; logging.basicConfig(level=logging.INFO); "
    "from bot.jobs.worker import run_worker; from bot.core.settings import load_settings; "
    "run_worker(load_settings())"
)


def worker_env(tmp_path: Path, db_url: str, redis_url: str, script: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")}
    env.update(
        DEKSDENFLOW_DB_URL=db_url,
        DEKSDENFLOW_REDIS_URL=redis_url,
        DEKSDENFLOW_DATA_DIR=str(tmp_path / "worker-a"),
        DEKSDENFLOW_ENGINE="scripted",
        DEKSDENFLOW_SCRIPTED_SCRIPT=str(script),
        DEKSDENFLOW_LEASE_TTL_S="2",
        DEKSDENFLOW_LEASE_RENEW_S="0.5",
        DEKSDENFLOW_WARM_WORKTREES="false",
        DEKSDENFLOW_WORKER_POLL_DELAY_S="0.05",
        DEKSDENFLOW_LOG_LEVEL="INFO",
    )
    return env


async def wait_until(check: Any, seconds: float, log: Path | None = None) -> None:
    for _ in range(int(seconds / 0.1)):
        if await check():
            return
        await asyncio.sleep(0.1)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"condition not met within {seconds} s\n{tail}")


@pytest.mark.redis
async def test_a_killed_worker_process_step_finishes_on_another_worker(
    tmp_path: Path, origin: Path, redis_url: str
) -> None:
    async with asyncio.timeout(240):  # never hang a test run, whatever goes wrong
        await _killed_worker_scenario(tmp_path, origin, redis_url)


async def _killed_worker_scenario(tmp_path: Path, origin: Path, redis_url: str) -> None:
    db_url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    upgrade_head(db_url)
    slow = scripted_script(
        planning=one_step_planning(),
        execute={
            "default": {"delay_s": 120, "files": [{"path": "GREETING.md", "content": "hi\n"}]}
        },
    )
    script = tmp_path / "slow.yml"
    script.write_text(yaml.safe_dump(slow))
    settings = make_settings(
        tmp_path,
        db_url=db_url,
        redis_url=redis_url,
        data_dir=tmp_path / "worker-b",
        lease_ttl_s=2.0,
        lease_renew_s=0.5,
    )
    db = database_from_settings(settings)
    redis = create_redis(settings)
    fast = ScriptedEngine(scripted_script(planning=one_step_planning()))
    ctx: dict[str, Any] = {
        "settings": settings,
        "db": db,
        "redis": redis,
        "engines": EngineRegistry([fast]),
    }
    await build_services(ctx)
    log_path = tmp_path / "worker-a.log"
    with log_path.open("w") as log_file:
        worker_a = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            cwd=ROOT,
            env=worker_env(tmp_path, db_url, redis_url, script),
            start_new_session=True,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        project = await get_or_create_project(
            db, name=f"local:{origin}", provider="local", git_url=str(origin), base_branch="main"
        )
        run = await start_protocol(ctx, project, "Add a greeting", auto=True)

        async def step_running() -> bool:
            state = await load_run(db, run.id)
            return bool(state.steps) and state.step(1).status == StepStatus.RUNNING

        await wait_until(step_running, 90, log_path)
        await asyncio.sleep(0.5)  # inside the engine's sleep now
        os.killpg(worker_a.pid, signal.SIGKILL)
        await asyncio.wait_for(worker_a.wait(), timeout=10)
        assert await lease_alive(redis, run.id)  # the dead worker's lease is still there

        async def orphaned() -> bool:
            return await orphaned_work(ctx) == [(run.id, 1)]

        await wait_until(orphaned, 10)
        # worker B: the protocol jobs only (its reclaim cron is called by hand below)
        worker_b = Worker(
            functions=job_functions(settings),
            redis_pool=redis,
            ctx=dict(ctx),
            poll_delay=0.05,
            handle_signals=False,
            keep_result=60,
        )
        task = asyncio.create_task(worker_b.async_run())
        try:
            assert await reclaim_expired(ctx) == 1

            async def completed() -> bool:
                return (await load_run(db, run.id)).run.status == ProtocolStatus.COMPLETED

            await wait_until(completed, 60)
        finally:
            await stop_embedded_worker(worker_b, task)
        name = run.protocol_name
        assert [s for s in origin_log(origin, name) if "[protocol-0001/01]" in s] == [
            "feat(add): Add a greeting module [protocol-0001/01]"
        ]
        assert [r.phase for r in fast.requests] == ["execute", "qa"]
    finally:
        if worker_a.returncode is None:
            os.killpg(worker_a.pid, signal.SIGKILL)
            await asyncio.wait_for(worker_a.wait(), timeout=10)
        await close_services(ctx)
        await redis.aclose(close_connection_pool=True)
        await db.dispose()
