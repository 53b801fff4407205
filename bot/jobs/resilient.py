"""An arq Worker that rides out Redis outages: it backs off and reconnects instead of exiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.utils import poll, timestamp_ms
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot.jobs.affinity import (
    RELEASE_LUA,
    WARM_TTL_MS,
    Queued,
    pickable,
    run_of,
    runs_of,
    warm_key,
)

log = logging.getLogger(__name__)

# What a Redis outage looks like from the client: refused or dropped connections, timeouts,
# a server still loading its data after a restart (BusyLoadingError is a ConnectionError).
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)


def next_backoff(current: float, cap: float) -> float:
    """Double the wait after each failed round, up to `cap` seconds."""
    return min(cap, current * 2)


class ResilientWorker(Worker):
    """arq's Worker whose main loop never ends on a connection error.

    arq's own `main()` lets a Redis error escape from its poll loop (also one re-raised from a
    finished job's task), which ends `Worker.run()` and the process with it: every delivery in
    flight then waits for a human to restart the worker. Here each round that meets an outage
    is logged and retried after a backoff (0.5 s doubling to 10 s); the pool reconnects by
    itself once Redis answers. Jobs that were running finish against the database as usual;
    deliveries whose queue entries were lost are relayed again from the database (outbox and
    expired leases), so nothing depends on what Redis kept.
    """

    backoff_start_s = 0.5
    backoff_cap_s = 10.0

    def __init__(
        self,
        *args: Any,
        in_progress_ttl_s: float | None = None,
        in_progress_renew_s: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # arq marks a running job with an in-progress key that lives for the longest job timeout
        # (over an hour here): a worker SIGKILLed or lost with its node would hold every job it
        # had taken for that long, including jobs that had not yet left a trace in the database
        # (a step job still waiting for the mirror), which nothing else can find. With a short
        # TTL renewed while the worker lives, arq itself hands those jobs to another worker
        # within a minute of the death; the protocol lease keeps one step on one worker.
        if in_progress_ttl_s is not None:
            self.in_progress_timeout_s = in_progress_ttl_s
        self.in_progress_renew_s = in_progress_renew_s
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        # who this worker is in the warm marks (bot/jobs/affinity.py), and what it marked
        self.affinity_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._warm: set[int] = set()
        self._releasing: asyncio.Task[None] | None = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs, on the queued jobs this worker may take now (bot/jobs/affinity.py):
        jobs of a protocol whose worktree another worker holds wait a moment for that worker."""
        ids = [job_id.decode() for job_id in job_ids]
        runs = runs_of(ids)
        if runs:
            ids = await self._pickable(ids, runs)
        await super().start_jobs([job_id.encode() for job_id in ids])
        started = runs_of(job_id for job_id in ids if job_id in self.tasks)
        if started:
            await self._mark_warm(started)

    async def _pickable(self, ids: list[str], runs: list[int]) -> list[str]:
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.mget([warm_key(run) for run in runs])
            for job_id in ids:
                pipe.zscore(self.queue_name, job_id)
            held, *scores = await pipe.execute()
        owners = {
            run: owner.decode() for run, owner in zip(runs, held, strict=True) if owner is not None
        }
        queued = [
            Queued(job_id, run_of(job_id), score) for job_id, score in zip(ids, scores, strict=True)
        ]
        return pickable(queued, owners, self.affinity_id, timestamp_ms())

    async def _mark_warm(self, runs: list[int]) -> None:
        async with self.pool.pipeline(transaction=False) as pipe:
            for run in runs:
                pipe.set(warm_key(run), self.affinity_id, px=WARM_TTL_MS)
            await pipe.execute()
        self._warm.update(runs)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        """arq's SIGTERM handler (it stops taking jobs), and the warm marks go at once: the next
        jobs of this worker's protocols, handed back or queued by a step finishing in the
        grace period, are for the other workers now, without waiting out a grace for this one."""
        super().handle_sig_wait_for_completion(signum)
        self._releasing = self.loop.create_task(self._release_warm())

    async def _release_warm(self) -> None:
        """On the way out: this worker's worktrees go with it, so nobody need wait for it."""
        if not self._warm:
            return
        keys = [warm_key(run) for run in self._warm]
        try:
            await self.pool.eval(RELEASE_LUA, len(keys), *keys, self.affinity_id)  # type: ignore[misc]
        except REDIS_DOWN as exc:  # the marks expire; meanwhile others wait out the grace
            log.warning("could not release %d warm mark(s): %s", len(keys), exc)
        self._warm.clear()

    async def _renew_in_progress(self) -> None:
        while True:
            # ended by an event, not a cancel (see bot/jobs/locks.py: a cancel can get lost in
            # redis-py)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.in_progress_renew_s)
                return
            running = [job_id for job_id, task in self.tasks.items() if not task.done()]
            if not running:
                continue
            ttl_ms = int(self.in_progress_timeout_s * 1000)
            try:
                # PEXPIRE leaves a key that is gone alone: a job that ended meanwhile stays ended
                async with self.pool.pipeline(transaction=False) as pipe:
                    for job_id in running:
                        pipe.pexpire(in_progress_key_prefix + job_id, ttl_ms)
                    await pipe.execute()
            except REDIS_DOWN as exc:  # the TTL still runs: try again next round
                log.warning(
                    "could not renew the in-progress keys of %d job(s): %s", len(running), exc
                )

    async def close(self) -> None:
        """arq's close(), without exiting 1 over a job handed back on SIGTERM.

        A job cancelled at the end of the shutdown grace (bot/jobs/shutdown.py) ends its task
        with CancelledError; arq's close() gathers the tasks without `return_exceptions`, so
        that error would escape run() and the worker would exit non-zero after a clean hand-back.
        """
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self._heartbeat is not None:
            self._closing.set()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
        if self._pool is not None:
            await self._release_warm()
        await super().close()

    async def _until_redis_answers(self) -> None:
        delay = self.backoff_start_s
        while True:
            try:
                await self.pool.ping()
                return
            except REDIS_DOWN as exc:
                log.warning("Redis unreachable at start (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = next_backoff(delay, self.backoff_cap_s)

    async def main(self) -> None:
        if self._pool is None:  # build_worker always hands one in; arq's path for the rest
            await super().main()
            return
        log.info(
            "Starting worker for %d functions: %s", len(self.functions), ", ".join(self.functions)
        )
        await self._until_redis_answers()
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        # runs until close(): jobs go on running through a SIGTERM's grace period
        self._heartbeat = asyncio.create_task(self._renew_in_progress())
        delay = self.backoff_start_s
        async for _ in poll(self.poll_delay_s):
            try:
                await self._poll_iteration()
                if self.burst and await self._burst_done():
                    return
            except REDIS_DOWN as exc:
                log.warning("Redis unreachable (%s); the worker carries on in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = next_backoff(delay, self.backoff_cap_s)
                continue
            delay = self.backoff_start_s

    async def _burst_done(self) -> bool:
        """arq's own end-of-burst test."""
        if (
            0 <= self.max_burst_jobs <= self._jobs_started()
            or await self.pool.zcard(self.queue_name) == 0
        ):
            await asyncio.gather(*self.tasks.values())
            return True
        return False
