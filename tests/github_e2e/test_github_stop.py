"""/cancel during a long engine step, and a worker killed mid-step, on the GitHub fake with the
product's DEFAULT settings (QA right after a step, CI gating in a repository with workflows)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from bot.domain.states import ProtocolStatus, StepStatus
from tests.conftest import GITHUB_SECRET, LiveServer
from tests.fakes.stop_and_kill import (
    EDIT,
    engine_gone,
    engine_pids,
    kill,
    stubborn_execute,
    wait_for,
    worker_process,
    write_script,
)
from tests.github_e2e.conftest import GitHubLoop
from tests.github_e2e.fake_github import APP_ID, APP_SLUG
from tests.gitutil import git
from tests.protocol.conftest import one_step_planning, scripted_script

PROTOCOL = "0001-add-a-greeting"


def step_commits(origin: Path, step: int) -> list[str]:
    try:
        subjects = git("log", "--format=%s", f"refs/heads/{PROTOCOL}", cwd=origin).splitlines()
    except Exception:  # the branch does not exist (yet)
        return []
    return [s for s in subjects if f"[protocol-0001/{step:02d}]" in s]


def branch_head(origin: Path) -> str:
    return git("rev-parse", f"refs/heads/{PROTOCOL}", cwd=origin).strip()


def job_failures(gh: GitHubLoop) -> list[Any]:
    """Jobs that ended with an exception (a traceback in the worker's log)."""
    assert gh.state.redis is not None
    results = gh.call(gh.state.redis.all_job_results)
    return [(r.function, r.result) for r in results if not r.success]


def test_cancel_during_a_long_engine_step_kills_it_and_pushes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, loop_factory: Callable[..., GitHubLoop]
) -> None:
    dump = stubborn_execute(monkeypatch, tmp_path)
    gh = loop_factory()
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    gh.deliver("issue_comment", gh.comment("/approve"))
    gh.post("issue_comment", gh.comment("/run-step"))
    wait_for(lambda: bool(engine_pids(dump)), 30, "the engine process started")
    before = branch_head(gh.origin)  # the plan commit: nothing of step 01 is on GitHub yet
    worktree = Path(str(gh.run().run.worktree_path))
    assert (worktree / EDIT).exists()  # the agent has started editing

    started = time.monotonic()
    gh.post("issue_comment", gh.comment("/cancel", user="alice"))
    # the engine's process group (which ignores SIGTERM) is killed and the job has written the
    # stop (its last act, after discarding the edits) within 5 s
    wait_for(lambda: engine_gone(dump) and bool(gh.events("step.stopped")), 5, "engine stopped")
    assert time.monotonic() - started < 5
    gh.wait_idle()
    state = gh.run()
    assert (state.run.status, state.step(1).status) == (
        ProtocolStatus.CANCELLED,
        StepStatus.CANCELLED,
    )
    # nothing of the cancelled step is committed, pushed, or left in the worktree
    assert branch_head(gh.origin) == before and step_commits(gh.origin, 1) == []
    assert git("status", "--porcelain", cwd=worktree).strip() == ""
    assert not (worktree / EDIT).exists()
    assert gh.events("step.error") == []
    assert job_failures(gh) == []  # every job (the execute job too) ended without a traceback
    # the status comment (on the issue, and its copy on the PR) says who cancelled
    status = {
        c["issue"]: c["body"]
        for c in gh.fake.comments.values()
        if "deksdenflow:status" in c["body"]
    }
    assert 1 in status and all("cancelled by @alice" in body for body in status.values()), status


# -- a worker killed mid-step -----------------------------------------------------------------

# Two `deksdenflow worker` processes (each with its own data directory, as on two machines)
# share the database and a real Redis; they reach the GitHub fake over 127.0.0.1. The lease is
# shortened (LEASE_TTL_S=2, a setting the product exposes) so the test does not wait out the
# default 60 s TTL; the reclaim cron keeps its default schedule (twice a minute). With the
# defaults the same takes at most ~90 s, inside the 2 minutes.
LEASE = {"DEKSDENFLOW_LEASE_TTL_S": "2", "DEKSDENFLOW_LEASE_RENEW_S": "0.5"}


def fake_github_server(gh: GitHubLoop) -> LiveServer:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def endpoint(request: Request) -> Response:
        raw = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        status, headers, data = gh.fake.handle(
            request.method, raw, request.headers.get("authorization"), await request.body()
        )
        return JSONResponse(data, status_code=status, headers=headers)

    methods = ["GET", "POST", "PATCH", "PUT", "DELETE"]
    return LiveServer(Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)]))


