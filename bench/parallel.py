"""Benchmark: a plan that is a graph, run with max_parallel_steps=3 against 1 (the baseline).

Five steps, three of them independent (01, 02, 03 depend on nothing; 04 needs 01 and 02, 05
needs 03). Every engine call of a step waits `--delay` seconds (2 by default), standing for a
model turn; QA is skipped so the engine time is the execute calls only. Both runs plan first,
then the clock runs from the first step's start to the protocol's completion (every step merged
into the protocol branch). Goal (issue #17): parallel finishes >= 1.8x faster.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout

from bot.core.settings import Settings  # noqa: E402
from bot.jobs.actions import start_protocol  # noqa: E402
from bot.jobs.advance import enqueue_next_step  # noqa: E402
from bot.jobs.local_runtime import drain, local_runtime  # noqa: E402
from bot.storage.runs import get_or_create_project, load_run, update_run  # noqa: E402
from engines.registry import EngineRegistry  # noqa: E402
from engines.scripted import ScriptedEngine  # noqa: E402

DEPENDS_ON: list[list[int]] = [[], [], [], [1, 2], [3]]


def origin(where: Path) -> Path:
    seed = where / "seed"
    seed.mkdir()
    (seed / "README.md").write_text("# bench\n")
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "--all"],
        ["-c", "user.name=b", "-c", "user.email=b@x", "commit", "-q", "-m", "init"],
    ):
        subprocess.run(["git", *args], cwd=seed, check=True, capture_output=True)
    bare = where / "origin.git"
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(seed), str(bare)],
        cwd=where,
        check=True,
        capture_output=True,
    )
    return bare


def script(delay_s: float) -> dict[str, Any]:
    steps = [
        {"slug": f"part-{i}", "title": f"Part {i}", "content": f"# Part {i}\n",
         "commit_type": "feat", "qa_policy": "skip", "depends_on": deps}
        for i, deps in enumerate(DEPENDS_ON, start=1)
    ]  # fmt: skip
    execute = {
        f"part-{i}": {
            "message": f"part {i}",
            "delay_s": delay_s,
            "files": [{"path": f"part{i}.txt", "content": f"{i}\n"}],
        }
        for i in range(1, len(DEPENDS_ON) + 1)
    }
    return {
        "planning": {"title": "Bench", "plan": "# Plan\n", "setup": "# Setup\n", "steps": steps},
        "execute": {"steps": execute},
    }


async def run_once(bound: int, delay_s: float) -> float:
    with tempfile.TemporaryDirectory(prefix="df-bench-parallel-") as tmp:
        where = Path(tmp)
        settings = Settings(
            data_dir=where / "data", db_url=f"sqlite:///{where / 'db.sqlite3'}", engine="scripted",
            max_parallel_steps=bound, worker_poll_delay_s=0.01, log_level="WARNING",
        )  # fmt: skip
        async with local_runtime(settings) as ctx:
            ctx["engines"] = EngineRegistry([ScriptedEngine(script(delay_s))])
            project = await get_or_create_project(
                ctx["db"],
                name="bench",
                provider="local",
                git_url=str(origin(where)),
                base_branch="main",
            )
            run = await start_protocol(ctx, project, "Bench parallel steps", approved=True)
            await drain(ctx, project.id, printer=lambda _line: None)
            await update_run(ctx["db"], run.id, auto_mode=True)
            started = time.perf_counter()
            await enqueue_next_step(ctx, run.id)
            await drain(ctx, project.id, printer=lambda _line: None)
            took = time.perf_counter() - started
            state = await load_run(ctx["db"], run.id)
            if state.run.status != "completed":
                raise SystemExit(
                    f"bound {bound}: the protocol ended {state.run.status}: "
                    f"{state.run.runtime_state}"
                )
            return took


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--delay", type=float, default=2.0, help="seconds each step's engine call waits"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each, alternating; medians compared"
    )
    args = parser.parse_args()
    print(f"plan: 5 steps, depends_on {DEPENDS_ON}; engine wait {args.delay:.1f} s per step")
    serials: list[float] = []
    parallels: list[float] = []
    for n in range(args.repeat):
        serials.append(await run_once(1, args.delay))
        parallels.append(await run_once(3, args.delay))
        print(
            f"run {n + 1}: max_parallel_steps=1 {serials[-1]:.2f} s, "
            f"max_parallel_steps=3 {parallels[-1]:.2f} s"
        )
    serial, parallel = statistics.median(serials), statistics.median(parallels)
    print(f"max_parallel_steps=1: {serial:.2f} s (median of {args.repeat})")
    print(f"max_parallel_steps=3: {parallel:.2f} s (median of {args.repeat})")
    ratio = serial / parallel
    print(f"ratio={ratio:.2f} (goal >= 1.8) -> {'ok' if ratio >= 1.8 else 'MISSED'}")


if __name__ == "__main__":
    asyncio.run(main())
