"""Benchmark: step throughput as workers are added, against one Redis and one Postgres.

For N = 1, 2, 4, 8 worker processes (`deksdenflow worker`, one job slot each, product defaults
otherwise) it plans 2N protocols of S steps (untimed), then approves them all in auto mode and
times how long the workers take to run every step. The scripted engine's step call waits 2 s
and uses no CPU, as a model call does; QA is skipped, so a step is one engine call plus the
bot's own work (lock, database, worktree, commit, push, forge records).

Printed per N: completed steps per minute and the ratio to N = 1 (goal ≥ 0.8 × N); at the
largest N the bot's own overhead per step (job time minus the engine's 2 s; goal p50 < 0.3 s)
and the queue wait between steps; and the round trips per step that the workers sent: SQL
statements and commits to Postgres (the connection pool's pings shown apart), Redis commands (a
pipeline counts once), with arq's idle polling shown apart; the CPU seconds per step of the
workers and of their git processes (which, unlike wall times, other load on the machine hardly
inflates); and where the job time goes at the largest N (seconds in SQL, in each git
subcommand, waiting for a mirror lock).

Needs a Postgres at DEKSDENFLOW_BENCH_PG_ADMIN (default: the test suite's) and `redis-server`
on PATH: the benchmark starts its own Redis so that nobody else's commands are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout

from arq.connections import ArqRedis  # noqa: E402
from sqlalchemy import create_engine, select, text  # noqa: E402

from bot.core.settings import Settings  # noqa: E402
from bot.handlers.routes import build_router  # noqa: E402
from bot.jobs.actions import start_protocol  # noqa: E402
from bot.jobs.services import build_services, close_services  # noqa: E402
from bot.jobs.steps import enqueue_next_step  # noqa: E402
from bot.storage.db import database_from_settings  # noqa: E402
from bot.storage.migrate import upgrade_head  # noqa: E402
from bot.storage.models import ProtocolRun  # noqa: E402
from bot.storage.queue import create_redis  # noqa: E402
from bot.storage.runs import get_or_create_project, load_run, update_run  # noqa: E402

PG_ADMIN = os.environ.get(
    "DEKSDENFLOW_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
ENGINE_WAIT_S = 2.0
POLL_COMMANDS = ("redis:ZRANGEBYSCORE",)
ENV = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True)


def small_origin(where: Path) -> Path:
    seed = where / "seed"
    for i in range(50):
        path = seed / "src" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def f{i}(x):\n    return x + {i}\n")
    git("init", "-q", "-b", "main", cwd=seed)
    git("add", "--all", cwd=seed)
    git("-c", "user.name=b", "-c", "user.email=b@x", "commit", "-q", "-m", "init", cwd=seed)
    bare = where / "origin.git"
    git("clone", "-q", "--bare", str(seed), str(bare), cwd=where)
    return bare


def engine_script(steps: int) -> dict[str, Any]:
    return {
        "usage": {"input_tokens": 100, "output_tokens": 50},
        "planning": {
            "title": "{task}",
            "plan": "# Plan\n",
            "context": "# Context\n",
            "log": "# Log\n",
            "setup": "# Setup\n",
            "steps": [
                {
                    "slug": f"step-{i}",
                    "title": f"Step {i}",
                    "content": f"# Step {i}\n",
                    "commit_type": "feat",
                    "qa_policy": "skip",
                }
                for i in range(1, steps + 1)
            ],
        },
        "decompose": {"default": "# {title}\n"},
        "execute": {
            "delay_s": ENGINE_WAIT_S,
            "default": {
                "message": "done {step_index}",
                "files": [{"path": "src/step_{step_index}.py", "content": "X = {step_index}\n"}],
            },
        },
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def own_redis(where: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(where),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def own_database() -> Iterator[str]:
    name = f"df_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    try:
        upgrade_head(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


class Workers:
    """N `_scale_worker.py` processes with their own DATA_DIR and counter files."""

    def __init__(self, n: int, where: Path, env: dict[str, str]) -> None:
        self.files = [where / f"counts-{i}.json" for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(n):
            worker_env = {
                **env,
                "DEKSDENFLOW_DATA_DIR": str(where / f"data-{i}"),
                "BENCH_COUNTS": str(self.files[i]),
            }
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, str(ROOT / "bench" / "_scale_worker.py")],
                    env=worker_env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(where / f"worker-{i}.log", "wb"),
                )
            )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not all(Path(f"{f}.ready").exists() for f in self.files):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit("workers did not start; see worker-*.log")
            time.sleep(0.05)

    def counts(self) -> Counter[str]:
        for f in self.files:
            f.unlink(missing_ok=True)
        for p in self.procs:
            p.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not all(f.exists() for f in self.files):
            if time.monotonic() > deadline:
                raise SystemExit("workers did not report their counts")
            time.sleep(0.02)
        total: Counter[str] = Counter()
        for f in self.files:
            total.update(json.loads(f.read_text()))
        return total

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stderr is not None:
                p.stderr.close()


async def wait_status(ctx: dict[str, Any], run_ids: list[int], status: str, timeout: float) -> None:
    """Wait until every run has `status`: one query for all of them every 0.25 s. (Loading each
    run every 0.1 s cost this process about half a core at N = 8, on the cores the workers
    share, and showed up as their overhead.)"""
    deadline = time.monotonic() + timeout
    pending = set(run_ids)
    while pending:
        async with ctx["db"].one_read() as conn:
            rows = await conn.execute(
                select(ProtocolRun.id, ProtocolRun.status).where(ProtocolRun.id.in_(pending))
            )
            for run_id, now in rows.all():
                if now == status:
                    pending.discard(run_id)
                elif now in ("failed", "blocked", "cancelled"):
                    state = await load_run(ctx["db"], run_id)
                    raise SystemExit(f"run {run_id} is {now}: {state.run.runtime_state}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {len(pending)} runs to be {status}")
        if pending:
            await asyncio.sleep(0.25)


async def one_round(
    n: int, steps: int, where: Path, settings: Settings, project_git: str
) -> dict[str, Any]:
    """Plan 2n protocols, then time running all their steps on n workers."""
    redis: ArqRedis = create_redis(settings)
    await redis.flushdb()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")},
        "PYTHONPATH": str(ROOT),
        "DEKSDENFLOW_DB_URL": str(settings.db_url),
        "DEKSDENFLOW_REDIS_URL": settings.redis_url,
        "DEKSDENFLOW_ENGINE": "scripted",
        "DEKSDENFLOW_SCRIPTED_SCRIPT": str(settings.scripted_script),
        "DEKSDENFLOW_WORKER_MAX_JOBS": "1",
        "DEKSDENFLOW_LOG_LEVEL": "WARNING",
    }
    round_dir = where / f"n{n}"
    round_dir.mkdir()
    workers = Workers(n, round_dir, env)
    ctx: dict[str, Any] = {
        "settings": settings,
        "db": database_from_settings(settings),
        "redis": redis,
        "router": build_router(),
    }
    await build_services(ctx)
    try:
        workers.wait_ready()
        project = await get_or_create_project(
            ctx["db"], name=f"bench-{n}", provider="local", git_url=project_git, base_branch="main"
        )
        runs = [await start_protocol(ctx, project, f"Scale {n}-{i}") for i in range(2 * n)]
        ids = [r.id for r in runs]
        await wait_status(ctx, ids, "planned", timeout=120)
        before = workers.counts()
        started = time.monotonic()
        own_cpu = time.process_time()
        for run_id in ids:
            await update_run(ctx["db"], run_id, approved=True, auto_mode=True)
            await enqueue_next_step(ctx, run_id)
        await wait_status(ctx, ids, "completed", timeout=300)
        elapsed = time.monotonic() - started
        own_cpu = time.process_time() - own_cpu
        after = workers.counts()
        results = [r for r in await redis.all_job_results() if r.function == "execute_step"]
    finally:
        workers.stop()
        await close_services(ctx)
        await ctx["db"].dispose()
        await redis.aclose(close_connection_pool=True)
    done = len(ids) * steps
    assert len(results) == done, (len(results), done)
    job_s = [(r.finish_time - r.start_time).total_seconds() for r in results]
    waits = [(r.start_time - r.enqueue_time).total_seconds() for r in results]
    delta = after - before
    return {
        "n": n,
        "steps": done,
        "elapsed": elapsed,
        "per_min": done / elapsed * 60,
        "overhead": [s - ENGINE_WAIT_S for s in job_s],
        "waits": waits,
        "pg": (delta["pg:statements"] + delta["pg:commits"]) / done,
        "pings": delta["pg:pings"] / done,
        "redis": sum(v for k, v in delta.items() if k.startswith("redis:")) / done,
        "redis_poll": sum(delta[k] for k in POLL_COMMANDS) / done,
        # wall seconds per step (jobs overlap, so these add up to more than the elapsed time)
        "times": {
            k.removeprefix("time:"): v / done for k, v in delta.items() if k.startswith("time:")
        },
        "git": sum(v for k, v in delta.items() if k.startswith("git:")) / done,
        # CPU seconds per step, of the workers and of their git processes: load-independent
        "cpu": {k.removeprefix("cpu:"): v / done for k, v in delta.items() if k.startswith("cpu:")},
        # this process (approving, enqueueing, waiting) shares the cores: shown, not counted
        "harness_cpu": own_cpu / done,
    }


async def bench(counts: list[int], steps: int, keep: Path | None) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="df-bench-scale-", dir=keep) as tmp:
        where = Path(tmp)
        origin = small_origin(where)
        script_path = where / "engine.yml"
        script_path.write_text(yaml.safe_dump(engine_script(steps)))
        with own_redis(where) as redis_url, own_database() as db_url:
            settings = Settings(
                db_url=db_url,
                redis_url=redis_url,
                data_dir=where / "controller",
                engine="scripted",
                scripted_script=script_path,
                log_level="WARNING",
            )
            return [await one_round(n, steps, where, settings, str(origin)) for n in counts]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    ap.add_argument("--steps", type=int, default=3, help="steps per protocol (2N protocols)")
    ap.add_argument("--tmp", type=Path, default=None, help="parent for the scratch directory")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    rows = asyncio.run(bench(counts, args.steps, args.tmp))
    print(f"scripted steps waiting {ENGINE_WAIT_S:g} s; 2N protocols of {args.steps} steps; "
          f"one Redis, one Postgres; {os.cpu_count()} cores")  # fmt: skip
    print(f"{'workers':>7} {'steps':>5} {'time s':>7} {'steps/min':>9} {'ratio':>6} {'goal':>5} "
          f"{'pg/step':>8} {'(pings)':>8} {'redis/step':>10} {'(polls)':>8} {'cpu s/step':>10} "
          f"{'overhead p50 s':>14}")  # fmt: skip
    for r in rows:
        # vs the first (smallest) N; the goal scales with the worker ratio
        ratio = r["per_min"] / rows[0]["per_min"]
        goal = 0.8 * r["n"] / rows[0]["n"]
        print(
            f"{r['n']:>7} {r['steps']:>5} {r['elapsed']:>7.1f} {r['per_min']:>9.1f} {ratio:>6.2f} "
            f"{'OK' if ratio >= goal else 'MISS':>5} {r['pg']:>8.1f} {r['pings']:>8.1f} "
            f"{r['redis']:>10.1f} "
            f"{r['redis_poll']:>8.1f} {sum(r['cpu'].values()):>10.3f} "
            f"{statistics.median(r['overhead']):>14.3f}"
        )
    last = rows[-1]
    p50 = statistics.median(last["overhead"])
    p95 = sorted(last["overhead"])[int(0.95 * (len(last["overhead"]) - 1))]
    print(
        f"bot overhead per step at {last['n']} workers (job time - {ENGINE_WAIT_S:g} s): "
        f"p50 {p50:.3f} s, p95 {p95:.3f} s "
        f"(goal p50 < 0.3 s: {'OK' if p50 < 0.3 else 'MISSED'})"
    )
    print(f"CPU per step at {last['n']} workers: "
          + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(last["cpu"].items()))
          + f" (this harness, not counted: {last['harness_cpu']:.3f} s)")  # fmt: skip
    # all jobs' time (planning too) per completed step: where the overhead goes
    spent = sorted(last["times"].items(), key=lambda kv: -kv[1])
    print(
        f"where job time goes at {last['n']} workers, s per step ({last['git']:.1f} git commands): "
        + ", ".join(f"{k} {v:.3f}" for k, v in spent[:8])
    )


if __name__ == "__main__":
    main()
