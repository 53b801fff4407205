"""Shared job plumbing: retry backoff, job outcome counters, the services carried in ctx."""

from __future__ import annotations

import logging
from typing import Any

from arq import Retry

log = logging.getLogger(__name__)

MAX_TRIES = 3
JOB_METRICS_KEY = "deksdenflow:metrics:jobs"


def backoff_seconds(job_try: int, cap: float = 60.0) -> float:
    """Exponential backoff for the next attempt: 2, 4, 8 … seconds, capped."""
    return float(min(cap, 2 ** max(1, job_try)))


def retry_or_give_up(ctx: dict[str, Any], exc: BaseException) -> None:
    """Raise arq's Retry while attempts remain; return when the last one failed."""
    job_try = int(ctx.get("job_try", 1))
    if job_try < MAX_TRIES:
        raise Retry(defer=backoff_seconds(job_try)) from exc


async def count_job(ctx: dict[str, Any], job: str, outcome: str) -> None:
    """Count job outcomes in Redis so /metrics sees every worker process, not just its own."""
    redis = ctx.get("redis")
    if redis is None:
        return
    try:
        await redis.hincrby(JOB_METRICS_KEY, f"{job}|{outcome}", 1)
    except Exception:  # metrics must never fail a job
        log.debug("could not count job outcome", exc_info=True)
