"""Proof across hosts: three workers, each in its own network namespace with its own DATA_DIR.

The host namespace keeps Redis, Postgres (reached through a forwarder on a bridge, since both
listen on loopback) and the git remote (`git daemon` on the bridge). Every worker talks to them
over its veth pair only: no shared disk, no shared process. 30 protocols of 3 steps run with
the scripted engine; during the run one worker's DATA_DIR is deleted (and, in the crash variant,
another worker is SIGKILLed mid-step). At the end every protocol is completed, every step is
exactly one commit on its branch in the remote, no step ran on two workers at once, and no job
was lost or failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from bot.core.settings import Settings
from bot.domain.states import ProtocolStatus, StepStatus
from bot.handlers.routes import build_router
from bot.jobs.actions import start_protocol
from bot.jobs.services import build_services, close_services
from bot.jobs.steps import step_marker
from bot.storage.db import database_from_settings
from bot.storage.migrate import upgrade_head
from bot.storage.queue import create_redis
from bot.storage.runs import get_or_create_project, load_run
from tests.conftest import PG_ADMIN_URL, free_port

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORKERS = 3
PROTOCOLS = 30
STEPS = 3
RUN_TIMEOUT_S = 170  # the whole test stays under 4 minutes
ENGINE_WAIT_S = 1.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _namespaces_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"d16p{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Net:
    bridge_ip: str
    namespaces: list[str]


@contextlib.contextmanager
def bridged_namespaces(count: int) -> Iterator[Net]:
    """A bridge in the host namespace and `count` namespaces wired to it by veth pairs."""
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.216.{os.getpid() % 200 + 20}"
    bridge = f"d16b{tag}"
    namespaces = [f"d16n{tag}w{i}" for i in range(count)]
    host_ends = [f"d16h{tag}{i}" for i in range(count)]
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, (ns, host_end) in enumerate(zip(namespaces, host_ends, strict=True)):
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", host_end, "master", bridge)
            _ip("link", "set", host_end, "up")
            _ip("-n", ns, "addr", "add", f"{subnet}.{10 + i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield Net(bridge_ip=f"{subnet}.1", namespaces=namespaces)
    finally:
        # always: a namespace or a veth left behind would outlive the test run
        for ns in namespaces:
            _ip("netns", "pids", ns, check=False)
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for host_end in host_ends:
            _ip("link", "del", host_end, check=False)
        for ns in namespaces:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", bridge, check=False)


@contextlib.contextmanager
def background(
    argv: list[str],
    log: Path,
    ready: Callable[[], bool] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 20
        while ready is not None and not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{argv[0]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def fresh_postgres() -> Iterator[str]:
    name = f"df_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def engine_script() -> dict[str, Any]:
    return {
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
                for i in range(1, STEPS + 1)
            ],
        },
        "decompose": {"default": "# {title}\n"},
        "execute": {
            "delay_s": ENGINE_WAIT_S,
            "default": {
                "message": "done {step_index}",
                "files": [
                    {"path": "src/{protocol}_{step_index}.py", "content": "X = {step_index}\n"}
                ],
            },
        },
    }


def origin_repo(where: Path) -> Path:
    seed = where / "seed"
    seed.mkdir()
    (seed / "README.md").write_text("# cross-host\n")
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "--all"],
        ["-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "-m", "init"],
    ):
        subprocess.run(["git", *args], cwd=seed, check=True, capture_output=True)
    served = where / "served"
    served.mkdir()
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(seed), str(served / "origin.git")], check=True
    )
    return served


def read_log(paths: list[Path]) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for path in paths:
        if path.exists():
            for raw in path.read_text().splitlines():
                with contextlib.suppress(ValueError):  # a line cut by SIGKILL
                    lines.append(json.loads(raw))
    return lines


def running_steps(lines: list[dict[str, Any]], worker: str) -> int:
    """Execute calls `worker` has started and not ended."""
    open_calls = 0
    for line in lines:
        if line["worker"] == worker and line["phase"] == "execute":
            open_calls += 1 if line["event"] == "start" else -1
    return open_calls


def overlaps(lines: list[dict[str, Any]], killed: dict[str, float]) -> list[str]:
    """Execute calls of one step whose [start, end] intervals overlap (across any workers)."""
    intervals: dict[tuple[str, int], list[tuple[float, float, str]]] = defaultdict(list)
    starts: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for line in sorted(lines, key=lambda x: x["t"]):
        if line["phase"] != "execute":
            continue
        key = (line["worker"], line["protocol"], line["step"])
        if line["event"] == "start":
            starts[key].append(line["t"])
        else:
            began = starts[key].pop(0)
            intervals[(line["protocol"], line["step"])].append((began, line["t"], line["worker"]))
    for (worker, protocol, step), pending in starts.items():
        for began in pending:  # started, never ended: it ran until its worker died
            intervals[(protocol, step)].append((began, killed.get(worker, float("inf")), worker))
    bad = []
    for step_key, spans in intervals.items():
        spans.sort()
        for (_s1, e1, w1), (s2, _e2, w2) in itertools.pairwise(spans):
            if s2 < e1:
                bad.append(f"{step_key}: {w1} until {e1:.2f} and {w2} from {s2:.2f}")
    return bad


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


async def _start_all(settings: Settings, git_url: str) -> list[int]:
    ctx: dict[str, Any] = {"settings": settings, "db": database_from_settings(settings),
                           "redis": create_redis(settings), "router": build_router()}  # fmt: skip
    await build_services(ctx)
    try:
        project = await get_or_create_project(
            ctx["db"], name="cross-host", provider="local", git_url=git_url, base_branch="main"
        )
        return [
            (await start_protocol(ctx, project, f"Task {i}", auto=True)).id
            for i in range(PROTOCOLS)
        ]
    finally:
        await close_services(ctx)
        await ctx["redis"].aclose(close_connection_pool=True)
        await ctx["db"].dispose()


async def _statuses(
    settings: Settings, run_ids: list[int]
) -> dict[int, tuple[str, list[str], str]]:
    db = database_from_settings(settings)
    try:
        out = {}
        for run_id in run_ids:
            state = await load_run(db, run_id)
            out[run_id] = (
                state.run.status,
                [s.status for s in state.steps],
                state.run.protocol_name,
            )
        return out
    finally:
        await db.dispose()


async def _queue_report(settings: Settings) -> tuple[list[str], list[str]]:
    redis = create_redis(settings)
    try:
        queued = [
            j.decode() if isinstance(j, bytes) else str(j)
            for j in await redis.zrange("arq:queue", 0, -1)
        ]
        # arq queues each cron job ahead of its next run: that one is not left-over work
        left = [j for j in queued if not j.startswith("cron:")]
        failed = [
            f"{r.function}: {r.result!r}" for r in await redis.all_job_results() if not r.success
        ]
        return left, failed
    finally:
        await redis.aclose(close_connection_pool=True)


@pytest.mark.postgres
def _delete_tree(path: Path) -> None:
    """Delete a worker's DATA_DIR while the worker may still be writing into it (as a node
    losing its disk would): retry until a pass finds nothing left."""
    for _ in range(50):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} could not be deleted")


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param((), id="no-faults"),
        pytest.param(("sigterm",), id="sigterm-then-new-pod-without-data"),
        # A worker's DATA_DIR deleted under running steps: the jobs that trip over the missing
        # worktree or mirror see the cache's generation marker gone and run again on a rebuilt
        # worktree (bot/jobs/boundary.py) instead of failing their step.
        pytest.param(("datadir",), id="datadir-deleted"),
        # A SIGKILLed worker stops renewing its jobs' in-progress keys and its protocol leases:
        # arq hands its jobs to another worker once the keys expire (bot/jobs/resilient.py),
        # and the reclaim cron takes back any step whose lease expired.
        pytest.param(("sigkill", "datadir"), id="sigkill-and-datadir-deleted"),
    ],
)
def test_three_workers_in_three_network_namespaces(tmp_path: Path, faults: tuple[str, ...]) -> None:
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed")
    script = tmp_path / "engine.yml"
    script.write_text(yaml.safe_dump(engine_script()))
    served = origin_repo(tmp_path)
    logs = [tmp_path / f"steps-{i}.jsonl" for i in range(WORKERS)]
    data_dirs = [tmp_path / f"data-{i}" for i in range(WORKERS)]
    pg_port, redis_port, git_port, own_redis_port = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    )
    # a Redis of its own: the workers' queue must hold this test's jobs and nobody else's
    own_redis = f"redis://127.0.0.1:{own_redis_port}/0"

    with (
        fresh_postgres() as dbname,
        bridged_namespaces(WORKERS) as net,
        contextlib.ExitStack() as stack,
    ):
        upgrade_head(f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{dbname}")
        ip = net.bridge_ip
        stack.enter_context(
            background(
                [
                    redis_server,
                    "--port",
                    str(own_redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp_path),
                ],
                tmp_path / "redis.log",
                ready=lambda: _listening(own_redis_port),
            )
        )
        forward_log = tmp_path / "forward.log"
        stack.enter_context(
            background(
                [
                    sys.executable,
                    str(HERE / "tcp_forward.py"),
                    ip,
                    f"{pg_port}:5432",
                    f"{redis_port}:{own_redis_port}",
                ],
                forward_log,
                ready=lambda: "ready" in forward_log.read_text(),
            )
        )
        stack.enter_context(
            background(
                [
                    "git",
                    "daemon",
                    "--reuseaddr",
                    "--export-all",
                    "--enable=receive-pack",
                    f"--base-path={served}",
                    f"--listen={ip}",
                    f"--port={git_port}",
                    str(served),
                ],
                tmp_path / "git-daemon.log",
            )
        )
        git_url = f"git://{ip}:{git_port}/origin.git"
        wait_for(
            lambda: (
                subprocess.run(["git", "ls-remote", git_url], capture_output=True).returncode == 0
            ),
            20,
            "git daemon",
        )
        workers: list[subprocess.Popen[bytes]] = []
        envs: list[dict[str, str]] = []
        for i, ns in enumerate(net.namespaces):
            env = {k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")}
            env.update(
                PYTHONPATH=str(ROOT),
                WORKER_NAME=f"w{i}",
                STEP_LOG=str(logs[i]),
                DEKSDENFLOW_DB_URL=f"postgresql://postgres@{ip}:{pg_port}/{dbname}",
                DEKSDENFLOW_REDIS_URL=f"redis://{ip}:{redis_port}/0",
                DEKSDENFLOW_DATA_DIR=str(data_dirs[i]),
                DEKSDENFLOW_ENGINE="scripted",
                DEKSDENFLOW_SCRIPTED_SCRIPT=str(script),
                DEKSDENFLOW_LOG_LEVEL=os.environ.get("DF16_LOG", "WARNING"),
                DEKSDENFLOW_WORKER_SHUTDOWN_GRACE_S="1",
                # a dead worker's jobs and leases come back after 20 s instead of the default
                # minute: the same mechanism, in a test that must stay within a few minutes
                DEKSDENFLOW_LEASE_TTL_S="20",
                DEKSDENFLOW_LEASE_RENEW_S="4",
            )
            envs.append(env)
            argv = ["ip", "netns", "exec", ns, sys.executable, str(HERE / "netns_worker.py")]
            workers.append(
                stack.enter_context(background(argv, tmp_path / f"worker-{i}.log", env=env))
            )  # each worker's process is terminated by the stack, its namespace by the bridge

        settings = Settings(
            db_url=f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{dbname}".replace("+psycopg", ""),
            redis_url=own_redis,
            data_dir=tmp_path / "controller",
            engine="scripted",
            scripted_script=script,
        )
        run_ids = asyncio.run(_start_all(settings, git_url))

        killed: dict[str, float] = {}

        def lines() -> list[dict[str, Any]]:
            return read_log(logs)

        if "sigkill" in faults:
            wait_for(lambda: running_steps(lines(), "w1") > 0, 60, "a step running on w1")
            workers[1].send_signal(signal.SIGKILL)
            killed["w1"] = time.time()
        if "sigterm" in faults:
            # Kubernetes moves a pod: SIGTERM mid-step (the step is handed back after the
            # 1 s grace), the pod's emptyDir is gone, a new pod starts in its place
            wait_for(lambda: running_steps(lines(), "w2") > 0, 60, "a step running on w2")
            workers[2].send_signal(signal.SIGTERM)
            assert workers[2].wait(timeout=30) == 0
            _delete_tree(data_dirs[2])
            argv = [
                "ip",
                "netns",
                "exec",
                net.namespaces[2],
                sys.executable,
                str(HERE / "netns_worker.py"),
            ]
            stack.enter_context(background(argv, tmp_path / "worker-2b.log", env=envs[2]))
        if "datadir" in faults:
            # a worker loses its disk mid-step: its caches, mirrors and worktrees are gone
            wait_for(lambda: running_steps(lines(), "w2") > 0, 60, "a step running on w2")
            _delete_tree(data_dirs[2])

        def all_done() -> bool:
            statuses = asyncio.run(_statuses(settings, run_ids))
            return all(status == ProtocolStatus.COMPLETED for status, _, _ in statuses.values())

        try:
            wait_for(all_done, RUN_TIMEOUT_S, "every protocol to complete")
        except AssertionError as exc:  # say which protocols were left where
            unfinished = {
                k: v
                for k, v in asyncio.run(_statuses(settings, run_ids)).items()
                if v[0] != ProtocolStatus.COMPLETED
            }
            raise AssertionError(f"{exc}; unfinished: {unfinished}") from None
        statuses = asyncio.run(_statuses(settings, run_ids))
        left, failed = asyncio.run(_queue_report(settings))

    # every protocol and step completed; nothing left in the queue, no job failed
    assert all(
        s == ProtocolStatus.COMPLETED and steps == [StepStatus.COMPLETED] * STEPS
        for s, steps, _ in statuses.values()
    )
    assert left == [] and failed == [], (left, failed)
    # every step is exactly one commit on its branch in the remote
    origin = served / "origin.git"
    for run_id, (_, _, branch) in statuses.items():
        subjects = subprocess.run(
            ["git", "--git-dir", str(origin), "log", "--format=%s", f"main..{branch}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        number = int(branch.split("-", 1)[0])
        for step in range(1, STEPS + 1):
            assert subjects.count(step_marker(number, step)) == 1, (run_id, branch, step, subjects)
    # no step ran on two workers at once; the work really was spread over the namespaces
    log = read_log(logs)
    assert overlaps(log, killed) == []
    ran_on = {line["worker"] for line in log if line["phase"] == "execute"}
    assert len(ran_on) == WORKERS, ran_on
