"""The job queue: arq on Redis, or on an in-process fakeredis for the embedded default."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis, RedisSettings
from arq.constants import default_queue_name, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from fakeredis import FakeServer
from fakeredis.aioredis import FakeAsyncRedisConnection
from redis.asyncio import ConnectionPool

from bot.core.settings import Settings

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


def delivery_job_id(provider: str, key: str, attempt: int = 0) -> str:
    """A job id unique forever: from the delivery's own key, never from a row id.

    Row ids repeat when a database is re-created, and arq refuses an id whose old result is
    still in Redis. `attempt` > 0 names a delivery taken back from a dead worker's lease: its
    first job may still sit "in progress" in Redis, so the new one needs its own id.
    """
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"delivery:{provider}:{digest}" + (f":{attempt}" if attempt else "")


def delivery_job(delivery_id: int, provider: str, key: str, attempt: int = 0) -> JobSpec:
    return JobSpec(
        "process_delivery",
        delivery_job_id(provider, key, attempt),
        {"delivery_id": delivery_id, "delivery_key": key},
    )


# arq's enqueue semantics for a whole batch in one round trip: a job id whose job or result
# key exists is skipped (so relaying the same ids twice is a no-op), the others get their
# serialized job under the job key and a place in the queue scored by enqueue time.
# ARGV: queue, enqueue time (ms), expiry (ms), job-key prefix, result-key prefix, the byte
# lengths of (job id, serialized job) pairs as "12,250,12,251,…", then the pairs' bytes
# concatenated. Returns how many were added.
_ENQUEUE_LUA = """
local added = 0
local packed = ARGV[7]
local pos = 1
local id = nil
for size in string.gmatch(ARGV[6], '%d+') do
  local part = string.sub(packed, pos, pos + size - 1)
  pos = pos + size
  if id == nil then
    id = part
  else
    local job_key = ARGV[4] .. id
    if redis.call('EXISTS', job_key, ARGV[5] .. id) == 0 then
      redis.call('SET', job_key, part, 'PX', ARGV[3])
      redis.call('ZADD', ARGV[1], ARGV[2], id)
      added = added + 1
    end
    id = nil
  end
end
return added
"""


async def enqueue_many(
    redis: ArqRedis, jobs: Sequence[JobSpec], queue: str = default_queue_name
) -> int:
    """Enqueue jobs with arq's semantics (skip ids whose job or result exists) in one round trip.

    arq's `enqueue_job` costs a WATCH/MULTI transaction per job, and even a pipeline costs
    a few client-side command encodings per job; the intake enqueues whole batches, so one
    script call carries them all (and runs atomically, so a concurrent relay of the same ids
    cannot queue one twice). The jobs travel as two arguments, not two per job: redis-py
    encodes and frames every argument in Python, which cost more than serializing the job.
    """
    if not jobs:
        return 0
    now = timestamp_ms()
    parts: list[bytes] = []
    for job in jobs:
        parts.append(job.job_id.encode())
        parts.append(serialize_job(job.function, (), job.kwargs, None, now))
    sizes = ",".join([str(len(part)) for part in parts])
    args = (queue, now, JOB_EXPIRES_MS, job_key_prefix, result_key_prefix, sizes, b"".join(parts))
    added = await redis.eval(_ENQUEUE_LUA, 0, *args)  # type: ignore[arg-type,misc]
    return int(added)


@dataclass(frozen=True)
class QueueStats:
    depth: int
    in_progress: int
    # jobs whose run time has come (deferred retries wait in the same sorted set, scored later)
    ready: int = 0

    @property
    def demand(self) -> int:
        """Work for workers now: what the autoscaler sizes the worker pool on (deploy/README.md)."""
        return self.ready + self.in_progress


async def queue_stats(redis: ArqRedis, queue: str = default_queue_name) -> QueueStats:
    depth = await redis.zcard(queue)
    # arq scores each queued job by the epoch milliseconds at which it may run
    ready = await redis.zcount(queue, "-inf", timestamp_ms())
    in_progress = 0
    async for _ in redis.scan_iter(match="arq:in-progress:*", count=500):
        in_progress += 1
    return QueueStats(depth=int(depth), in_progress=in_progress, ready=int(ready))
