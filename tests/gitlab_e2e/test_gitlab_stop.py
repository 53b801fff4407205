"""/cancel during a long engine step, and a worker killed mid-step, on the GitLab fake with the
product's DEFAULT settings (QA right after a step; CI gating once the project has CI)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from bot.domain.states import ProtocolStatus, StepStatus
from tests.conftest import GITLAB_SECRET
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
from tests.gitlab_e2e.conftest import World
from tests.gitutil import git
from tests.protocol.conftest import one_step_planning, scripted_script


def step_commits(world: World, step: int) -> list[str]:
    name = world.run().protocol_name
    try:
        subjects = git("log", "--format=%s", f"refs/heads/{name}", cwd=world.origin).splitlines()
    except Exception:  # no branch yet
        return []
    return [s for s in subjects if f"[protocol-0001/{step:02d}]" in s]


def planned_and_approved(world: World) -> None:
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    world.wait_run(ProtocolStatus.PLANNED)
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")


def job_failures(world: World) -> list[Any]:
    """Jobs that ended with an exception (a traceback in the worker's log)."""
    redis = world.client.app.state.df.redis  # type: ignore[attr-defined]
    assert world.client.portal is not None
    results = world.client.portal.call(redis.all_job_results)
    return [(r.function, r.result) for r in results if not r.success]


def test_cancel_during_a_long_engine_step_kills_it_and_pushes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, world_factory: Callable[..., World]
) -> None:
    dump = stubborn_execute(monkeypatch, tmp_path)
    world = world_factory()
    planned_and_approved(world)
    world.send("Note Hook", world.note("/run-step"))
    wait_for(lambda: bool(engine_pids(dump)), 30, "the engine process started")
    name = world.run().protocol_name
    before = git("rev-parse", f"refs/heads/{name}", cwd=world.origin).strip()
    worktree = Path(world.run().worktree_path)
    assert (worktree / EDIT).exists()

    started = time.monotonic()
    world.send("Note Hook", world.note("/cancel"))
    # the engine's process group (which ignores SIGTERM) is killed and the job has written the
    # stop (its last act, after discarding the edits) within 5 s
    wait_for(lambda: engine_gone(dump) and bool(world.events("step.stopped")), 5, "engine stopped")
    assert time.monotonic() - started < 5
    world.wait_run(ProtocolStatus.CANCELLED)
    # nothing of the cancelled step is committed, pushed, or left in the worktree
    assert git("rev-parse", f"refs/heads/{name}", cwd=world.origin).strip() == before
    assert step_commits(world, 1) == []
    assert git("status", "--porcelain", cwd=worktree).strip() == ""
    assert not (worktree / EDIT).exists()
    assert world.events("step.error") == []
    world.wait(lambda: "cancelled by @alice" in world.status_note()["body"], "status note says who")
    assert job_failures(world) == []  # the execute job too ended without a traceback


# Two `deksdenflow worker` processes (each with its own data directory, as on two machines)
# share the database and a real Redis, and reach the fake GitLab over 127.0.0.1. LEASE_TTL_S
# (a setting the product exposes) is shortened so the test does not wait out the default 60 s
# TTL; the reclaim cron keeps its default schedule (twice a minute). With the defaults the
# same takes at most ~90 s, inside the 2 minutes.
LEASE = {"DEKSDENFLOW_LEASE_TTL_S": "2", "DEKSDENFLOW_LEASE_RENEW_S": "0.5"}


@pytest.mark.redis
def test_a_worker_killed_mid_step_the_step_finishes_on_another_worker(
    tmp_path: Path, world_factory: Callable[..., World], redis_url: str, sqlite_url: str
) -> None:
    key = Fernet.generate_key().decode()
    # the app answers webhooks only (a redis:// queue: no embedded worker); workers do the jobs
    world = world_factory(redis_url=redis_url, secret_key=key)
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
        "DEKSDENFLOW_DB_URL": sqlite_url,
        "DEKSDENFLOW_REDIS_URL": redis_url,
        "DEKSDENFLOW_SECRET_KEY": key,
        "DEKSDENFLOW_GITLAB_URL": world.fake.url,
        "DEKSDENFLOW_GITLAB_TOKEN": world.fake.token,
        "DEKSDENFLOW_GITLAB_WEBHOOK_SECRET": GITLAB_SECRET,
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
        planned_and_approved(world)
        world.send("Note Hook", world.note("/run-step"))
        wait_for(
            lambda: world.step_statuses() == [StepStatus.RUNNING],
            60,
            "step 01 running on worker A",
            log_a,
        )
        time.sleep(0.5)  # inside the engine's five-minute turn now
        kill(worker_a)
    assert step_commits(world, 1) == []  # A died before it committed anything
    killed = time.monotonic()
    with worker_process(tmp_path, "worker-b", b_env) as (_worker_b, log_b):
        # B takes the step back (its reclaim cron, or arq: see below) and runs it again; no CI is
        # known for the project, so QA alone gates and the one-step protocol completes
        wait_for(
            lambda: world.run().status == ProtocolStatus.COMPLETED,
            120,
            "protocol completed on B",
            log_b,
        )
        assert time.monotonic() - killed < 120
    step = world.steps()[0]
    assert (
        step.status == StepStatus.COMPLETED
        and json.loads(step.runtime_state)["qa_verdict"] == "PASS"
    )
    assert step_commits(world, 1) == ["feat(add): Add a greeting module [protocol-0001/01]"]
    # B took the step back: by the reclaim cron (the lease expired), or by arq itself, whose
    # in-progress key of the dead worker's job now lives one lease TTL (bot/jobs/resilient.py)
    log = log_b.read_text()
    assert "lease expired, work taken back" in log or "engine scripted (execute" in log
