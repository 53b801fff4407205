"""An arq Worker that rides out Redis outages: it backs off and reconnects instead of exiting."""

from __future__ import annotations

import asyncio
import logging

from arq.utils import poll
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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

    async def close(self) -> None:
        """arq's close(), without exiting 1 over a job handed back on SIGTERM.

        A job cancelled at the end of the shutdown grace (bot/jobs/shutdown.py) ends its task
        with CancelledError; arq's close() gathers the tasks without `return_exceptions`, so
        that error would escape run() and the worker would exit non-zero after a clean hand-back.
        """
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
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
        log.info("Starting worker for %d functions: %s", len(self.functions), ", ".join(self.functions))
        await self._until_redis_answers()
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
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
        if 0 <= self.max_burst_jobs <= self._jobs_started() or await self.pool.zcard(self.queue_name) == 0:
            await asyncio.gather(*self.tasks.values())
            return True
        return False
