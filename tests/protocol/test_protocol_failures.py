"""Every failure ends visible and recoverable; /cancel and /pause stop the engine; leases."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from arq import Retry

from bot.domain.states import ProtocolStatus, StepStatus
from bot.forge.local import LocalForge
from bot.jobs import actions
from bot.jobs.common import MAX_TRIES
from bot.jobs.locks import LOCK_PREFIX, lease_alive
from bot.jobs.reclaim import orphaned_qa, orphaned_work, reclaim_expired
from bot.jobs.steps import execute_step, plan_protocol, run_quality
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.gitutil import git
from tests.protocol.conftest import Harness, one_step_planning, origin_log, scripted_script


def step_commits(origin: Path, branch: str, step: int) -> list[str]:
    return [s for s in origin_log(origin, branch) if f"[protocol-0001/{step:02d}]" in s]


async def status_comment(h: Harness) -> str:
    records = await LocalForge(h.ctx["db"], h.project.id).records("status_comment")
    return records[-1].body if records else ""


async def checks(h: Harness) -> list[dict[str, Any]]:
    return [dict(r.data) for r in await LocalForge(h.ctx["db"], h.project.id).records("check")]


class FlakyEngine(ScriptedEngine):
    """Fails (or raises) in one phase for its first `times` calls, then behaves."""

    def __init__(self, phase: str, *, times: int = 1, raise_exc: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.phase, self.left, self.raise_exc = phase, times, raise_exc

    async def run(self, request: EngineRequest) -> EngineResult:
        if request.phase == self.phase and self.left > 0:
            self.left -= 1
            if self.raise_exc:
                raise RuntimeError("engine blew up\nsecond line not shown")
            return EngineResult(outcome="failed", exit_code=1, error="model unavailable")
        return await super().run(request)


def reject_pushes(origin: Path) -> Path:
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'push rejected by policy' >&2\nexit 1\n")
    hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    return hook


async def test_push_rejected_blocks_visibly_and_retry_recovers(harness: Harness) -> None:
    run_id = await harness.start()
    name = (await harness.state(run_id)).run.protocol_name
    hook = reject_pushes(harness.origin)

    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "failed"
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (StepStatus.FAILED, ProtocolStatus.BLOCKED)
    message = state.run.runtime_state["message"]
    assert message == "step 01 failed: git push failed (exit 1): remote: push rejected by policy", (
        message
    )
    assert "\n" not in message
    assert message in await status_comment(harness)
    assert step_commits(harness.origin, name, 1) == []

    hook.unlink()
    assert await actions.retry(harness.ctx, run_id) == 1
    await harness.drain()
    state = await harness.state(run_id)
    assert state.step(1).status == StepStatus.COMPLETED
    assert len(step_commits(harness.origin, name, 1)) == 1


async def test_engine_error_then_resume_reruns_the_failed_step(harness: Harness) -> None:
    engine = FlakyEngine("execute")
    harness.use(engine)
    run_id = await harness.start(auto=True)
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (StepStatus.FAILED, ProtocolStatus.BLOCKED)
    assert "engine failed: model unavailable" in state.run.runtime_state["message"]
    failures = [c for c in await checks(harness) if c.get("conclusion") == "failure"]
    assert failures, await checks(harness)

    await actions.resume(harness.ctx, run_id)
    await harness.drain()
    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.COMPLETED, [
        (s.step_index, s.status) for s in state.steps
    ]
    assert all(s.status == StepStatus.COMPLETED for s in state.steps)
    name = state.run.protocol_name
    assert len(step_commits(harness.origin, name, 1)) == 1


async def test_exception_in_qa_fails_the_step_and_retry_works(harness: Harness) -> None:
    harness.use(
        FlakyEngine("qa", raise_exc=True, script=scripted_script(planning=one_step_planning()))
    )
    run_id = await harness.start()
    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
    assert await run_quality(harness.ctx, protocol_run_id=run_id, step_index=1) == "failed"
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (StepStatus.FAILED, ProtocolStatus.BLOCKED)
    assert (
        state.run.runtime_state["message"] == "QA of step 01 failed: RuntimeError: engine blew up"
    )
    assert "QA of step 01 failed" in await status_comment(harness)

    await actions.retry(harness.ctx, run_id, 1)
    await harness.drain()
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (
        StepStatus.COMPLETED,
        ProtocolStatus.COMPLETED,
    )


async def test_exception_in_planning_fails_it_and_retry_plans_again(harness: Harness) -> None:
    harness.use(FlakyEngine("planning", raise_exc=True))
    run_id = await harness.start()
    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.FAILED
    assert state.run.runtime_state["message"].startswith("planning failed: RuntimeError")

    await actions.resume(harness.ctx, run_id)  # /resume (like /retry) plans again
    await harness.drain()
    assert (await harness.state(run_id)).run.status == ProtocolStatus.PLANNED


async def test_retry_after_a_failed_planning_plans_again(harness: Harness) -> None:
    harness.use(FlakyEngine("planning"))
    run_id = await harness.start()
    assert (await harness.state(run_id)).run.status == ProtocolStatus.FAILED
    await actions.retry(harness.ctx, run_id)
    await harness.drain()
    assert (await harness.state(run_id)).run.status == ProtocolStatus.PLANNED


async def test_approve_accepts_a_failed_step_and_names_steps_by_number(harness: Harness) -> None:
    harness.use(FlakyEngine("execute", script=scripted_script(planning=one_step_planning())))
    run_id = await harness.start()
    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "failed"
    try:
        await actions.run_qa(harness.ctx, run_id, 1)
    except Exception as exc:
        assert "step 1 is 'failed'" in str(exc), exc
        assert "StepRun" not in str(exc)
    else:  # pragma: no cover
        raise AssertionError("QA of a failed step must be refused")
    assert await actions.approve(harness.ctx, run_id, 1) == "step-approved"
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (
        StepStatus.COMPLETED,
        ProtocolStatus.COMPLETED,
    )


def slow_script(seconds: float) -> dict[str, Any]:
    return scripted_script(
        planning=one_step_planning(),
        execute={
            "default": {"delay_s": seconds, "files": [{"path": "slow.txt", "content": "x\n"}]}
        },
    )


async def wait_for_engine(engine: ScriptedEngine, phase: str = "execute") -> None:
    for _ in range(200):
        if any(r.phase == phase for r in engine.requests):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the engine never started")


async def test_cancel_during_a_long_engine_step_stops_it_and_pushes_nothing(
    harness: Harness,
) -> None:
    engine = ScriptedEngine(slow_script(60))
    harness.use(engine)
    run_id = await harness.start()
    name = (await harness.state(run_id)).run.protocol_name
    job = asyncio.create_task(execute_step(harness.ctx, protocol_run_id=run_id, step_index=1))
    await wait_for_engine(engine)
    await actions.cancel(harness.ctx, run_id, by="alice")
    assert await asyncio.wait_for(job, timeout=5) == "cancelled"
    state = await harness.state(run_id)
    assert (state.run.status, state.step(1).status) == (
        ProtocolStatus.CANCELLED,
        StepStatus.CANCELLED,
    )
    assert step_commits(harness.origin, name, 1) == []
    worktree = Path(state.run.worktree_path)
    assert git("status", "--porcelain", cwd=worktree).strip() == ""
    assert not (worktree / "slow.txt").exists()
    assert "cancelled by @alice" in await status_comment(harness)
    assert not await lease_alive(harness.ctx["redis"], run_id)


async def test_pause_stops_the_engine_and_resume_reruns_the_step(harness: Harness) -> None:
    engine = ScriptedEngine(slow_script(60))
    harness.use(engine)
    run_id = await harness.start()
    job = asyncio.create_task(execute_step(harness.ctx, protocol_run_id=run_id, step_index=1))
    await wait_for_engine(engine)
    await actions.pause(harness.ctx, run_id, by="bob")
    assert await asyncio.wait_for(job, timeout=5) == "paused"
    state = await harness.state(run_id)
    assert (state.run.status, state.step(1).status) == (ProtocolStatus.PAUSED, StepStatus.PENDING)
    assert "paused by @bob" in await status_comment(harness)

    harness.use(ScriptedEngine(scripted_script(planning=one_step_planning())))
    await actions.resume(harness.ctx, run_id)
    await harness.drain()
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (
        StepStatus.COMPLETED,
        ProtocolStatus.COMPLETED,
    )


class Killed(BaseException):
    """The worker process dies: nothing after this point runs, no except clause sees it."""


async def test_worker_killed_mid_step_is_taken_back_after_the_lease_expires(
    harness: Harness,
) -> None:
    engine = ScriptedEngine(scripted_script(planning=one_step_planning()))
    harness.use(engine)
    run_id = await harness.start()
    name = (await harness.state(run_id)).run.protocol_name

    def die(at: str, _run: int, _step: int) -> None:
        if at == "after_commit":
            raise Killed()

    harness.ctx["crash_hook"] = die
    try:
        await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    except Killed:
        pass
    del harness.ctx["crash_hook"]
    # a killed process releases nothing: its lease stays until its TTL runs out
    redis = harness.ctx["redis"]
    await redis.set(LOCK_PREFIX + str(run_id), "dead-worker", px=300)
    assert (await harness.state(run_id)).step(1).status == StepStatus.RUNNING
    assert await orphaned_work(harness.ctx) == []  # still leased: nobody takes it yet
    await asyncio.sleep(0.4)
    assert await orphaned_work(harness.ctx) == [(run_id, 1)]

    assert await reclaim_expired(harness.ctx) == 1
    await harness.drain()
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (
        StepStatus.COMPLETED,
        ProtocolStatus.COMPLETED,
    )
    assert len(step_commits(harness.origin, name, 1)) == 1
    assert sum(1 for r in engine.requests if r.phase == "execute") == 1  # the commit was reused


async def test_a_planning_worker_killed_is_taken_back(harness: Harness) -> None:
    from bot.storage.runs import set_protocol_status

    run = await actions.start_protocol(
        harness.ctx, harness.project, "Add a greeting", approved=True
    )
    await set_protocol_status(
        harness.ctx["db"], run.id, ProtocolStatus.PLANNING, "a worker started and died"
    )
    assert await orphaned_work(harness.ctx) == [(run.id, None)]
    await reclaim_expired(harness.ctx)
    await harness.drain()
    assert (await harness.state(run.id)).run.status == ProtocolStatus.PLANNED
    assert await plan_protocol(harness.ctx, protocol_run_id=run.id) == "skipped-planned"


async def test_lease_is_renewed_while_a_job_runs(harness: Harness) -> None:
    fast = harness.ctx["settings"].model_copy(update={"lease_ttl_s": 0.3, "lease_renew_s": 0.05})
    harness.ctx["settings"] = fast
    engine = ScriptedEngine(slow_script(1.0))
    harness.use(engine)
    run_id = await harness.start()
    job = asyncio.create_task(execute_step(harness.ctx, protocol_run_id=run_id, step_index=1))
    await wait_for_engine(engine)
    await asyncio.sleep(0.6)  # two TTLs: alive only because it is renewed
    assert await lease_alive(harness.ctx["redis"], run_id)
    assert await orphaned_work(harness.ctx) == []
    assert await job == "needs_qa-run"
    assert not await lease_alive(harness.ctx["redis"], run_id)


def test_env_has_no_token_reused_across_the_engine_call() -> None:
    """JobEnv.push asks the forge for credentials at push time (see bot/jobs/env.py)."""
    import inspect

    from bot.jobs.env import JobEnv

    # push() is push_commits() without the stat: both push with a header asked for now
    assert "self.auth(state)" in inspect.getsource(JobEnv.push_commits)
    assert "self.push_commits(" in inspect.getsource(JobEnv.push)
    assert os.sep  # keep os imported for the hook helper on every platform


async def test_cancel_kills_the_codex_process_group_within_5_s(
    harness: Harness, tmp_path: Path
) -> None:
    """The real engine class on a fake codex binary that starts a child and sleeps."""
    import dataclasses
    import json
    import sys

    from engines.codex import CodexEngine
    from tests.engines.test_engines_codex_process import FAKE_CODEX, alive

    fake = tmp_path / "fake-codex"
    fake.write_text(f"#!{sys.executable}\n{FAKE_CODEX}")
    fake.chmod(0o755)
    dump = tmp_path / "pids.json"
    codex = CodexEngine(str(fake), codex_home=str(tmp_path / "codex-home"), kill_grace_s=10)
    scripted = ScriptedEngine(scripted_script(planning=one_step_planning()))

    class Hybrid:
        engine_id = "scripted"

        async def run(self, request: EngineRequest) -> EngineResult:
            if request.phase != "execute":
                return await scripted.run(request)
            env = {"FAKE_CODEX_MODE": "stubborn", "FAKE_CODEX_DUMP": str(dump)}
            return await codex.run(dataclasses.replace(request, env=env))

    harness.use(Hybrid())
    run_id = await harness.start()
    name = (await harness.state(run_id)).run.protocol_name
    job = asyncio.create_task(execute_step(harness.ctx, protocol_run_id=run_id, step_index=1))
    for _ in range(200):
        if dump.exists() and dump.read_text():
            break
        await asyncio.sleep(0.05)
    pids = json.loads(dump.read_text())
    await actions.cancel(harness.ctx, run_id, by="carol")
    # the bound: the job ends (the group killed, SIGKILL after 2 s) within 5 s
    assert await asyncio.wait_for(job, timeout=5) == "cancelled"
    for _ in range(20):
        if not alive(pids["pid"]) and not alive(pids["child"]):
            break
        await asyncio.sleep(0.05)
    assert not alive(pids["pid"]) and not alive(pids["child"])
    assert step_commits(harness.origin, name, 1) == []
    assert "cancelled by @carol" in await status_comment(harness)


async def test_an_inline_trigger_is_enqueued_with_its_depth_not_run_inside_the_job(
    harness: Harness,
) -> None:
    from bot.storage.runs import update_run

    engine = ScriptedEngine(
        scripted_script(
            planning={
                "steps": [
                    {"slug": "first", "title": "First", "content": "# 1\n", "qa_policy": "skip"},
                    {"slug": "second", "title": "Second", "content": "# 2\n", "qa_policy": "skip"},
                ]
            }
        )
    )
    harness.use(engine)
    run_id = await harness.start()
    state = await harness.state(run_id)
    config = dict(state.run.template_config)
    config["steps"] = [dict(s) for s in config["steps"]]
    config["steps"][0]["triggers"] = [{"on": "pass", "step": 2, "mode": "inline"}]
    await update_run(harness.ctx["db"], run_id, template_config=config)

    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "completed"
    executed = [r.context.get("step_index") for r in engine.requests if r.phase == "execute"]
    assert executed == [1]  # step 2 was not run inside step 1's job
    queued = await harness.ctx["redis"].queued_jobs()
    trig = [j for j in queued if j.function == "execute_step" and j.kwargs.get("step_index") == 2]
    assert [j.kwargs["depth"] for j in trig] == [1]
    await harness.drain()
    state = await harness.state(run_id)
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED, StepStatus.COMPLETED]
    assert state.run.status == ProtocolStatus.COMPLETED


async def _qa_killed_then_reclaimed(harness: Harness, where: str) -> tuple[int, ScriptedEngine]:
    """Step 01 executed (QA not started on its own), then its QA's worker dies at `where` and,
    once the lease expired, the reclaim cron takes the QA back."""
    harness.ctx["settings"] = harness.ctx["settings"].model_copy(
        update={"auto_qa_after_exec": False}
    )
    engine = ScriptedEngine(scripted_script(planning=one_step_planning()))
    harness.use(engine)
    run_id = await harness.start()
    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa"
    assert await orphaned_qa(harness.ctx) == []  # waiting for /qa is not a dead QA

    def die(at: str, _run: int, _step: int) -> None:
        if at == where:
            raise Killed()

    harness.ctx["crash_hook"] = die
    try:
        await run_quality(harness.ctx, protocol_run_id=run_id, step_index=1)
    except Killed:
        pass
    del harness.ctx["crash_hook"]
    redis = harness.ctx["redis"]
    await redis.set(LOCK_PREFIX + str(run_id), "dead-worker", px=300)  # a killed process keeps it
    assert (await harness.state(run_id)).step(1).status == StepStatus.NEEDS_QA
    assert await orphaned_qa(harness.ctx) == []  # still leased
    await asyncio.sleep(0.4)
    assert await orphaned_qa(harness.ctx) == [(run_id, 1)]
    assert await orphaned_work(harness.ctx) == []  # no step is `running`: QA has its own mark
    assert await reclaim_expired(harness.ctx) == 1
    await harness.drain()
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (
        StepStatus.COMPLETED,
        ProtocolStatus.COMPLETED,
    )
    assert state.step(1).runtime_state["qa_verdict"] == "PASS"
    assert state.step(1).runtime_state.get("qa_running") is None
    assert await orphaned_qa(harness.ctx) == []
    name = state.run.protocol_name
    qa_commits = [s for s in origin_log(harness.origin, name) if "[protocol-0001/01-qa]" in s]
    assert len(qa_commits) == 1, qa_commits
    assert len(step_commits(harness.origin, name, 1)) == 1
    assert [e.message for e in await harness.events(run_id, "qa.verdict")] == ["step 01: PASS"]
    return run_id, engine


async def test_a_worker_killed_mid_qa_is_taken_back_and_qa_runs_again(harness: Harness) -> None:
    _run_id, engine = await _qa_killed_then_reclaimed(harness, "qa_before_commit")
    assert sum(1 for r in engine.requests if r.phase == "qa") == 2  # the QA turn ran again


async def test_a_worker_killed_after_the_qa_commit_reuses_its_report(harness: Harness) -> None:
    _run_id, engine = await _qa_killed_then_reclaimed(harness, "qa_after_commit")
    assert (
        sum(1 for r in engine.requests if r.phase == "qa") == 1
    )  # the committed report was judged


async def test_a_reclaimed_qa_after_its_verdict_does_nothing(harness: Harness) -> None:
    harness.use(ScriptedEngine(scripted_script(planning=one_step_planning())))
    run_id = await harness.start()
    await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    await harness.drain()  # its QA
    state = await harness.state(run_id)
    assert state.step(1).status == StepStatus.COMPLETED
    assert (
        await run_quality(harness.ctx, protocol_run_id=run_id, step_index=1, reclaim=True)
        == "skipped-qa-done"
    )
    assert (await harness.state(run_id)).step(1).runtime_state["qa_attempts"] == 1


class WipingEngine(ScriptedEngine):
    """Its first execute call ends with the worker's cache directory gone, as when a node loses
    its disk (an emptyDir) under a running step."""

    def __init__(self, data_dir: Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.data_dir, self.wiped = data_dir, False

    async def run(self, request: EngineRequest) -> EngineResult:
        result = await super().run(request)
        if request.phase == "execute" and not self.wiped:
            self.wiped = True
            shutil.rmtree(self.data_dir)
        return result


async def test_a_step_whose_disk_is_wiped_runs_again_instead_of_failing(harness: Harness) -> None:
    engine = WipingEngine(
        harness.ctx["git"].data_dir, script=scripted_script(planning=one_step_planning())
    )
    harness.use(engine)
    run_id = await harness.start()
    name = (await harness.state(run_id)).run.protocol_name

    with pytest.raises(Retry):  # the worktree vanished under the job: arq runs it again
        await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (StepStatus.RUNNING, ProtocolStatus.RUNNING)
    assert not await lease_alive(harness.ctx["redis"], run_id)

    # arq's next try rebuilds the worktree from the pushed branch and finishes the step once
    await execute_step({**harness.ctx, "job_try": 2}, protocol_run_id=run_id, step_index=1)
    await harness.drain()
    assert (await harness.state(run_id)).step(1).status not in (
        StepStatus.RUNNING,
        StepStatus.FAILED,
    )
    assert len(step_commits(harness.origin, name, 1)) == 1
    assert sum(1 for r in engine.requests if r.phase == "execute") == 2


async def test_a_wiped_disk_on_the_last_try_fails_the_step_visibly(harness: Harness) -> None:
    harness.use(
        WipingEngine(
            harness.ctx["git"].data_dir, script=scripted_script(planning=one_step_planning())
        )
    )
    run_id = await harness.start()
    ctx = {**harness.ctx, "job_try": MAX_TRIES}  # no try left: the failure is recorded, not retried
    assert await execute_step(ctx, protocol_run_id=run_id, step_index=1) == "failed"
    state = await harness.state(run_id)
    assert (state.step(1).status, state.run.status) == (StepStatus.FAILED, ProtocolStatus.BLOCKED)
