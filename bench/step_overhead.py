"""Benchmark: the bot's own overhead per protocol step (scripted engine), and the worker's peak RSS.

Plans one protocol of N steps on a small local repository, then runs every step the way a
worker does — execute_step, then run_quality — through `local_runtime` (SQLite, in-process
queue, cached mirror + worktree, Local forge). The scripted engine answers instantly, so the
time measured is git, database, forge records and rendering: what the bot adds to each step.
Peak RSS is this process's ru_maxrss (git children excluded; the goal excludes Codex too).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout

from sqlalchemy import event  # noqa: E402

from bot.core.settings import Settings  # noqa: E402
from bot.jobs.actions import start_protocol  # noqa: E402
from bot.jobs.local_runtime import drain, local_runtime  # noqa: E402
from bot.jobs.steps import execute_step, run_quality  # noqa: E402
from bot.storage.runs import get_or_create_project, load_run  # noqa: E402
from engines.registry import EngineRegistry  # noqa: E402
from engines.scripted import ScriptedEngine  # noqa: E402

ENV = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True)


def small_origin(where: Path, files: int) -> Path:
    """A bare repository with `files` small Python files in one commit on main."""
    seed = where / "seed"
    for i in range(files):
        path = seed / "src" / f"pkg{i // 20}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def f{i}(x):\n    return x + {i}\n")
    (seed / "README.md").write_text("# bench\n")
    git("init", "-q", "-b", "main", cwd=seed)
    git("add", "--all", cwd=seed)
    git("-c", "user.name=b", "-c", "user.email=b@x", "commit", "-q", "-m", "init", cwd=seed)
    bare = where / "origin.git"
    git("clone", "-q", "--bare", str(seed), str(bare), cwd=where)
    return bare


def script(steps: int) -> dict[str, Any]:
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
                    "qa_policy": "light",
                }
                for i in range(1, steps + 1)
            ],
        },
        "decompose": {"default": "# {title}\n"},
        "execute": {
            "default": {
                "message": "done {step_index}",
                "files": [{"path": "src/step_{step_index}.py", "content": "X = {step_index}\n"}],
            }
        },
        "qa": {"default": {"verdicts": ["PASS"], "report": "# QA {title}\n"}},
    }


class Counter:
    """Database round trips (statements sent) and forge requests (calls on the Forge object)."""

    def __init__(self) -> None:
        self.db = 0
        self.forge = 0
        self.credentials = 0
        self.commits = 0
        self.statements: list[str] = []

    def on_statement(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.db += 1
        self.statements.append(statement.split("\n", 1)[0][:100])

    def on_commit(self, *_args: Any) -> None:
        self.commits += 1

    def wrap_forges(self, forges: Any) -> None:
        original = forges.forge_for
        counter = self

        class Counting:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getattr__(self, name: str) -> Any:
                value = getattr(self._inner, name)
                if not callable(value) or name.startswith("_"):
                    return value

                async def call(*args: Any, **kwargs: Any) -> Any:
                    # git credentials come from the forge's token cache, not one request each
                    if name == "git_auth_header":
                        counter.credentials += 1
                    else:
                        counter.forge += 1
                    return await value(*args, **kwargs)

                return call if asyncio.iscoroutinefunction(value) else value

        forges.forge_for = lambda project: Counting(original(project))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(steps: int, files: int, keep: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="df-bench-steps-", dir=keep) as tmp:
        where = Path(tmp)
        origin = small_origin(where, files)
        settings = Settings(
            data_dir=where / "data",
            db_url=f"sqlite:///{where / 'db.sqlite3'}",
            engine="scripted",
            # QA is timed as its own job below, as a worker would run it
            auto_qa_after_exec=False,
            worker_poll_delay_s=0.01,
            log_level="WARNING",
        )
        async with local_runtime(settings) as ctx:
            ctx["engines"] = EngineRegistry([ScriptedEngine(script(steps))])
            project = await get_or_create_project(
                ctx["db"], name="bench", provider="local", git_url=str(origin), base_branch="main"
            )
            started = time.perf_counter()
            run = await start_protocol(ctx, project, "Benchmark steps", approved=True)
            await drain(ctx, project.id, printer=lambda _line: None)
            plan_s = time.perf_counter() - started
            state = await load_run(ctx["db"], run.id)
            assert state.run.status == "planned", state.run.runtime_state
            counter = Counter()
            event.listen(
                ctx["db"].engine.sync_engine, "before_cursor_execute", counter.on_statement
            )
            event.listen(ctx["db"].engine.sync_engine, "commit", counter.on_commit)
            counter.wrap_forges(ctx["forges"])
            per_step: list[float] = []
            exec_s: list[float] = []
            qa_s: list[float] = []
            for index in range(1, steps + 1):
                t0 = time.perf_counter()
                outcome = await execute_step(ctx, protocol_run_id=run.id, step_index=index)
                t1 = time.perf_counter()
                verdict = await run_quality(ctx, protocol_run_id=run.id, step_index=index)
                t2 = time.perf_counter()
                assert (outcome, verdict) == ("needs_qa", "PASS"), (index, outcome, verdict)
                exec_s.append(t1 - t0)
                qa_s.append(t2 - t1)
                per_step.append(t2 - t0)
            event.remove(
                ctx["db"].engine.sync_engine, "before_cursor_execute", counter.on_statement
            )
            event.remove(ctx["db"].engine.sync_engine, "commit", counter.on_commit)
            if os.environ.get("BENCH_SHOW_SQL"):
                for line in counter.statements[: len(counter.statements) // steps]:
                    print(line, file=sys.stderr)
            state = await load_run(ctx["db"], run.id)
            assert state.run.status == "completed", state.run.status
    return {
        "plan_s": plan_s,
        "per_step": per_step,
        "exec": exec_s,
        "qa": qa_s,
        "db_per_step": counter.db / steps,
        "commits_per_step": counter.commits / steps,
        "forge_per_step": counter.forge / steps,
        "credentials_per_step": counter.credentials / steps,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--files", type=int, default=200, help="files in the small repository")
    ap.add_argument("--tmp", type=Path, default=None, help="parent for the scratch directory")
    args = ap.parse_args()
    r = asyncio.run(bench(args.steps, args.files, args.tmp))
    p50 = statistics.median(r["per_step"])
    p95 = quantile(r["per_step"], 0.95)
    print(f"repository: {args.files} files; protocol of {args.steps} steps (scripted engine)")
    print(f"planning (plan + {args.steps} decompose calls, commit, push): {r['plan_s']:.2f} s")
    print(
        f"per step, execute_step + run_quality: p50 {p50:.3f} s  p95 {p95:.3f} s  "
        f"max {max(r['per_step']):.3f} s   (goal p50 < 1 s: {'OK' if p50 < 1 else 'MISSED'})"
    )
    print(
        f"  execute_step p50 {statistics.median(r['exec']):.3f} s   "
        f"run_quality p50 {statistics.median(r['qa']):.3f} s"
    )
    print(
        f"  per step: {r['db_per_step']:.1f} database round trips "
        f"({r['commits_per_step']:.1f} commits), "
        f"{r['forge_per_step']:.1f} forge requests "
        f"(+ {r['credentials_per_step']:.1f} git credential look-ups)"
    )
    print(
        f"worker peak RSS (ru_maxrss, this process): {r['rss_mb']:.1f} MB "
        f"(goal < 150 MB: {'OK' if r['rss_mb'] < 150 else 'MISSED'}); "
        f"largest git child {r['children_rss_mb']:.1f} MB"
    )


if __name__ == "__main__":
    main()
