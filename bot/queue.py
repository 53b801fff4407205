"""The job queue: arq on Redis, or on an in-process fakeredis for the embedded default."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis, RedisSettings
from arq.constants import default_queue_name, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from fakeredis import FakeServer
from fakeredis.aioredis import FakeAsyncRedisConnection
from redis.asyncio import ConnectionPool

from bot.settings import Settings

# A job never waits in the queue longer than a day (arq's own default expiry).
JOB_EXPIRES_MS = 24 * 3600 * 1000

def redis_settings(url: str) -> RedisSettings:
    return RedisSettings.from_dsn(url)


def create_redis(settings: Settings) -> ArqRedis:
    """An ArqRedis client; `memory://` gives a new in-process fakeredis server.

    The embedded worker is handed this same client, so the two share one queue; a second
    app in the same process (tests) gets its own queue.
    """
    if settings.memory_queue:
        pool = ConnectionPool(connection_class=FakeAsyncRedisConnection, server=FakeServer())
        return ArqRedis(connection_pool=pool)
    rs = redis_settings(settings.redis_url)
    pool = ConnectionPool.from_url(
        settings.redis_url, socket_connect_timeout=rs.conn_timeout, socket_timeout=5
    )
    return ArqRedis(connection_pool=pool)


@dataclass(frozen=True)
class JobSpec:
    """One job to enqueue: arq function name, keyword arguments and a dedupe id."""

    function: str
    job_id: str
    kwargs: dict[str, Any]


def delivery_job(delivery_id: int) -> JobSpec:
    return JobSpec("process_delivery", f"delivery:{delivery_id}", {"delivery_id": delivery_id})


async def enqueue_many(redis: ArqRedis, jobs: Sequence[JobSpec], queue: str = default_queue_name) -> int:
    """Enqueue jobs with arq's semantics (skip ids whose job or result exists) in two round trips.

    arq's `enqueue_job` costs a WATCH/MULTI transaction per job; the intake enqueues whole
    batches, so we check existence for all ids at once and then add the missing ones in one
    transaction. A race with another enqueuer is harmless: the job key is set NX and the queue
    is a sorted set, so an id is never queued twice.
    """
    if not jobs:
        return 0
    # The intake's jobs are almost always all new: one EXISTS over every key answers that in
    # one command; only when something exists do we pay for a per-job check.
    keys = [key for job in jobs for key in (job_key_prefix + job.job_id, result_key_prefix + job.job_id)]
    fresh: Sequence[JobSpec] = jobs
    if await redis.exists(*keys):
        async with redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.exists(job_key_prefix + job.job_id, result_key_prefix + job.job_id)
            present = await pipe.execute()
        fresh = [job for job, count in zip(jobs, present, strict=True) if not count]
        if not fresh:
            return 0
    now = timestamp_ms()
    async with redis.pipeline(transaction=True) as pipe:
        for job in fresh:
            data = serialize_job(job.function, (), job.kwargs, None, now)
            pipe.set(job_key_prefix + job.job_id, data, px=JOB_EXPIRES_MS, nx=True)
        # one ZADD for the whole batch instead of one per job
        pipe.zadd(queue, {job.job_id: now for job in fresh})
        await pipe.execute()
    return len(fresh)


async def enqueue(redis: ArqRedis, function: str, job_id: str | None = None, **kwargs: Any) -> bool:
    """Enqueue one job; False when a job (or its result) with that id already exists."""
    job = await redis.enqueue_job(function, _job_id=job_id, **kwargs)
    return job is not None


@dataclass(frozen=True)
class QueueStats:
    depth: int
    in_progress: int


async def queue_stats(redis: ArqRedis, queue: str = default_queue_name) -> QueueStats:
    depth = await redis.zcard(queue)
    in_progress = 0
    async for _ in redis.scan_iter(match="arq:in-progress:*", count=500):
        in_progress += 1
    return QueueStats(depth=int(depth), in_progress=in_progress)


def ids_of(jobs: Iterable[JobSpec]) -> list[str]:
    return [job.job_id for job in jobs]
