"""arq WorkerSettings and the in-process worker used by the embedded default (memory://)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

from arq.worker import Worker

from bot.core.errors import ConfigError
from bot.core.observability import configure_logging
from bot.core.settings import Settings, load_settings
from bot.handlers.routes import build_router
from bot.jobs import catalogue
from bot.jobs.common import MAX_TRIES
from bot.jobs.resilient import ResilientWorker
from bot.jobs.services import build_services, close_services
from bot.jobs.shutdown import shutdown_kwargs
from bot.storage.db import database_from_settings
from bot.storage.queue import create_redis, redis_settings

log = logging.getLogger(__name__)


def job_functions(settings: Settings) -> list[Any]:
    """Every job the worker runs: the whole catalogue (bot/jobs/catalogue.py)."""
    return list(catalogue.functions(settings))


async def startup(ctx: dict[str, Any]) -> None:
    """Build the services a job needs, unless the embedding process already put them in ctx."""
    settings: Settings = ctx.setdefault("settings", load_settings())
    if "db" not in ctx:
        ctx["db"] = database_from_settings(settings)
        ctx["owns_db"] = True
    ctx.setdefault("router", build_router())
    await build_services(ctx)


async def shutdown(ctx: dict[str, Any]) -> None:
    await close_services(ctx)
    if ctx.get("owns_db"):
        await ctx["db"].dispose()


def worker_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "functions": job_functions(settings),
        "cron_jobs": catalogue.cron_jobs(settings),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": settings.worker_max_jobs,
        "job_timeout": settings.job_timeout_s,
        "poll_delay": settings.worker_poll_delay_s,
        "max_tries": MAX_TRIES,
        "keep_result": 3600,
    }


def configure_worker_logging(settings: Settings) -> None:
    """Exactly what `serve` does: LOG_LEVEL, LOG_JSON and secret redaction."""
    configure_logging(settings.log_level, settings.log_json, settings.secret_values())


def standalone_kwargs(settings: Settings) -> dict[str, Any]:
    """A worker of its own process on DEKSDENFLOW_REDIS_URL; logging configured as in `serve`."""
    if settings.memory_queue:
        raise ConfigError(
            "DEKSDENFLOW_REDIS_URL is memory:// (in-process queue): `serve` runs its own worker; "
            "set a redis:// URL to run separate workers."
        )
    configure_worker_logging(settings)
    return {
        **worker_kwargs(settings),
        "redis_settings": redis_settings(settings.redis_url),
        "ctx": {"settings": settings},
    }


class _WorkerSettings(dict[str, Any]):
    """What `arq bot.jobs.worker.WorkerSettings` reads.

    arq accepts a dict and reads its `items()` when it builds the worker: the settings are
    loaded then (from the environment, with logging configured as `serve` does), never at
    import. The same catalogue as `deksdenflow worker`, so both run every job and the crons.
    """

    def _filled(self) -> _WorkerSettings:
        if not dict.__len__(self):
            self.update(standalone_kwargs(load_settings()))
        return self

    def items(self) -> Any:
        return dict.items(self._filled())

    def keys(self) -> Any:
        return dict.keys(self._filled())

    def __getitem__(self, key: str) -> Any:
        return dict.__getitem__(self._filled(), key)

    def __iter__(self) -> Any:
        return dict.__iter__(self._filled())

    def __len__(self) -> int:
        return dict.__len__(self._filled())


WorkerSettings = _WorkerSettings()


class InProcessWorker(Worker):
    """A Worker on an existing pool that skips arq's Redis INFO call (fakeredis lacks INFO)."""

    async def main(self) -> None:
        from arq.utils import poll

        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        async for _ in poll(self.poll_delay_s):
            await self._poll_iteration()
            if self.burst and await self.pool.zcard(self.queue_name) == 0:
                await asyncio.gather(*self.tasks.values())
                return None


def build_worker(
    settings: Settings,
    ctx: dict[str, Any] | None = None,
    burst: bool = False,
    handle_signals: bool = False,
) -> Worker:
    kwargs = {**worker_kwargs(settings), "handle_signals": handle_signals}
    if handle_signals:
        # SIGTERM: stop taking jobs, let steps finish within the grace period, hand back the rest
        kwargs.update(shutdown_kwargs(settings))
    if burst:
        # a cron job is always queued for its next run, so a burst worker would never drain
        kwargs["cron_jobs"] = []
    base_ctx = {"settings": settings, **(ctx or {})}
    redis = base_ctx.get("redis") or create_redis(settings)
    # fakeredis lacks INFO, which arq's own main() calls; real Redis gets a Worker that rides
    # out Redis outages (bot/jobs/resilient.py)
    if settings.memory_queue:
        return InProcessWorker(redis_pool=redis, ctx=base_ctx, burst=burst, **kwargs)
    # a running job's in-progress key lives as long as a protocol lease and is renewed as often
    return ResilientWorker(
        redis_pool=redis,
        ctx=base_ctx,
        burst=burst,
        in_progress_ttl_s=settings.lease_ttl_s,
        in_progress_renew_s=settings.lease_renew_s,
        **kwargs,
    )


def run_worker(settings: Settings) -> None:
    """Blocking entry point for `deksdenflow worker`: logging as in `serve`, every job and cron."""
    configure_worker_logging(settings)
    worker = build_worker(settings, handle_signals=True)
    use_pidfd_watcher(worker.loop)
    worker.run()


def use_pidfd_watcher(loop: asyncio.AbstractEventLoop) -> bool:
    """Wait for git processes on pidfds, not a thread each (Python 3.11's default): a step runs
    about ten git commands, and a thread per command cost a fifth of their spawning CPU.

    Only for a process whose one loop is `loop` (`deksdenflow worker`): the watcher is
    process-wide and serves that loop alone. Python 3.12+ does this by itself; a kernel or
    sandbox without pidfd_open keeps the default. True when installed.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)
    return True


async def stop_embedded_worker(
    worker: Worker, task: asyncio.Task[Any], grace_s: float = 10.0
) -> None:
    """Stop polling, give running jobs `grace_s` to finish, cancel the rest, run on_shutdown.

    arq's own `close()` cancels jobs and then awaits them, which re-raises CancelledError into
    the caller and closes the (shared) Redis pool; the embedding app owns that pool.
    """
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        _done, pending = await asyncio.wait(running, timeout=grace_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
    if worker.on_shutdown:
        with contextlib.suppress(Exception):
            await worker.on_shutdown(worker.ctx)


async def close_worker(worker: Worker) -> None:
    """Close a finished (burst) worker: on_shutdown, then its Redis pool.

    Equivalent to arq's `close()` minus its call of the deprecated `Redis.close`.
    """
    if worker.on_shutdown:
        await worker.on_shutdown(worker.ctx)
    await worker.pool.aclose(close_connection_pool=True)
