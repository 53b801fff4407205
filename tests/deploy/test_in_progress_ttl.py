"""A worker's arq in-progress keys live one lease TTL, renewed while it lives: a dead worker's
jobs go to another worker within that TTL instead of arq's hour (bot/jobs/resilient.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.worker import func

from bot.core.settings import Settings
from bot.jobs.resilient import ResilientWorker
from bot.storage.queue import create_redis

TTL_S = 1.0


async def _slow(ctx: dict[str, Any], seconds: float) -> str:
    await asyncio.sleep(seconds)
    return str(ctx["worker"])


def _worker(redis: Any, name: str) -> ResilientWorker:
    return ResilientWorker(
        functions=[func(_slow, name="slow")], redis_pool=redis, ctx={"worker": name},
        handle_signals=False, poll_delay=0.05, job_timeout=3600, keep_result=60,
        in_progress_ttl_s=TTL_S, in_progress_renew_s=0.2,
    )  # fmt: skip


async def _wait(cond: Any, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_in_progress_key_is_short_and_renewed_then_a_dead_workers_job_moves(
    redis_url: str,
) -> None:
    settings = Settings(redis_url=redis_url)
    redis_a, redis_b, probe = create_redis(settings), create_redis(settings), create_redis(settings)
    key = in_progress_key_prefix + "slow-1"
    a = _worker(redis_a, "a")
    main_a = asyncio.create_task(a.main())
    try:
        job = await probe.enqueue_job("slow", 3.0, _job_id="slow-1")
        assert job is not None
        await _wait(lambda: probe.exists(key), 5)
        assert 0 < await probe.pttl(key) <= TTL_S * 1000  # not arq's job timeout + 10 s
        await asyncio.sleep(TTL_S * 1.5)
        assert await probe.exists(key)  # alive past its TTL: renewed

        # worker a dies (no close, no hand-back); b takes the job once the key has expired
        main_a.cancel()
        assert a._heartbeat is not None
        a._heartbeat.cancel()
        for task in a.tasks.values():
            task.cancel()
        await asyncio.gather(main_a, a._heartbeat, *a.tasks.values(), return_exceptions=True)
        b = _worker(redis_b, "b")
        main_b = asyncio.create_task(b.main())
        try:
            result = await asyncio.wait_for(job.result(poll_delay=0.1), 15)
            assert result == "b"
        finally:
            main_b.cancel()
            b._closing.set()  # what close() does to the heartbeat; the pool is closed below
            await asyncio.gather(
                main_b, *([b._heartbeat] if b._heartbeat else []), return_exceptions=True
            )
            await redis_b.aclose(close_connection_pool=True)
    finally:
        main_a.cancel()
        await asyncio.gather(main_a, return_exceptions=True)
        await probe.aclose(close_connection_pool=True)
        await redis_a.aclose(close_connection_pool=True)
