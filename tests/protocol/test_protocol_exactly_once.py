"""Exactly once: a crash inside execute_step, a re-run, and two workers racing for one protocol."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from arq import Retry

from bot.domain.states import StepStatus
from bot.jobs.steps import execute_step
from bot.storage.queue import create_redis
from engines.scripted import ScriptedEngine
from tests.protocol.conftest import (
    Harness,
    make_harness,
    origin_file,
    origin_log,
    protocol_settings,
)


class Crash(BaseException):
    """What the crash hook raises: stands for the worker dying at that point.

    A BaseException, like the worker's own death: the job boundary turns every Exception into
    a failed step, but a killed worker records nothing.
    """


def crash_once(stage: str) -> Any:
    calls: list[tuple[str, int, int]] = []

    def hook(at: str, run_id: int, step_index: int) -> None:
        calls.append((at, run_id, step_index))
        if at == stage and sum(1 for c in calls if c[0] == stage) == 1:
            raise Crash(f"worker died at {at}")

    return hook, calls


def step_commits(origin: Path, branch: str, step: int) -> list[str]:
    marker = f"[protocol-0001/{step:02d}]"
    return [s for s in origin_log(origin, branch) if marker in s]


def execute_requests(engine: ScriptedEngine, step: int) -> int:
    return sum(
        1 for r in engine.requests if r.phase == "execute" and r.context.get("step_index") == step
    )


async def test_crash_after_commit_before_push_rerun_pushes_once(harness: Harness) -> None:
    engine = ScriptedEngine()
    harness.use(engine)
    run_id = await harness.start()
    name = (await harness.state(run_id)).run.protocol_name
    hook, _calls = crash_once("after_commit")
    harness.ctx["crash_hook"] = hook

    with pytest.raises(Crash):
        await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    # the commit exists only in the worktree: nothing reached the origin
    assert step_commits(harness.origin, name, 1) == []
    state = await harness.state(run_id)
    assert state.step(1).status == StepStatus.RUNNING

    # the lock was released by the crash (context manager), so the re-run gets it
    outcome = await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    assert outcome == "needs_qa-run"
    assert step_commits(harness.origin, name, 1) == [
        "docs(record): Record the task [protocol-0001/01]"
    ]
    assert execute_requests(engine, 1) == 1
    assert origin_file(harness.origin, name, "TASK.md").startswith("# Task")
    # a third run (a duplicate delivery of the job) changes nothing
    await harness.drain()
    assert (
        await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "skipped-completed"
    )
    assert len(step_commits(harness.origin, name, 1)) == 1
    assert execute_requests(engine, 1) == 1
    log = origin_file(harness.origin, name, f".protocols/{name}/log.md")
    assert log.count("executed") == 1, log


async def test_crash_before_commit_rerun_commits_once(harness: Harness) -> None:
    engine = ScriptedEngine()
    harness.use(engine)
    run_id = await harness.start()
    name = (await harness.state(run_id)).run.protocol_name
    hook, calls = crash_once("before_commit")
    harness.ctx["crash_hook"] = hook

    with pytest.raises(Crash):
        await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    assert ("before_commit", run_id, 1) in calls
    assert step_commits(harness.origin, name, 1) == []

    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
    assert len(step_commits(harness.origin, name, 1)) == 1
    # nothing was committed, so the step ran again from a clean worktree
    assert execute_requests(engine, 1) == 2
    log = origin_file(harness.origin, name, f".protocols/{name}/log.md")
    assert log.count("executed") == 1, log


async def test_missing_worktree_is_rebuilt_from_the_pushed_branch(harness: Harness) -> None:
    run_id = await harness.start()
    state = await harness.state(run_id)
    worktree = Path(state.run.worktree_path)
    assert (worktree / ".protocols" / state.run.protocol_name / "plan.md").is_file()
    shutil.rmtree(worktree)

    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
    name = state.run.protocol_name
    assert (worktree / ".protocols" / name / "plan.md").is_file()
    assert step_commits(harness.origin, name, 1) == [
        "docs(record): Record the task [protocol-0001/01]"
    ]
    # the step commit sits on top of the plan commit that came back from the origin
    assert origin_log(harness.origin, name)[1].endswith("[protocol-0001/00]")


@pytest.mark.redis
async def test_two_workers_racing_one_wins_the_other_retries(
    tmp_path: Path, origin: Path, redis_url: str
) -> None:
    settings = protocol_settings(tmp_path)
    async with make_harness(settings, origin) as h:
        release = asyncio.Event()
        entered = asyncio.Event()

        class SlowEngine(ScriptedEngine):
            async def run(self, request: Any) -> Any:
                if request.phase == "execute":
                    entered.set()
                    await release.wait()
                return await super().run(request)

        engine = SlowEngine()
        h.use(engine)
        run_id = await h.start()
        name = (await h.state(run_id)).run.protocol_name

        shared = create_redis(settings.model_copy(update={"redis_url": redis_url}))
        other = create_redis(settings.model_copy(update={"redis_url": redis_url}))
        try:
            # two workers: same database, same Redis, each with its own connection
            a = {**h.ctx, "redis": shared}
            b = {**h.ctx, "redis": other}

            async def second() -> str:
                await entered.wait()  # A holds the lock and is inside the engine
                try:
                    return await execute_step(b, protocol_run_id=run_id, step_index=1)
                finally:
                    release.set()

            results = await asyncio.gather(
                execute_step(a, protocol_run_id=run_id, step_index=1),
                second(),
                return_exceptions=True,
            )
        finally:
            await shared.aclose(close_connection_pool=True)
            await other.aclose(close_connection_pool=True)
        assert results[0] == "needs_qa-run"
        assert isinstance(results[1], Retry), results[1]
        assert execute_requests(engine, 1) == 1
        assert len(step_commits(origin, name, 1)) == 1


@pytest.mark.redis
async def test_two_workers_started_together_exactly_one_runs(
    tmp_path: Path, origin: Path, redis_url: str
) -> None:
    """No choreography: both jobs start in the same loop tick."""
    settings = protocol_settings(tmp_path)
    async with make_harness(settings, origin) as h:
        engine = ScriptedEngine()
        h.use(engine)
        run_id = await h.start()
        name = (await h.state(run_id)).run.protocol_name
        clients = [create_redis(settings.model_copy(update={"redis_url": redis_url})) for _ in "ab"]
        try:
            results = await asyncio.gather(
                *(
                    execute_step({**h.ctx, "redis": c}, protocol_run_id=run_id, step_index=1)
                    for c in clients
                ),
                return_exceptions=True,
            )
        finally:
            for c in clients:
                await c.aclose(close_connection_pool=True)
        retries = [r for r in results if isinstance(r, Retry)]
        assert len(retries) == 1, results
        assert [r for r in results if not isinstance(r, Retry)] == ["needs_qa-run"]
        assert execute_requests(engine, 1) == 1
        assert len(step_commits(origin, name, 1)) == 1
