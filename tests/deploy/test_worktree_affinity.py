"""Worktree affinity (bot/jobs/affinity.py): a protocol's next job waits a moment for the worker
that holds its worktree; nobody's job waits for long, and a worker that leaves lets go."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from arq.worker import func

from bot.core.settings import Settings
from bot.jobs import catalogue
from bot.jobs.affinity import (
    FAIR_MS,
    GRACE_MS,
    Queued,
    pickable,
    run_of,
    runs_of,
    warm_key,
)
from bot.jobs.resilient import ResilientWorker
from bot.storage.queue import create_redis


def test_run_of_reads_the_protocol_jobs_ids() -> None:
    assert run_of("exec:12:3:0") == 12
    assert run_of("exec:12:3:reclaim:99") == 12
    assert run_of("qa:7:1:attempt-2") == 7
    assert run_of("plan:5:0") == 5
    assert run_of("replies:5:2:1") == 5
    assert run_of("review:5:later:1") == 5
    for other in ("delivery:github:abc", "setup:3:x", "onboard:3:x", "exec:x:1", "cron:reclaim"):
        assert run_of(other) is None
    assert runs_of(["exec:3:1:0", "qa:3:1:a", "exec:4:1:0", "delivery:x"]) == [3, 4]
    # the ids the job catalogue builds: the parse follows their format
    assert run_of(catalogue.execute_step(21, 2, "0").job_id) == 21
    assert run_of(catalogue.run_quality(22, 2, "a").job_id) == 22
    assert run_of(catalogue.plan_protocol(23).job_id) == 23
    assert run_of(catalogue.project_setup(24, "x").job_id) is None
    assert run_of(catalogue.process_delivery(25, "github", "abc").job_id) is None


def _q(job_id: str, age_ms: float | None, now: float = 100_000) -> Queued:
    return Queued(job_id, run_of(job_id), None if age_ms is None else now - age_ms)


def test_pickable_waits_for_the_owner_then_gives_up_waiting() -> None:
    now = 100_000
    owners = {1: "me", 2: "other", 3: "other"}
    queued = [
        _q("exec:9:1:0", 60_000),  # nobody's, overdue: first of all
        _q("exec:4:1:0", 5_000),  # nobody's
        _q("exec:2:1:0", GRACE_MS - 1),  # the other worker's, within the grace: left
        _q("exec:3:1:0", GRACE_MS),  # the other worker's, grace over
        _q("exec:1:2:0", 10),  # mine, just ready
        _q("delivery:github:x", 10),  # no protocol
        _q("exec:2:2:gone", None),  # left the queue meanwhile: arq's claim skips it
    ]
    assert pickable(queued, owners, "me", now) == [
        "exec:9:1:0",
        "exec:1:2:0",
        "exec:4:1:0",
        "exec:3:1:0",
        "delivery:github:x",
        "exec:2:2:gone",
    ]
    # an overdue job goes first even when it is someone else's
    assert pickable([_q("exec:1:2:0", 1), _q("exec:2:1:0", FAIR_MS)], owners, "me", now) == [
        "exec:2:1:0",
        "exec:1:2:0",
    ]


async def _job(ctx: dict[str, Any], run: int) -> str:
    return str(ctx["worker"])


def _worker(redis: Any, name: str) -> ResilientWorker:
    return ResilientWorker(
        functions=[func(_job, name="execute_step")], redis_pool=redis, ctx={"worker": name},
        handle_signals=False, poll_delay=0.05, job_timeout=60, keep_result=60,
    )  # fmt: skip


async def test_the_owner_gets_its_protocols_job_and_others_take_it_after_the_grace(
    redis_url: str,
) -> None:
    settings = Settings(redis_url=redis_url)
    ra, rb, probe = create_redis(settings), create_redis(settings), create_redis(settings)
    a, b = _worker(ra, "a"), _worker(rb, "b")
    try:
        # a runs protocol 41's first job: the protocol is warm on a from then on
        first = await probe.enqueue_job("execute_step", 41, _job_id="exec:41:1:0")
        assert first is not None
        await a.start_jobs([b"exec:41:1:0"])
        assert await asyncio.wait_for(first.result(poll_delay=0.05), 5) == "a"
        assert (await probe.get(warm_key(41))) == a.affinity_id.encode()

        # its next job: b, polling first, leaves it to a
        second = await probe.enqueue_job("execute_step", 41, _job_id="exec:41:2:0")
        assert second is not None
        await b.start_jobs([b"exec:41:2:0"])
        assert not b.tasks
        await a.start_jobs([b"exec:41:2:0"])
        assert await asyncio.wait_for(second.result(poll_delay=0.05), 5) == "a"

        # a is busy or gone: after the grace, b takes the protocol's job (and the protocol)
        third = await probe.enqueue_job("execute_step", 41, _job_id="exec:41:3:0")
        assert third is not None
        await b.start_jobs([b"exec:41:3:0"])
        assert not b.tasks
        await asyncio.sleep(GRACE_MS / 1000)
        await b.start_jobs([b"exec:41:3:0"])
        assert await asyncio.wait_for(third.result(poll_delay=0.05), 5) == "b"
        assert (await probe.get(warm_key(41))) == b.affinity_id.encode()

        # a worker that closes lets go of its marks, and only of its own (close() does this
        # before arq's close, which closes the pool with a call redis-py deprecates)
        await probe.set(warm_key(42), a.affinity_id)
        a._warm.add(42)
        a._warm.add(41)
        await a._release_warm()
        assert await probe.get(warm_key(42)) is None
        assert (await probe.get(warm_key(41))) == b.affinity_id.encode()
    finally:
        for worker in (a, b):
            await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        for redis in (ra, rb, probe):
            await redis.aclose(close_connection_pool=True)


async def test_sigterm_lets_go_of_the_marks_at_once(redis_url: str) -> None:
    """A worker draining on SIGTERM takes no more jobs: its protocols' next jobs must not wait
    out a grace for it."""
    settings = Settings(redis_url=redis_url)
    redis, probe = create_redis(settings), create_redis(settings)
    worker = _worker(redis, "a")
    try:
        await worker._mark_warm([43])
        assert await probe.get(warm_key(43)) == worker.affinity_id.encode()
        worker.handle_sig_wait_for_completion(signal.SIGTERM)
        assert not worker.allow_pick_jobs
        assert worker._releasing is not None
        await worker._releasing
        assert await probe.get(warm_key(43)) is None
    finally:
        await asyncio.sleep(0)  # arq's own wait-for-completion task: nothing to wait for
        for client in (redis, probe):
            await client.aclose(close_connection_pool=True)
