"""Per-protocol lease in Redis: SET NX with a token and a short TTL that its holder renews.

A job holds its protocol's lease for as long as it runs; a background task renews it (every
10 s, TTL 60 s by default). A worker that dies stops renewing, the key expires within a minute
and the reclaim cron (bot/jobs/reclaim.py) hands the step to another worker. The lease is the
signal "someone is working on this protocol"; arq's in-progress key of each job is renewed the
same way by its worker (bot/jobs/resilient.py), so a dead worker's job itself also comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.exceptions import WatchError

from bot.core.errors import LockBusy

log = logging.getLogger(__name__)

LOCK_PREFIX = "deksdenflow:lock:protocol:"
LEASE_TTL_S = 60.0
LEASE_RENEW_S = 10.0


async def acquire(redis: Any, name: str, ttl_s: float) -> str | None:
    token = secrets.token_hex(16)
    ok = await redis.set(LOCK_PREFIX + name, token, nx=True, px=int(ttl_s * 1000))
    return token if ok else None


async def _if_ours(redis: Any, name: str, token: str, act: Callable[[Any, str], Any]) -> bool:
    """Apply `act(pipeline, key)` atomically, only while the key still holds our token."""
    key = LOCK_PREFIX + name
    async with redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(key)
            current = await pipe.get(key)
            if (
                current is None
                or (current.decode() if isinstance(current, bytes) else current) != token
            ):
                await pipe.reset()
                return False
            pipe.multi()
            act(pipe, key)
            await pipe.execute()
            return True
        except WatchError:
            return False


async def renew(redis: Any, name: str, token: str, ttl_s: float) -> bool:
    """Extend the TTL only while the key still holds our token."""
    return await _if_ours(
        redis, name, token, lambda pipe, key: pipe.pexpire(key, int(ttl_s * 1000))
    )


async def lease_alive(redis: Any, run_id: int) -> bool:
    """Whether some worker holds this protocol's lease right now."""
    return bool(await redis.exists(LOCK_PREFIX + str(run_id)))


async def _keep_renewing(
    redis: Any, name: str, token: str, ttl_s: float, every_s: float, stop: asyncio.Event
) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
            return
        try:
            if not await renew(redis, name, token, ttl_s):
                log.warning("lease of protocol run %s was lost", name)
                return
        except Exception:  # a Redis hiccup: try again next tick while the TTL still runs
            log.warning("could not renew the lease of protocol run %s", name, exc_info=True)


async def release(redis: Any, name: str, token: str) -> bool:
    """Delete the key only if it still holds our token (a lock that expired is someone else's)."""
    return await _if_ours(redis, name, token, lambda pipe, key: pipe.delete(key))


@contextlib.asynccontextmanager
async def protocol_lock(
    redis: Any, run_id: int, ttl_s: float = LEASE_TTL_S, renew_s: float = LEASE_RENEW_S
) -> AsyncIterator[str]:
    """Hold the run's lease for the block, renewed in the background; LockBusy when taken."""
    async with lease(redis, str(run_id), f"protocol run {run_id}", ttl_s, renew_s) as token:
        yield token


def step_lease_name(run_id: int, step_index: int) -> str:
    """A step's own lease, for the steps of a graph that run side by side (bot/jobs/schedule.py)."""
    return f"{run_id}:step:{step_index}"


async def step_lease_alive(redis: Any, run_id: int, step_index: int) -> bool:
    return bool(await redis.exists(LOCK_PREFIX + step_lease_name(run_id, step_index)))


@contextlib.asynccontextmanager
async def lease(
    redis: Any, name: str, what: str, ttl_s: float = LEASE_TTL_S, renew_s: float = LEASE_RENEW_S
) -> AsyncIterator[str]:
    """Hold the lease `name` for the block, renewed in the background; LockBusy when taken."""
    token = await acquire(redis, name, ttl_s)
    if token is None:
        raise LockBusy(f"{what} is busy in another worker")
    stop = asyncio.Event()
    renewer = asyncio.create_task(_keep_renewing(redis, name, token, ttl_s, renew_s, stop))
    try:
        yield token
    finally:
        # Stopped by an event, not by cancelling it: a cancel that lands while a renewal is inside
        # redis-py can be swallowed there (the renewer was seen "cancelling" yet asleep in its
        # next round), and the job then waited here forever, its step done but never followed
        # up. The renewer now ends after at most one Redis call (bounded by the socket timeout).
        stop.set()
        try:
            await asyncio.shield(renewer)
        finally:
            # shielded: a job cancelled by arq must still hand its lease back
            await asyncio.shield(release(redis, name, token))
