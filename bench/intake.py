"""Benchmark: webhook intake of the real app vs. a bare 202 endpoint, under the same uvicorn.

One run starts two uvicorn servers as subprocesses, one after the other, with identical options
(`--server plain`: asyncio + h11, `--server uvloop`: uvloop + httptools; `--workers N` processes):

  (a) `bench._servers:bare_app`  a starlette route answering 202 without doing any work;
  (b) `bench._servers:real_app`  the real app on SQLite (temp dir) or, with `--store postgres`,
                                 on a fresh database of the local Postgres, with the real Redis
                                 (db 14), no worker consuming (the arq queue just fills).

This process is the load generator: it pre-builds signed `issue_comment` deliveries (unique
X-GitHub-Delivery, unique comment id, correct X-Hub-Signature-256) as raw HTTP/1.1 request bytes
and drives each server over keep-alive connections on 127.0.0.1 with a minimal asyncio protocol,
so that the client costs as little CPU as possible on this 2-core machine. Both servers get the
very same requests (the app sees each delivery once).

Phases: closed-loop throughput for (a) and (b) (fixed concurrency, warm-up then a timed window);
then open-loop latency for (b) at a fixed rate, measured from each request's *scheduled* send time
(no coordinated omission). At the end the SQLite row count and the arq queue length must equal
the number of `accepted` answers. Per delivery it prints the app's CPU (all its processes) and,
on Postgres, the database server's CPU (the bench database's backends, and the shared WAL
writer, checkpointer and background writer). The last line is `ratio=<b/a>`.

Run: `.venv/bin/python bench/intake.py [--store postgres] [--server uvloop] [--workers 2]`
(needs Redis on 127.0.0.1:6379, flushes db 14 or DEKSDENFLOW_BENCH_REDIS; Postgres at
DEKSDENFLOW_BENCH_PG_ADMIN, default postgresql://postgres@127.0.0.1:5432/postgres, where it
creates and drops its own database).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import importlib
import importlib.util
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "samples" / "github" / "issue_comment_created" / "body"
SECRET = "bench-webhook-secret-0123456789"
# flushed at the start and the end: on a shared machine give each person's runs their own db
REDIS_URL = os.environ.get("DEKSDENFLOW_BENCH_REDIS", "redis://127.0.0.1:6379/14")
QUEUE_KEY = "arq:queue"


# --- deliveries ---------------------------------------------------------------------------


def _trim(value: Any) -> Any:
    """The recorded payload without API-link noise: a realistic ~4 KB delivery, not 14 KB."""
    if isinstance(value, dict):
        return {
            k: _trim(v)
            for k, v in value.items()
            if k != "reactions" and not (k.endswith("_url") and k not in ("html_url", "clone_url"))
        }
    if isinstance(value, list):
        return [_trim(v) for v in value]
    return value


def build_requests(count: int) -> list[bytes]:
    """`count` complete HTTP/1.1 requests, each a distinct, correctly signed delivery."""
    template = _trim(json.loads(SAMPLE.read_text()))
    template.pop("organization", None)
    # serialized once; each body differs only in this id (a sentinel no date or URL contains:
    # "-1" also matched dates, so every body kept the same comment id)
    template["comment"]["id"] = 987_654_321_987
    prefix, _, suffix = (
        json.dumps(template, separators=(",", ":")).encode().partition(b"987654321987")
    )
    signer = hmac.new(SECRET.encode(), digestmod=hashlib.sha256)
    out: list[bytes] = []
    for i in range(count):
        body = b"%s%d%s" % (prefix, 900_000_000 + i, suffix)
        mac = signer.copy()
        mac.update(body)
        head = (
            "POST /webhooks/github HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\n"
            "User-Agent: GitHub-Hookshot/abc1234\r\n"
            "Content-Type: application/json\r\n"
            "X-GitHub-Event: issue_comment\r\n"
            f"X-GitHub-Delivery: {uuid.uuid4()}\r\n"
            "X-GitHub-Hook-ID: 123456\r\n"
            "X-GitHub-Hook-Installation-Target-ID: 1\r\n"
            "X-GitHub-Hook-Installation-Target-Type: integration\r\n"
            f"X-Hub-Signature-256: sha256={mac.hexdigest()}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


# --- a minimal keep-alive HTTP/1.1 client -----------------------------------------------------


class Conn(asyncio.Protocol):
    """One keep-alive connection; one request in flight; calls `on_response(conn, status, body)`."""

    def __init__(self, on_response: Callable[[Conn, int, bytes], None]) -> None:
        self.on_response = on_response
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.started = 0.0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.started = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower() + b"\r\n"
            pos = head.find(b"content-length:")
            length = int(head[pos + 15 : head.find(b"\r\n", pos)]) if pos >= 0 else 0
            total = end + 4 + length
            if len(self.buf) < total:
                return
            status = int(self.buf[9:12])
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            self.on_response(self, status, body)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Tally:
    ok: int = 0
    accepted: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def add(self, status: int, body: bytes) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status in (200, 202):
            self.ok += 1
            if b'"accepted"' in body:
                self.accepted += 1
        else:
            self.errors += 1


class Feed:
    """Hands out pre-built requests in order; each one is sent to a server at most once.

    With `cycle`, it starts over at the end instead (for the bare server, which stores nothing,
    so it may see a delivery twice; the app must see each one once).
    """

    def __init__(self, requests: list[bytes], start: int = 0, cycle: bool = False) -> None:
        self.requests = requests
        self.next = start
        self.cycle = cycle

    def take(self) -> bytes | None:
        if self.next >= len(self.requests):
            if not self.cycle:
                return None
            self.next = 0
        self.next += 1
        return self.requests[self.next - 1]


async def closed_loop(
    port: int, feed: Feed, connections: int, seconds: float
) -> tuple[Tally, float]:
    """`connections` clients each send the next request as soon as the previous answer arrives."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    deadline = 0.0
    active = 0
    done: asyncio.Future[None] = loop.create_future()

    def on_response(conn: Conn, status: int, body: bytes) -> None:
        nonlocal active
        tally.add(status, body)
        request = feed.take() if time.perf_counter() < deadline else None
        if request is not None:
            conn.send(request)
            return
        active -= 1
        if active == 0 and not done.done():
            done.set_result(None)

    conns: list[Conn] = []
    for _ in range(connections):
        _, proto = await loop.create_connection(lambda: Conn(on_response), "127.0.0.1", port)
        conns.append(proto)
    started = time.perf_counter()
    deadline = started + seconds
    for conn in conns:
        request = feed.take()
        if request is None:
            break
        active += 1
        conn.send(request)
    if active:
        await asyncio.wait_for(done, timeout=seconds + 30)
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.close()
    if feed.next >= len(feed.requests) and not feed.cycle:
        print(f"  warning: ran out of pre-built requests after {elapsed:.1f} s", file=sys.stderr)
    return tally, elapsed


