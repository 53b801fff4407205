"""Benchmark: what storing the transcript costs a turn, and how fast a long transcript pages.

1. Turn overhead. A stand-in for `codex exec --json` (a small script) writes 5,000 JSONL events
   of Codex's shapes (commands with output, file changes, messages, reasoning) as fast as the
   pipe takes them; the real CodexEngine reads them. Each round runs the same turn without a
   sink and with the TranscriptRecorder (SQLite, redaction on), the order alternating; the
   figure is the turn's wall time with storing over without (≤ 1.05 is the goal), a turn
   being what the engine takes: `engine.run`, and the recorder's `finish()`, which hands the
   last batch to the writer. How long after that the transcript is complete (the step
   runner waits for it before the step goes on: on Postgres while it records the turn's
   tokens) is printed on its own lines, untimed, and so is the ratio were that wait counted
   in the turn; the CPU lines include it, and say how much of the cost lands on the
   engine's reading thread and how much on the transcript writer thread. A second, paced
   run (50 events every 10 ms) shows the cost on a stream that is fast but not
   instantaneous: there the batches are stored beside the reading, every FLUSH_INTERVAL_S.
2. First screen. A step with 10,000 stored items: the console step page (one page of items,
   through the real app) is fetched N times; the figure is the median time to the full HTML
   (< 200 ms is the goal).

    .venv/bin/python bench/transcript.py [--items 5000] [--rounds 9] [--page-items 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout

from bot.storage.db import create_database  # noqa: E402
from bot.storage.migrate import upgrade_head  # noqa: E402
from bot.storage.transcript import TranscriptRecorder  # noqa: E402
from engines.base import EngineRequest  # noqa: E402
from engines.codex import CodexEngine  # noqa: E402

LAGS: list[float] = []  # per stored turn: from the turn's end until the transcript is stored
STORED: list[int] = []  # per stored turn: the lines stored

EMITTER = """#!{python}
import sys, time
lines = open({path!r}, "rb").read().splitlines(keepends=True)
out = sys.stdout.buffer
for i in range(0, len(lines), {burst}):
    out.write(b"".join(lines[i:i + {burst}]))
    out.flush()
    if {pause}:
        time.sleep({pause})
