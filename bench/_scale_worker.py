"""`deksdenflow worker` with round-trip counters, for bench/scale.py (run as a script).

Counts what this process sends: SQL statements and commits (SQLAlchemy engine events) and Redis
round trips (single commands, and pipelines as one), by command name. SIGUSR1 writes the counts
to $BENCH_COUNTS as JSON; $BENCH_COUNTS.ready appears once the worker has started.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from redis.asyncio import client as redis_client  # noqa: E402
from sqlalchemy import event  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from bot.jobs.worker import build_worker  # noqa: E402
from bot.settings import load_settings  # noqa: E402

COUNTS: Counter[str] = Counter()


def _count_sql(*_args: Any, **_kwargs: Any) -> None:
    COUNTS["pg:statements"] += 1


def _count_commit(*_args: Any) -> None:
    COUNTS["pg:commits"] += 1


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


def _dump(_signum: int, _frame: FrameType | None) -> None:
    path = Path(os.environ["BENCH_COUNTS"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(COUNTS)))
    tmp.replace(path)


def main() -> None:
    event.listen(Engine, "before_cursor_execute", _count_sql)
    event.listen(Engine, "commit", _count_commit)
    _patch_redis()
    signal.signal(signal.SIGUSR1, _dump)
    worker = build_worker(load_settings(), handle_signals=True)
    startup = worker.on_startup

    async def on_startup(ctx: dict[str, Any]) -> None:
        if startup is not None:
            await startup(ctx)
        Path(os.environ["BENCH_COUNTS"] + ".ready").touch()

    worker.on_startup = on_startup
    worker.run()


if __name__ == "__main__":
    main()
