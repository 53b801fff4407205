"""`deksdenflow worker` with round-trip counters, for bench/scale.py (run as a script).

Counts what this process sends: SQL statements and commits (SQLAlchemy engine events), the
pool's pings, and Redis round trips (single commands, and pipelines as one), by command name;
and where the job time goes: seconds in SQL, in each git subcommand and waiting for a mirror
lock; and CPU seconds of the worker and of its git processes. SIGUSR1 writes them to
$BENCH_COUNTS as JSON; $BENCH_COUNTS.ready appears once the worker has started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.asyncio import client as redis_client  # noqa: E402
from sqlalchemy import event  # noqa: E402
from sqlalchemy.dialects.postgresql._psycopg_common import _PGDialect_common_psycopg  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from bot.core.settings import load_settings  # noqa: E402
from bot.jobs.boundary import git_verb  # noqa: E402
from bot.jobs.worker import build_worker, use_pidfd_watcher  # noqa: E402

COUNTS: Counter[str] = Counter()
TIMES: defaultdict[str, float] = defaultdict(float)  # wall seconds, keys "time:…"


def _count_sql(conn: Any, *_args: Any, **_kwargs: Any) -> None:
    COUNTS["pg:statements"] += 1
    conn.info.setdefault("bench_started", []).append(time.perf_counter())


def _time_sql(conn: Any, *_args: Any, **_kwargs: Any) -> None:
    started = conn.info.get("bench_started")
    if started:
        TIMES["time:sql"] += time.perf_counter() - started.pop()


def _count_commit(*_args: Any) -> None:
    COUNTS["pg:commits"] += 1


def _count_pings() -> None:
    """The pool's pings (a round trip each, sent past the cursor events counted above)."""
    ping: Any = _PGDialect_common_psycopg.do_ping

    def counted(self: Any, dbapi_connection: Any) -> bool:
        COUNTS["pg:pings"] += 1
        return bool(ping(self, dbapi_connection))

    _PGDialect_common_psycopg.do_ping = counted  # type: ignore[method-assign]


class _GitTimes(logging.Handler):
    """Wall time of each git command by subcommand, read from the runner's own debug line."""

    def emit(self, record: logging.LogRecord) -> None:
        if not record.msg.startswith("git rc="):
            return
        _rc, seconds, shown = record.args  # type: ignore[misc]
        verb = git_verb(str(shown).split())
        TIMES[f"time:git {verb}"] += float(str(seconds))
        COUNTS[f"git:{verb}"] += 1


def _time_mirror_lock() -> None:
    """Wall time spent waiting for a mirror lock (held across fetches and worktree changes)."""
    from bot.git import cache

    inner = cache.mirror_lock  # type: ignore[attr-defined]

    @contextlib.asynccontextmanager
    async def timed(repo_dir: Path, **kwargs: Any) -> AsyncIterator[None]:
        started = time.perf_counter()
        async with inner(repo_dir, **kwargs):
            TIMES["time:mirror lock wait"] += time.perf_counter() - started
            yield

    cache.mirror_lock = timed  # type: ignore[attr-defined]


def _patch_redis() -> None:
    single: Any = redis_client.Redis.execute_command
    pipeline: Any = redis_client.Pipeline.execute

    async def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        COUNTS[f"redis:{str(args[0]).upper()}"] += 1
        return await single(self, *args, **options)

    async def execute(self: Any, raise_on_error: bool = True) -> Any:
        COUNTS["redis:PIPELINE"] += 1
        return await pipeline(self, raise_on_error)

    redis_client.Redis.execute_command = execute_command  # type: ignore[method-assign]
    redis_client.Pipeline.execute = execute  # type: ignore[method-assign]


def _cpu() -> dict[str, float]:
    """CPU seconds so far of this worker and of the git processes it started (and waited for):
    unlike wall times, these do not grow when other processes load the machine."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu:worker": own.ru_utime + own.ru_stime,
        "cpu:git": children.ru_utime + children.ru_stime,
    }


def _dump(_signum: int, _frame: FrameType | None) -> None:
    path = Path(os.environ["BENCH_COUNTS"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**COUNTS, **TIMES, **_cpu()}))
    tmp.replace(path)


def main() -> None:
    event.listen(Engine, "before_cursor_execute", _count_sql)
    event.listen(Engine, "after_cursor_execute", _time_sql)
    git_log = logging.getLogger("bot.git.runner")
    git_log.setLevel(logging.DEBUG)
    git_log.addHandler(_GitTimes())
    git_log.propagate = False
    _time_mirror_lock()
    event.listen(Engine, "commit", _count_commit)
    _count_pings()
    _patch_redis()
    signal.signal(signal.SIGUSR1, _dump)
    worker = build_worker(load_settings(), handle_signals=True)
    use_pidfd_watcher(worker.loop)  # as run_worker does
    startup = worker.on_startup

    async def on_startup(ctx: dict[str, Any]) -> None:
        if startup is not None:
            await startup(ctx)
        Path(os.environ["BENCH_COUNTS"] + ".ready").touch()

    worker.on_startup = on_startup
    worker.run()


if __name__ == "__main__":
    main()
