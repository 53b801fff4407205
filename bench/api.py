"""Operator API and console latency with 100k events in a real Postgres.

Creates a fresh database, migrates it, fills it with COPY (projects, 1 000 protocol runs,
5 000 steps, 100 000 events, 20 000 deliveries), serves `deksdenflow serve` under uvicorn on
127.0.0.1 in a subprocess and drives every list endpoint plus the console's run page over HTTP
with one keep-alive client. Prints p50/p95/p99 per endpoint, a ratio against `/healthz` measured
in the same run, and the query plans of the list queries (no sequential scan of a big table).

    .venv/bin/python bench/api.py [--requests 300] [--events 100000]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.storage.migrate import upgrade_head  # noqa: E402

ADMIN = os.environ.get(
    "DEKSDENFLOW_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TOKEN = "bench-token-0123456789"
GOAL_MS = 50.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def copy_rows(
    conn: psycopg.Connection, table: str, columns: list[str], rows: Sequence[tuple[object, ...]]
) -> None:
    with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def fill(
    url: str,
    *,
    projects: int,
    runs_per_project: int,
    steps_per_run: int,
    events: int,
    deliveries: int,
) -> dict[str, int]:
    rnd = random.Random(7)
    t0 = datetime(2026, 10, 1, tzinfo=UTC)
    statuses = ["completed", "running", "paused", "failed", "cancelled", "blocked", "planned"]
    with psycopg.connect(plain(url), autocommit=False) as conn:
        copy_rows(
            conn,
            "projects",
            [
                "id",
                "name",
                "provider",
                "git_url",
                "base_branch",
                "default_models",
                "secrets",
                "config",
                "enabled",
                "created_at",
                "updated_at",
            ],
            [
                (
                    p,
                    f"org/repo-{p}",
                    "github",
                    f"https://example.invalid/org/repo-{p}.git",
                    "main",
                    "{}",
                    "{}",
                    "{}",
                    True,
                    t0,
                    t0,
                )
                for p in range(1, projects + 1)
            ],
        )
        runs = []
        run_id = 0
        for p in range(1, projects + 1):
            for n in range(1, runs_per_project + 1):
                run_id += 1
                created = t0 + timedelta(minutes=run_id * 7)
                runs.append(
                    (
                        run_id,
                        p,
                        f"{n:04d}-task-{n}",
                        rnd.choice(statuses),
                        "main",
                        f"task {n}",
                        "{}",
                        '{"ci_attempts": 1}',
                        rnd.randint(1000, 90000),
                        True,
                        False,
                        created,
                        created + timedelta(minutes=40),
                    )
                )
        copy_rows(
            conn,
            "protocol_runs",
            [
                "id",
                "project_id",
                "protocol_name",
                "status",
                "base_branch",
                "description",
                "template_config",
                "runtime_state",
                "tokens_used",
                "approved",
                "auto_mode",
                "created_at",
                "updated_at",
            ],
            runs,
        )
        steps = []
        step_id = 0
        for r in range(1, run_id + 1):
            for i in range(1, steps_per_run + 1):
                step_id += 1
                steps.append(
                    (
                        step_id,
                        r,
                        i,
                        f"step-{i}",
                        "work",
                        "completed",
                        0,
                        "{}",
                        '{"qa_verdict": "PASS"}',
                        1200,
                        t0,
                        t0,
                    )
                )
        copy_rows(
            conn,
            "step_runs",
            [
                "id",
                "protocol_run_id",
                "step_index",
                "step_name",
                "step_type",
                "status",
                "retries",
                "policy",
                "runtime_state",
                "tokens_used",
                "created_at",
                "updated_at",
            ],
            steps,
        )
        types = ["step.status", "protocol.status", "engine.turn", "feedback.posted", "ci.result"]
        rows = []
        for e in range(1, events + 1):
            r = rnd.randint(1, run_id)
            s = (r - 1) * steps_per_run + rnd.randint(1, steps_per_run)
            rows.append(
                (
                    e,
                    (r - 1) // runs_per_project + 1,
                    r,
                    s,
                    rnd.choice(types),
                    f"event {e} of run {r}",
                    "{}",
                    t0 + timedelta(seconds=e),
                )
            )
        copy_rows(
            conn,
            "events",
            [
                "id",
                "project_id",
                "protocol_run_id",
                "step_run_id",
                "event_type",
                "message",
                "metadata",
                "created_at",
            ],
            rows,
        )
        delivery_statuses = ["processed"] * 8 + ["ignored", "failed"]
        copy_rows(
            conn,
            "webhook_deliveries",
            [
                "id",
                "provider",
                "delivery_key",
                "event",
                "action",
                "status",
                "received_at",
                "attempts",
                "payload",
                "headers",
                "outcome",
            ],
            [
                (
                    d,
                    "github",
                    str(uuid.UUID(int=d)),
                    "issue_comment",
                    "created",
                    rnd.choice(delivery_statuses),
                    t0 + timedelta(seconds=d),
                    1,
                    '{"action": "created"}',
                    "{}",
                    '{"intents": 1}',
                )
                for d in range(1, deliveries + 1)
            ],
        )
        with conn.cursor() as cur:
            for table in ("projects", "protocol_runs", "step_runs", "events", "webhook_deliveries"):
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
        conn.commit()
        with conn.cursor() as cur:
            conn.autocommit = True
            cur.execute("ANALYZE")
    return {"runs": run_id, "steps": step_id}


def plans(url: str, run_id: int) -> list[tuple[str, str]]:
    """EXPLAIN the list queries the endpoints issue: each must use an index and a LIMIT."""
    queries = {
        "/api/protocols": "SELECT * FROM protocol_runs ORDER BY id DESC LIMIT 50",
        "/api/protocols?project_id&status": (
            "SELECT * FROM protocol_runs WHERE project_id = 2 AND status = 'running' "
            "ORDER BY id DESC LIMIT 50"
        ),
        "/api/events": "SELECT * FROM events ORDER BY id DESC LIMIT 100",
        "/api/events?protocol_run_id": (
            f"SELECT * FROM events WHERE protocol_run_id = {run_id} ORDER BY id DESC LIMIT 100"
        ),
        "/api/events?protocol_run_id&after": (
            f"SELECT * FROM events WHERE protocol_run_id = {run_id} AND id > 50000 "
            "ORDER BY id LIMIT 100"
        ),
        "/api/events?project_id": (
            "SELECT * FROM events WHERE project_id = 3 ORDER BY id DESC LIMIT 100"
        ),
        "/api/events?type": (
            "SELECT * FROM events WHERE event_type = 'ci.result' ORDER BY id DESC LIMIT 100"
        ),
        "/api/events?step_run_id": (
            "SELECT * FROM events WHERE step_run_id = 77 ORDER BY id DESC LIMIT 100"
        ),
        "/api/deliveries": "SELECT * FROM webhook_deliveries ORDER BY id DESC LIMIT 50",
        "/api/deliveries?status": (
            "SELECT * FROM webhook_deliveries WHERE status = 'failed' ORDER BY id DESC LIMIT 50"
        ),
        "run page steps": (
            f"SELECT * FROM step_runs WHERE protocol_run_id = {run_id} "
            "ORDER BY step_index LIMIT 1000"
        ),
    }
    out = []
    with psycopg.connect(plain(url), autocommit=True) as conn, conn.cursor() as cur:
        for name, sql in queries.items():
            cur.execute("EXPLAIN " + sql)
            text = " | ".join(r[0].strip() for r in cur.fetchall())
            out.append((name, text))
    return out


def measure(client: httpx.Client, path: str, n: int) -> list[float]:
    for _ in range(20):  # warm-up: connection, caches, first-use imports
        client.get(path).raise_for_status()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        resp = client.get(path)
        samples.append((time.perf_counter() - start) * 1000)
        if resp.status_code != 200:
            raise SystemExit(f"{path}: HTTP {resp.status_code} {resp.text[:200]}")
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    name = f"df_bench_api_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(plain(ADMIN), autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{ADMIN.rsplit('/', 1)[0]}/{name}"
    server: subprocess.Popen[bytes] | None = None
    try:
        started = time.perf_counter()
        upgrade_head(url)
        counts = fill(
            url,
            projects=5,
            runs_per_project=200,
            steps_per_run=5,
            events=args.events,
            deliveries=20_000,
        )
        print(
            f"database {name}: {counts['runs']} runs, {counts['steps']} steps, "
            f"{args.events} events, 20000 deliveries "
            f"(migrated and filled in {time.perf_counter() - started:.1f} s)"
        )
        run_id = 421
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")}
        env.update(
            DEKSDENFLOW_DB_URL=plain(url),
            # a real Redis, as in production: with memory:// the server would also run the
            # embedded worker, polling on the same event loop
            DEKSDENFLOW_REDIS_URL=os.environ.get(
                "DEKSDENFLOW_TEST_REDIS", "redis://127.0.0.1:6379/14"
            ),
            DEKSDENFLOW_API_TOKEN=TOKEN,
            DEKSDENFLOW_DATA_DIR=str(ROOT / "bench" / "out" / "api-data"),
            DEKSDENFLOW_LOG_LEVEL="WARNING",
            DEKSDENFLOW_ENGINE="scripted",
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "bot", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(
                    "server did not start: "
                    + (server.stderr.read().decode() if server.stderr else "")
                )
            time.sleep(0.1)
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        ) as client:
            cursor = client.get(f"/api/events?protocol_run_id={run_id}&limit=500").json()["items"][
                -1
            ]["id"]
            endpoints = [
                "/healthz",
                "/api/protocols",
                "/api/protocols?project_id=2&status=running",
                "/api/protocols?offset=900",
                "/api/events",
                f"/api/events?protocol_run_id={run_id}",
                f"/api/events?protocol_run_id={run_id}&after={cursor}",
                "/api/events?project_id=3",
                "/api/events?type=ci.result",
                "/api/events?step_run_id=77",
                "/api/events?before=50000",
                "/api/deliveries",
                "/api/deliveries?status=failed",
                f"/api/protocols/{run_id}",
                f"/console/protocols/{run_id}",
            ]
            results = {path: measure(client, path, args.requests) for path in endpoints}
        baseline = pct(results["/healthz"], 0.95)
        print(
            f"\n{'endpoint':<48} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'p95/healthz':>12}  "
            f"goal p95 < {GOAL_MS:.0f} ms"
        )
        worst = 0.0
        for path, samples in results.items():
            p95 = pct(samples, 0.95)
            if path != "/healthz":
                worst = max(worst, p95)
            flag = "" if p95 < GOAL_MS else "  OVER"
            print(
                f"{path:<48} {statistics.median(samples):8.2f} {p95:8.2f} "
                f"{pct(samples, 0.99):8.2f} {p95 / baseline:11.1f}x{flag}"
            )
        print(
            f"\nbaseline /healthz p95 {baseline:.2f} ms; worst list endpoint p95 {worst:.2f} ms "
            f"({worst / baseline:.1f}x baseline) over {args.requests} requests each -> "
            f"{'goal met' if worst < GOAL_MS else 'goal MISSED'}"
        )
        print("\nquery plans (each must be an index scan under a LIMIT):")
        bad = 0
        for qname, plan in plans(url, run_id):
            big_seq = "Seq Scan on events" in plan or "Seq Scan on webhook_deliveries" in plan
            bad += big_seq
            print(f"  {'SEQ!' if big_seq else 'ok  '} {qname:<36} {plan[:150]}")
        return 1 if worst >= GOAL_MS or bad else 0
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


if __name__ == "__main__":
    sys.exit(main())