@pytest.fixture
def fernet_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def github_server() -> Iterator[Callable[[GitHubLoop], str]]:
    servers: list[LiveServer] = []

    def start(gh: GitHubLoop) -> str:
        server = fake_github_server(gh).__enter__()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@pytest.mark.redis
def test_a_worker_killed_mid_step_the_step_finishes_on_another_worker(
    tmp_path: Path,
    loop_factory: Callable[..., GitHubLoop],
    redis_url: str,
    app_key: str,
    fernet_key: str,
    github_server: Callable[[GitHubLoop], str],
) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    # the app answers webhooks only (a redis:// queue: no embedded worker); workers do the jobs
    gh = loop_factory(redis_url=redis_url, secret_key=fernet_key)
    api = github_server(gh)
    slow = write_script(
        tmp_path / "slow.yml",
        scripted_script(
            planning=one_step_planning(),
            execute={
                "default": {"delay_s": 300, "files": [{"path": "GREETING.md", "content": "hi\n"}]}
            },
        ),
    )
    fast = write_script(tmp_path / "fast.yml", scripted_script(planning=one_step_planning()))
    common = {
        "DEKSDENFLOW_DB_URL": db_url,
        "DEKSDENFLOW_REDIS_URL": redis_url,
        "DEKSDENFLOW_SECRET_KEY": fernet_key,
        "DEKSDENFLOW_GITHUB_APP_ID": str(APP_ID),
        "DEKSDENFLOW_GITHUB_PRIVATE_KEY": app_key,
        "DEKSDENFLOW_GITHUB_APP_SLUG": APP_SLUG,
        "DEKSDENFLOW_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
        "DEKSDENFLOW_GITHUB_API_URL": api,
        "DEKSDENFLOW_ENGINE": "scripted",
        "DEKSDENFLOW_LOG_LEVEL": "INFO",
        **LEASE,
    }
    a_env = {
        **common,
        "DEKSDENFLOW_DATA_DIR": str(tmp_path / "a"),
        "DEKSDENFLOW_SCRIPTED_SCRIPT": str(slow),
    }
    b_env = {
        **common,
        "DEKSDENFLOW_DATA_DIR": str(tmp_path / "b"),
        "DEKSDENFLOW_SCRIPTED_SCRIPT": str(fast),
    }
    with worker_process(tmp_path, "worker-a", a_env) as (worker_a, log_a):
        gh.deliver("installation", gh.installation_created(), timeout=60)
        gh.deliver("issue_comment", gh.comment("/plan"), timeout=60)
        gh.deliver("issue_comment", gh.comment("/approve"), timeout=60)
        gh.post("issue_comment", gh.comment("/run-step"))
        wait_for(
            lambda: gh.run().step(1).status == StepStatus.RUNNING,
            60,
            "step 01 running on worker A",
            log_a,
        )
        time.sleep(0.5)  # inside the engine's five-minute turn now
        kill(worker_a)
    assert step_commits(gh.origin, 1) == []  # A died before it committed anything
    killed = time.monotonic()
    with worker_process(tmp_path, "worker-b", b_env) as (_worker_b, log_b):
        # B's reclaim cron finds the step without a live lease and runs it again
        wait_for(
            lambda: gh.run().step(1).runtime_state.get("qa_verdict") == "PASS",
            120,
            "step 01 done on B",
            log_b,
        )
        assert time.monotonic() - killed < 120
        state = gh.run()
        assert (
            state.step(1).status == StepStatus.NEEDS_QA
        )  # executed and QA'd, waiting for CI (default)
        # (not gh.ci_green: its idle wait counts queued jobs, and the dead worker's execute job
        # stays in arq's queue, held by its in-progress key for the job timeout)
        gh.ci_suite("success")
        gh.post(
            "workflow_run", gh.workflow_run(PROTOCOL, state.step(1).runtime_state["commit_sha"])
        )
        wait_for(
            lambda: gh.run().run.status == ProtocolStatus.COMPLETED, 60, "protocol completed", log_b
        )
    assert step_commits(gh.origin, 1) == ["feat(add): Add a greeting module [protocol-0001/01]"]
    # B took the step back: by the reclaim cron (the lease expired), or by arq itself, whose
    # in-progress key of the dead worker's job now lives one lease TTL (bot/jobs/resilient.py)
    log = log_b.read_text()
    assert "lease expired, work taken back" in log or "engine scripted (execute" in log
