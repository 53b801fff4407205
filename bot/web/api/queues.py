"""GET /api/queues: the arq queue's depth, jobs in progress and failures per job name."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bot.jobs.common import JOB_METRICS_KEY
from bot.storage.queue import queue_stats
from bot.web.api.core import (
    _state,
    guarded,
    require_admin,
)

# --- queues --------------------------------------------------------------------------------

JOB_PREFIXES = {
    "delivery": "process_delivery",
    "plan": "plan_protocol",
    "exec": "execute_step",
    "qa": "run_quality",
    "setup": "project_setup",
}
FAILED_OUTCOMES = ("failed", "error", "timeout")


def job_name_of(job_id: str) -> str:
    prefix = job_id.split(":", 1)[0]
    return JOB_PREFIXES.get(prefix, prefix)


async def queue_snapshot(redis: Any, sample: int = 2000) -> dict[str, Any]:
    """Depth, in-progress and outcome counts per job name.

    Queued and in-progress jobs are sampled up to `sample`.
    """
    from arq.constants import default_queue_name

    stats = await queue_stats(redis)
    jobs: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return jobs.setdefault(name, {"queued": 0, "in_progress": 0, "failed": 0, "outcomes": {}})

    # the queue is a sorted set of job ids; our ids start with a per-function prefix
    for raw in await redis.zrange(default_queue_name, 0, sample - 1):
        entry(job_name_of(raw.decode() if isinstance(raw, bytes) else str(raw)))["queued"] += 1
    seen = 0
    async for raw in redis.scan_iter(match="arq:in-progress:*", count=500):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        entry(job_name_of(key.removeprefix("arq:in-progress:")))["in_progress"] += 1
        seen += 1
        if seen >= sample:
            break
    counts: dict[Any, Any] = await redis.hgetall(JOB_METRICS_KEY)
    failed_total = 0
    for raw_key, raw_value in counts.items():
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        name, _, outcome = key.partition("|")
        item = entry(name)
        item["outcomes"][outcome] = int(raw_value)
        if outcome in FAILED_OUTCOMES:
            item["failed"] += int(raw_value)
            failed_total += int(raw_value)
    return {
        "queue": default_queue_name,
        "depth": stats.depth,
        "in_progress": stats.in_progress,
        "failed": failed_total,
        "jobs": dict(sorted(jobs.items())),
    }


@guarded
async def queues(request: Request) -> Response:
    """The arq queue: depth, jobs in progress, failures, per job name."""
    require_admin(request)
    redis = _state(request).redis
    try:
        snapshot = await queue_snapshot(redis)
    except (OSError, ConnectionError) as exc:
        return JSONResponse({"error": f"queue unreachable: {type(exc).__name__}"}, status_code=503)
    except Exception as exc:  # redis-py raises its own ConnectionError/TimeoutError family
        if type(exc).__module__.startswith("redis"):
            return JSONResponse(
                {"error": f"queue unreachable: {type(exc).__name__}"}, status_code=503
            )
        raise
    return JSONResponse(snapshot)