async def open_loop(port: int, feed: Feed, rate: float, seconds: float) -> Tally:
    """Send at a fixed rate whatever the answers do; latency counts from the scheduled time."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    idle: list[Conn] = []
    scheduled: dict[Conn, float] = {}
    outstanding = 0
    drained: asyncio.Future[None] = loop.create_future()

    def on_response(conn: Conn, status: int, body: bytes) -> None:
        nonlocal outstanding
        tally.latencies.append(time.perf_counter() - scheduled.pop(conn))
        tally.add(status, body)
        idle.append(conn)
        outstanding -= 1
        if outstanding == 0 and sending_done and not drained.done():
            drained.set_result(None)

    async def connect() -> Conn:
        _, proto = await loop.create_connection(lambda: Conn(on_response), "127.0.0.1", port)
        return proto

    idle.extend([await connect() for _ in range(4)])
    sending_done = False
    total = int(rate * seconds)
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        target = t0 + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        request = feed.take()
        if request is None:
            break
        # uvicorn closes keep-alive connections idle for 5 s: skip those
        while idle and idle[-1].lost.done():
            idle.pop()
        conn = idle.pop() if idle else await connect()
        scheduled[conn] = target
        outstanding += 1
        conn.send(request)
    sending_done = True
    if outstanding:
        await asyncio.wait_for(drained, timeout=30)
    for conn in idle:
        conn.close()
    return tally


# --- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn_impls(server: str) -> tuple[str, str]:
    """(loop, http) for `--server`: plain is what the project installs, uvloop the fast pair.

    Both servers of one run get the same pair.
    """
    if server == "plain":
        return "asyncio", "h11"
    missing = [name for name in ("uvloop", "httptools") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"--server uvloop needs {' and '.join(missing)}: .venv/bin/pip install uvloop httptools"
        )
    return "uvloop", "httptools"


def process_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # gone meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Server:
    def __init__(self, factory: str, env: dict[str, str], server: str, workers: int) -> None:
        self.port = free_port()
        self.workers = workers
        loop, http = uvicorn_impls(server)
        # uvicorn's own runner, on a socket that gets TCP_NODELAY (see bench/_launch.py)
        cmd = [
            sys.executable,
            "-m",
            "bench._launch",
            factory,
            str(self.port),
            str(workers),
            loop,
            http,
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env)

    def processes(self) -> list[int]:
        """The serving processes: uvicorn itself, or with --workers the launcher's children (one
        server each, bench/_launch.py)."""
        if self.workers == 1:
            return [self.proc.pid]
        return children(self.proc.pid)

    def wait_ready(self, timeout: float = 60.0) -> None:
        # The launcher binds before uvicorn starts, so a connect only means the port is open:
        # connections wait in the backlog until the lifespan has started (the warm-up absorbs
        # that). With --workers, wait for every server process, then for their lifespans.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
                continue
            if self.workers == 1:
                return
            if len(self.processes()) >= self.workers:
                time.sleep(5.0)  # their lifespans (migrations check, outbox relay) take a moment
                return
            time.sleep(0.1)
        raise SystemExit("server did not start")

    def peak_rss_mb(self) -> float:
        """The largest peak RSS of any one serving process."""
        peak = float("nan")
        for pid in self.processes():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    value = int(line.split()[1]) / 1024
                    peak = value if peak != peak else max(peak, value)
        return peak

    def cpu_seconds(self) -> float:
        pids = {self.proc.pid, *self.processes()}
        return sum(process_cpu_seconds(pid) for pid in pids)

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: uvicorn runs the lifespan shutdown (pending enqueues)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the run ----------------------------------------------------------------------------------


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()


def queue_length() -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(cast(int, client.zcard(QUEUE_KEY)))
    finally:
        client.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def busy_jiffies() -> tuple[int, int, int]:
    """(busy, total, stolen) jiffies of the whole machine, from /proc/stat.

    Stolen time (a virtual machine's host running someone else) counts as busy: it is CPU
    neither server got.
    """
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    steal = values[7] if len(values) > 7 else 0
    return sum(values) - idle, sum(values), steal


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class Side:
    """One server's share of the interleaved throughput phase."""

    name: str
    server: Server
    feed: Feed
    warm: Tally = field(default_factory=Tally)
    tally: Tally = field(default_factory=Tally)
    elapsed: float = 0.0
    cpu: float = 0.0

    @property
    def rps(self) -> float:
        # only 2xx answers count: a server that fails fast must not look fast
        return self.tally.ok / self.elapsed if self.elapsed else 0.0


def merge(into: Tally, part: Tally) -> None:
    into.ok += part.ok
    into.accepted += part.accepted
    into.errors += part.errors
    for status, n in part.statuses.items():
        into.statuses[status] = into.statuses.get(status, 0) + n


async def interleaved(sides: list[Side], args: argparse.Namespace) -> tuple[float, float]:
    """Warm each server up, then alternate short windows (a, b, a, b, …).

    Both servers see the same background load this way: a burst from another process on the
    shared cores lowers both numbers instead of skewing the ratio. Returns the share of the
    machine's CPU that neither the servers nor this client used (background noise), and the
    share the hypervisor stole.
    """
    for side in sides:
        side.warm, _ = await closed_loop(side.server.port, side.feed, args.connections, args.warmup)
    busy0, total0, steal0 = busy_jiffies()
    cpu0 = {side.name: side.server.cpu_seconds() for side in sides}
    own0 = own_cpu_seconds()
    window = args.seconds / args.rounds
    for _ in range(args.rounds):
        for side in sides:
            tally, elapsed = await closed_loop(
                side.server.port, side.feed, args.connections, window
            )
            merge(side.tally, tally)
            side.elapsed += elapsed
    busy1, total1, steal1 = busy_jiffies()
    ours = own_cpu_seconds() - own0
    for side in sides:
        side.cpu = side.server.cpu_seconds() - cpu0[side.name]
        ours += side.cpu
    hz = os.sysconf("SC_CLK_TCK")
    total = (total1 - total0) / hz
    return max(0.0, ((busy1 - busy0) / hz - ours) / total), (steal1 - steal0) / hz / total


PG_ADMIN_URL = os.environ.get(
    "DEKSDENFLOW_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def create_pg_database() -> tuple[str, str]:
    """A fresh database migrated to head: (name, URL)."""
    import psycopg

    from bot.storage.migrate import upgrade_head

    name = f"df_bench_intake_{os.getpid()}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    upgrade_head(url.replace("postgresql://", "postgresql+psycopg://", 1))
    return name, url


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_rows(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM webhook_deliveries").fetchone()
    return int(row[0]) if row else 0


# the server-wide processes every commit goes through (the WAL writer flushes what a backend
# did not, the others write pages back); other databases' traffic drives them too
_PG_SHARED = ("walwriter", "checkpointer", "background writer")


def pg_cpu(dbname: str) -> dict[int, tuple[bool, float]]:
    """{pid: (a backend of the bench database?, CPU seconds)} of the local Postgres's processes."""
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, datname IS NOT NULL FROM pg_stat_activity"
            " WHERE datname = %s OR backend_type = ANY(%s)",
            (dbname, list(_PG_SHARED)),
        ).fetchall()
    return {int(pid): (bool(own), process_cpu_seconds(int(pid))) for pid, own in rows}


def pg_cpu_delta(
    before: dict[int, tuple[bool, float]], after: dict[int, tuple[bool, float]]
) -> tuple[float, float]:
    """CPU seconds between two samples: (bench database's backends, shared processes).

    A backend that connected in between counts from zero; one that left is not seen.
    """
    own = shared = 0.0
    for pid, (is_own, cpu) in after.items():
        spent = cpu - before.get(pid, (is_own, 0.0))[1]
        if is_own:
            own += spent
        else:
            shared += spent
    return own, shared


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="timed closed-loop time per server"
    )
    parser.add_argument("--rounds", type=int, default=4, help="alternating windows per server")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--rate", type=float, default=100.0, help="open-loop rate for the latency phase"
    )
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument(
        "--requests", type=int, default=0, help="pre-built deliveries (default: enough)"
    )
    parser.add_argument(
        "--store", choices=("sqlite", "postgres"), default="sqlite",
        help="the app's database: a temp SQLite file, or a fresh database on the local Postgres",
    )  # fmt: skip
    parser.add_argument(
        "--server", choices=("plain", "uvloop"), default="plain",
        help="uvicorn on asyncio + h11 (what the project installs) or on uvloop + httptools",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes, for both servers alike"
    )
    args = parser.parse_args()

    if importlib.util.find_spec("uvloop"):
        importlib.import_module("uvloop").install()  # a cheaper client, whichever server runs

    count = args.requests or int(
        12_000 * (args.seconds + args.warmup) + args.rate * args.latency_seconds + 1000
    )
    t = time.perf_counter()
    requests = build_requests(count)
    loop_impl, http_impl = uvicorn_impls(args.server)
    print(
        f"built {count} signed deliveries ({len(requests[0]) - requests[0].find(b'{')} B bodies) "
        f"in {time.perf_counter() - t:.1f} s; store {args.store}, uvicorn --loop {loop_impl} "
        f"--http {http_impl} --workers {args.workers}, {args.connections} connections, "
        f"{args.rounds}x{args.seconds / args.rounds:g} s windows each",
        file=sys.stderr,
    )

    flush_redis()
    pg_name = pg_url = ""
    pg_own = pg_shared = 0.0
    with tempfile.TemporaryDirectory(prefix="df-bench-") as tmp:
        db_path = Path(tmp) / "bench.sqlite3"
        if args.store == "postgres":
            pg_name, pg_url = create_pg_database()
            db_url = pg_url
        else:
            from bot.storage.migrate import upgrade_head

            db_url = f"sqlite:///{db_path}"
            upgrade_head(db_url)  # once, not by every worker process at the same time
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")} | {
            "DEKSDENFLOW_DB_URL": db_url,
            "DEKSDENFLOW_DATA_DIR": tmp,
            "DEKSDENFLOW_REDIS_URL": REDIS_URL,
            "DEKSDENFLOW_GITHUB_WEBHOOK_SECRET": SECRET,
            "DEKSDENFLOW_LOG_LEVEL": "WARNING",
        }
        bare_server = Server("bare_app", env, args.server, args.workers)
        app_server = Server("real_app", env, args.server, args.workers)
        try:
            bare_server.wait_ready()
            app_server.wait_ready()
            # the same deliveries, in the same order, to both: each reaches the app once
            bare = Side("bare", bare_server, Feed(requests, cycle=True))
            app = Side("app", app_server, Feed(requests))
            pg0 = pg_cpu(pg_name) if pg_name else {}
            noise, stolen = asyncio.run(interleaved([bare, app], args))
            if pg_name:
                pg_own, pg_shared = pg_cpu_delta(pg0, pg_cpu(pg_name))
            time.sleep(0.5)  # let the batched enqueue of the last commits finish
            lat = asyncio.run(open_loop(app_server.port, app.feed, args.rate, args.latency_seconds))
            # the same open loop against the bare endpoint: what this machine's load alone does
            bare_lat = asyncio.run(
                open_loop(bare_server.port, bare.feed, args.rate, args.latency_seconds)
            )
            rss = app_server.peak_rss_mb()
            bare_rss = bare_server.peak_rss_mb()
        finally:
            bare_server.stop()
            app_server.stop()
        accepted = app.warm.accepted + app.tally.accepted + lat.accepted
        errors = app.warm.errors + app.tally.errors + lat.errors
        try:
            if pg_name:
                stored = pg_rows(pg_url)
            else:
                with sqlite3.connect(db_path) as conn:
                    stored = conn.execute("SELECT count(*) FROM webhook_deliveries").fetchone()[0]
        finally:
            if pg_name:
                drop_pg_database(pg_name)
        queued = queue_length()
    flush_redis()

    p50 = statistics.median(lat.latencies) * 1000
    p99 = percentile(lat.latencies, 0.99) * 1000
    ratio = app.rps / bare.rps
    delivered = max(1, app.tally.ok)
    print(f"config: --store {args.store} --server {args.server} --workers {args.workers}")
    print(
        f"bare: {bare.rps:.0f} req/s (errors={bare.tally.errors}, "
        f"server cpu {bare.cpu / max(1, bare.tally.ok) * 1e6:.0f} us/req)"
    )
    print(
        f"app: {app.rps:.0f} req/s (accepted={app.tally.accepted}, errors={app.tally.errors}, "
        f"server cpu {app.cpu / delivered * 1e6:.0f} us/delivery)"
    )
    if pg_name:
        print(
            f"postgres cpu: {(pg_own + pg_shared) / delivered * 1e6:.0f} us/delivery "
            f"(the bench database's backends {pg_own / delivered * 1e6:.0f}, "
            "shared wal writer/checkpointer/bgwriter "
            f"{pg_shared / delivered * 1e6:.0f}, which other databases' traffic drives too)"
        )
    # What the ratio would be if every process only waited for CPU (a machine busy with other
    # work): the bare server's CPU per request over the app's (and the local database's) per
    # delivery. Less noisy than the throughputs on a shared machine; not a substitute for them.
    bare_us = bare.cpu / max(1, bare.tally.ok) * 1e6
    app_us = app.cpu / delivered * 1e6
    pg_us = (pg_own + pg_shared) / delivered * 1e6
    estimate = f"cpu ratio: bare/app {bare_us / app_us:.2f}"
    if pg_name:
        estimate += f", bare/(app + postgres) {bare_us / (app_us + pg_us):.2f}"
    print(estimate)
    print(
        f"app latency @{args.rate:.0f} req/s: p50={p50:.1f} ms p99={p99:.1f} ms "
        f"(n={len(lat.latencies)})"
    )
    print(
        f"bare latency @{args.rate:.0f} req/s: "
        f"p50={statistics.median(bare_lat.latencies) * 1000:.1f} ms "
        f"p99={percentile(bare_lat.latencies, 0.99) * 1000:.1f} ms (same machine, same moment)"
    )
    print(f"peak RSS per process: app {rss:.1f} MB, bare {bare_rss:.1f} MB")
    print(
        f"background cpu (other processes{', Postgres included' if pg_name else ''}) "
        f"during the throughput phase: {noise * 100:.0f}% of the machine"
        f" (of which stolen by the hypervisor: {stolen * 100:.0f}%)"
    )
    check = "ok" if stored == accepted == queued and errors == 0 else "MISMATCH"
    print(f"check: accepted={accepted} rows={stored} queued={queued} errors={errors} -> {check}")
    print(f"ratio={ratio:.2f}")
    return 0 if check == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