"""


def turn_events(count: int) -> list[dict[str, Any]]:
    """`count` events in the proportions a busy Codex turn has (started + completed commands)."""
    out: list[dict[str, Any]] = [
        {"type": "thread.started", "thread_id": "t-1"},
        {"type": "turn.started"},
    ]
    n = 0
    while len(out) < count - 1:
        n += 1
        kind = n % 5
        if kind in (0, 1):
            cmd = {
                "id": f"i{n}",
                "type": "command_execution",
                "command": f"pytest -q tests/test_{n}.py",
            }
            out.append(
                {
                    "type": "item.started",
                    "item": {**cmd, "aggregated_output": "", "status": "in_progress"},
                }
            )
            output = "".join(f"tests/test_{n}.py::test_{k} PASSED\n" for k in range(30))
            out.append(
                {
                    "type": "item.completed",
                    "item": {
                        **cmd,
                        "aggregated_output": output,
                        "exit_code": 0,
                        "status": "completed",
                    },
                }
            )
        elif kind == 2:
            out.append(
                {
                    "type": "item.completed",
                    "item": {
                        "id": f"i{n}",
                        "type": "file_change",
                        "changes": [{"path": f"/w/src/m{n}.py", "kind": "update"}],
                    },
                }
            )
        elif kind == 3:
            out.append(
                {
                    "type": "item.completed",
                    "item": {
                        "id": f"i{n}",
                        "type": "reasoning",
                        "text": "Checking the failing test and the module it imports. " * 4,
                    },
                }
            )
        else:
            out.append(
                {
                    "type": "item.completed",
                    "item": {
                        "id": f"i{n}",
                        "type": "agent_message",
                        "text": f"Step {n}: updated the module and ran its tests.",
                    },
                }
            )
    out = out[: count - 1]
    out.append(
        {
            "type": "turn.completed",
            "usage": {"input_tokens": 120000, "cached_input_tokens": 80000, "output_tokens": 9000},
        }
    )
    return out


async def one_turn(
    engine: CodexEngine, workdir: Path, db: Any | None
) -> tuple[float, float, float]:
    recorder = (
        TranscriptRecorder(db, protocol_run_id=1, step_run_id=1, phase="execute",
                           secrets=("sk-bench-secret-value", "whsec-bench-0000"), workdir=workdir)
        if db is not None else None
    )  # fmt: skip
    request = EngineRequest(prompt="bench", workdir=workdir, phase="execute", timeout_s=60,
                            sink=recorder.add if recorder else None,
                            lines_sink=recorder.add_lines if recorder else None)  # fmt: skip
    cpu, loop_cpu = time.process_time(), time.thread_time()  # the writer's start included
    if recorder is not None:
        recorder.start()  # as the step runner does, before the turn
    started = time.perf_counter()
    try:
        result = await engine.run(request)
    finally:
        if recorder is not None:
            recorder.finish()  # as the step runner does: the turn is over, its tokens recorded
    elapsed = time.perf_counter() - started
    if recorder is not None:
        # untimed: the transcript's last batch, written while the runner records the turn;
        # its lag and its CPU are reported on their own lines
        await recorder.wait_stored()
        LAGS.append(time.perf_counter() - started - elapsed)
        STORED.append(recorder.stored)
    cpu = time.process_time() - cpu
    loop_cpu = time.thread_time() - loop_cpu
    assert result.ok, result.error
    return elapsed, cpu, loop_cpu


async def bench_turn(
    items: int, rounds: int, tmp: Path, burst: int = 10**9, pause: float = 0
) -> None:
    data = tmp / "events.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in turn_events(items)))
    emitter = tmp / "fake-codex"
    emitter.write_text(
        EMITTER.format(python=sys.executable, path=str(data), burst=burst, pause=pause)
    )
    emitter.chmod(0o755)
    workdir = tmp / "w"
    workdir.mkdir(exist_ok=True)
    url = f"sqlite:///{tmp / 'bench.sqlite3'}"
    if not (tmp / "bench.sqlite3").exists():
        upgrade_head(url)
    db = create_database("sqlite+aiosqlite:///" + str(tmp / "bench.sqlite3"))
    await db.ping()  # a worker's pool holds connections open, as here
    engine = CodexEngine(str(emitter), base_env={"PATH": os.environ.get("PATH", "")})
    await one_turn(engine, workdir, None)  # warm-up: imports, page cache
    await one_turn(engine, workdir, db)
    bare: list[float] = []
    stored: list[float] = []
    ratios: list[float] = []
    cpu: dict[bool, list[float]] = {True: [], False: []}
    loop_cpu: dict[bool, list[float]] = {True: [], False: []}
    for n in range(rounds):
        order = (None, db) if n % 2 == 0 else (db, None)
        pair: dict[bool, float] = {}
        for target in order:
            pair[target is None], used, on_loop = await one_turn(engine, workdir, target)
            cpu[target is None].append(used)
            loop_cpu[target is None].append(on_loop)
        bare.append(pair[True])
        stored.append(pair[False])
        ratios.append(pair[False] / pair[True])
    await db.dispose()
    assert set(STORED) == {items}, set(STORED)  # every event of every turn, none lost
    lags = LAGS[1:]  # the measured rounds' (the first stored turn is a warm-up)
    LAGS.clear()
    STORED.clear()
    b, s = statistics.median(bare), statistics.median(stored)
    speed = "at full speed" if pause == 0 else f"{burst} events every {pause * 1000:g} ms"
    print(f"turn of {items:,} JSONL events ({data.stat().st_size / 1e6:.1f} MB) {speed}, "
          f"{rounds} rounds each")  # fmt: skip
    print(f"  without storing: median {b * 1000:.0f} ms   (min {min(bare) * 1000:.0f})")
    print(f"  with transcript: median {s * 1000:.0f} ms   (min {min(stored) * 1000:.0f})")
    # paired rounds: each ratio compares two turns run back to back, so a noisy neighbour
    # (this machine's CPU is shared) moves both sides of it
    print(f"  ratio of medians {s / b:.3f}, median of paired ratios "
          f"{statistics.median(ratios):.3f}, ratio of minimums {min(stored) / min(bare):.3f}"
          f"  (goal ≤ 1.05)")  # fmt: skip
    print(
        f"  transcript complete {statistics.median(lags) * 1000:.1f} ms (median; max "
        f"{max(lags) * 1000:.1f}) after the turn returned"
    )
    # the turn and the wait for its transcript, end to end
    whole = statistics.median(t + lag for t, lag in zip(stored, lags, strict=True))
    print(f"  turn plus that wait: median {whole * 1000:.0f} ms, ratio {whole / b:.3f}")
    # CPU time of this process (threads included): what storing costs, whatever the neighbours do
    cb, cs = statistics.median(cpu[True]), statistics.median(cpu[False])
    print(f"  CPU of this process per turn: {cb * 1000:.0f} ms without, {cs * 1000:.0f} ms with "
          f"storing (ratio {cs / cb:.3f})")  # fmt: skip
    # of which on the event loop's thread, the one reading codex's stdout: what storing takes
    # from the engine itself (the rest runs on the transcript writer thread)
    lb, ls = statistics.median(loop_cpu[True]), statistics.median(loop_cpu[False])
    print(f"  CPU of the engine's loop thread per turn: {lb * 1000:.1f} ms without, "
          f"{ls * 1000:.1f} ms with storing (+{(ls - lb) * 1000:.1f} ms)")  # fmt: skip
    # the rest of what storing costs runs on the transcript writer thread
    print(f"  CPU added by storing, per turn: {(cs - cb) * 1000:.1f} ms, of which "
          f"{(ls - lb) * 1000:.1f} on the loop thread and {(cs - cb - ls + lb) * 1000:.1f} "
          f"on the writer thread")  # fmt: skip


def bench_page(items: int, fetches: int, tmp: Path) -> None:
    from pydantic import SecretStr
    from sqlalchemy import create_engine, insert
    from sqlalchemy.orm import Session
    from starlette.testclient import TestClient

    from bot.core.settings import Settings
    from bot.storage.models import Project, ProtocolRun, StepRun, TranscriptChunk, utcnow
    from bot.web.app import create_app

    path = tmp / "page.sqlite3"
    url = f"sqlite:///{path}"
    upgrade_head(url)
    sync = create_engine(url)
    with Session(sync) as session, session.begin():
        project = Project(name="bench", provider="local", git_url=str(tmp / "none.git"),
                          base_branch="main", default_models={}, secrets={}, config={})  # fmt: skip
        session.add(project)
        session.flush()
        run = ProtocolRun(project_id=project.id, protocol_name="0001-bench", status="running",
                          description="bench", template_config={}, runtime_state={})  # fmt: skip
        session.add(run)
        session.flush()
        step = StepRun(protocol_run_id=run.id, step_index=1, step_name="bench", status="running",
                       runtime_state={})  # fmt: skip
        session.add(step)
        session.flush()
        now = utcnow()
        events = [
            json.dumps({"type": "item.completed", "item": {
                "id": f"i{i}", "type": "command_execution", "command": f"pytest -q t{i}.py",
                "aggregated_output": "ok\n" * 20, "exit_code": 0}} if i % 3 == 0 else
                {"type": "item.completed", "item": {"id": f"i{i}", "type": "agent_message",
                                                    "text": f"item {i} " + "x" * 80}})
            for i in range(items)
        ]  # fmt: skip
        rows = [
            {"protocol_run_id": run.id, "step_run_id": step.id, "phase": "execute",
             "lines": len(events[i : i + 500]), "body": "\n".join(events[i : i + 500]),
             "created_at": now}
            for i in range(0, items, 500)
        ]  # fmt: skip
        session.execute(insert(TranscriptChunk), rows)
        run_id = run.id
    sync.dispose()
    settings = Settings(db_url=url, data_dir=tmp / "data",
                        api_token=SecretStr("bench-token-0123456789"),
                        engine="scripted", redis_url="memory://")  # fmt: skip
    with TestClient(create_app(settings, embedded_worker=False)) as client:
        client.post("/console/login", data={"token": "bench-token-0123456789"})
        times: list[float] = []
        size = 0
        for _ in range(fetches + 1):
            started = time.perf_counter()
            page = client.get(f"/console/protocols/{run_id}/steps/1")
            times.append(time.perf_counter() - started)
            assert page.status_code == 200
            size = len(page.content)
        times = times[1:]  # the first fetch compiles the templates
    print(
        f"step page over {items:,} stored items: {fetches} fetches, {size / 1024:.0f} KiB of HTML"
    )
    print(f"  first screen: median {statistics.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms  (goal < 200 ms)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--page-items", type=int, default=10000)
    parser.add_argument("--fetches", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="df-bench-transcript-") as raw:
        tmp = Path(raw)
        asyncio.run(bench_turn(args.items, args.rounds, tmp))
        # a fast but paced stream (still far faster than a model produces events)
        asyncio.run(bench_turn(args.items, max(3, args.rounds // 3), tmp, burst=50, pause=0.01))
        bench_page(args.page_items, args.fetches, tmp)


if __name__ == "__main__":
    main()
