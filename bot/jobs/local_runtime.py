"""Run the bot's jobs in this process against a local repository: the CLI and the demo use it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.handlers.routes import build_router
from bot.jobs.services import build_services, close_services
from bot.jobs.worker import build_worker
from bot.storage.db import database_from_settings
from bot.storage.migrate import upgrade_head
from bot.storage.models import Event, Project
from bot.storage.queue import create_redis
from bot.storage.runs import get_or_create_project, local_project_name


@contextlib.asynccontextmanager
async def local_runtime(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """The same ctx a worker has, with an in-process queue that only this process drains."""
    if settings.database_url.startswith("sqlite"):
        await asyncio.to_thread(upgrade_head, settings.database_url)
    # a CLI run is short: no background spare worktree that the exit would cut off
    local = settings.model_copy(update={"redis_url": "memory://", "warm_worktrees": False})
    db = database_from_settings(local)
    redis = create_redis(local)
    ctx: dict[str, Any] = {"settings": local, "db": db, "redis": redis, "router": build_router()}
    await build_services(ctx)
    try:
        yield ctx
    finally:
        await close_services(ctx)
        await redis.aclose(close_connection_pool=True)
        await db.dispose()


async def git_toplevel(path: Path) -> Path:
    proc = await asyncio.create_subprocess_exec(
        "git",
        "-C",
        str(path),
        "rev-parse",
        "--show-toplevel",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise ConfigError(f"{path} is not a git repository (use --repo PATH)")
    return Path(out.decode().strip())


async def local_project(ctx: dict[str, Any], repo: Path, base: str | None) -> Project:
    top = await git_toplevel(repo)
    if base is None:
        proc = await asyncio.create_subprocess_exec(
            "git",
            "-C",
            str(top),
            "symbolic-ref",
            "--short",
            "HEAD",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        base = out.decode().strip() or "main"
    return await get_or_create_project(
        ctx["db"],
        name=local_project_name(top),
        provider="local",
        git_url=str(top),
        base_branch=base,
    )


Printer = Callable[[str], None]


def default_printer(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def drain(
    ctx: dict[str, Any], project_id: int | None = None, printer: Printer = default_printer
) -> None:
    """Run queued jobs (and what they enqueue) to the end, printing events as they happen."""
    worker = build_worker(ctx["settings"], ctx=ctx, burst=True)
    started = time.monotonic()
    last_id = await _last_event_id(ctx)
    task = asyncio.create_task(worker.async_run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.3)
            last_id = await _print_events(ctx, last_id, started, printer, project_id)
        await task
    finally:
        if not task.done():
            task.cancel()
        await _print_events(ctx, last_id, started, printer, project_id)


async def _last_event_id(ctx: dict[str, Any]) -> int:
    async with ctx["db"].sessions() as session:
        value = (
            await session.execute(select(Event.id).order_by(Event.id.desc()).limit(1))
        ).scalar()
        return int(value or 0)


async def _print_events(
    ctx: dict[str, Any], after: int, started: float, printer: Printer, project_id: int | None
) -> int:
    async with ctx["db"].sessions() as session:
        query = select(Event).where(Event.id > after).order_by(Event.id)
        if project_id is not None:
            query = query.where(Event.project_id == project_id)
        events = list((await session.execute(query)).scalars())
    for event in events:
        elapsed = time.monotonic() - started
        tokens = (event.metadata_ or {}).get("usage", {}).get("input_tokens")
        extra = ""
        if isinstance(tokens, int):
            usage = event.metadata_["usage"]
            extra = f" [{usage.get('input_tokens', 0) + usage.get('output_tokens', 0)} tokens]"
        printer(
            f"[{int(elapsed) // 60:02d}:{elapsed % 60:04.1f}] "
            f"{event.event_type:<22} {event.message}{extra}"
        )
        after = max(after, event.id)
    return after
