"""Per-protocol lock in Redis: SET NX with a token and TTL, released only by its holder."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import WatchError

from bot.errors import LockBusy

LOCK_PREFIX = "deksdenflow:lock:protocol:"


async def acquire(redis: Any, name: str, ttl_s: int) -> str | None:
    token = secrets.token_hex(16)
    ok = await redis.set(LOCK_PREFIX + name, token, nx=True, ex=ttl_s)
    return token if ok else None


async def release(redis: Any, name: str, token: str) -> bool:
    """Delete the key only if it still holds our token (a lock that expired is someone else's)."""
    key = LOCK_PREFIX + name
    async with redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(key)
            current = await pipe.get(key)
            if current is None or (current.decode() if isinstance(current, bytes) else current) != token:
                await pipe.reset()
                return False
            pipe.multi()
            pipe.delete(key)
            await pipe.execute()
            return True
        except WatchError:
            return False


@contextlib.asynccontextmanager
async def protocol_lock(redis: Any, run_id: int, ttl_s: int = 3600) -> AsyncIterator[str]:
    """Hold the run's lock for the block; raise LockBusy when another worker has it."""
    name = str(run_id)
    token = await acquire(redis, name, ttl_s)
    if token is None:
        raise LockBusy(f"protocol run {run_id} is busy in another worker")
    try:
        yield token
    finally:
        await release(redis, name, token)
