"""Plans that are graphs: the ways out of a blocked protocol, the reclaim of lost queued steps,
the repository bound, and conflict markers an integration step leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from sqlalchemy import update

from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs import actions
from bot.jobs.actions import start_protocol
from bot.jobs.ci import apply_ci_result
from bot.storage.models import Project
from engines.scripted import ScriptedEngine
from tests.protocol.conftest import Harness
from tests.protocol.parallel_support import DIAMOND, graph_script
from tests.protocol.test_protocol_parallel import _feed_ci


async def _blocked_by_red_ci(harness: Harness) -> tuple[int, str]:
    """A diamond whose every step is merged, blocked by red CI on the protocol branch."""
    async with harness.ctx["db"].sessions.begin() as session:
        await session.execute(
            update(Project)
            .where(Project.id == harness.project.id)
            .values(ci_provider="github-actions")
        )
    harness.project.ci_provider = "github-actions"
    harness.use(ScriptedEngine(graph_script(DIAMOND)))
    run = await start_protocol(
        harness.ctx, harness.project, "Build four parts", auto=True, approved=True
    )
    state = await _feed_ci(harness, run.id, "failure")
    assert state.run.status == ProtocolStatus.BLOCKED, state.run.runtime_state
    red = state.run.runtime_state["ci_red"]
    assert red == state.run.head_sha
    assert "a green re-run of CI there, or /resume after it" in state.run.runtime_state["message"]
    return run.id, red


async def test_a_green_rerun_of_ci_on_the_blocked_head_completes_the_protocol(
    harness: Harness,
) -> None:
    run_id, red = await _blocked_by_red_ci(harness)
    # red again on a re-run: still blocked, with the same reason
    assert (
        await apply_ci_result(harness.ctx, run_id, red, "failure", [("tests", "failure")])
        == "blocked"
    )
    assert (await harness.state(run_id)).run.status == ProtocolStatus.BLOCKED
    assert await apply_ci_result(harness.ctx, run_id, red, "success") == "complete"
    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.COMPLETED, state.run.runtime_state
    assert "ci_red" not in state.run.runtime_state and "message" not in state.run.runtime_state
    # a late duplicate of the red result changes nothing any more
    await apply_ci_result(harness.ctx, run_id, red, "failure", [("tests", "failure")])
    assert (await harness.state(run_id)).run.status == ProtocolStatus.COMPLETED


@pytest.mark.parametrize("command", ["resume", "retry"])
async def test_resume_or_retry_waits_for_ci_again_and_green_completes(
    harness: Harness, command: str
) -> None:
    run_id, red = await _blocked_by_red_ci(harness)
    if command == "resume":
        await actions.resume(harness.ctx, run_id)
    else:
        assert await actions.retry(harness.ctx, run_id) == 0  # no step failed: the protocol's CI
    await harness.drain()
    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.RUNNING, state.run.runtime_state
    assert state.run.runtime_state["awaiting_ci"] == red
    assert await apply_ci_result(harness.ctx, run_id, red, "success") == "complete"
    assert (await harness.state(run_id)).run.status == ProtocolStatus.COMPLETED


async def test_red_again_after_resume_blocks_again(harness: Harness) -> None:
    run_id, red = await _blocked_by_red_ci(harness)
    await actions.resume(harness.ctx, run_id)
    assert (
        await apply_ci_result(harness.ctx, run_id, red, "failure", [("lint", "failure")])
        == "blocked"
    )
    state = await harness.state(run_id)
    assert (
        state.run.status == ProtocolStatus.BLOCKED
        and "(lint on" in state.run.runtime_state["message"]
    )


async def test_a_queued_step_whose_job_is_lost_is_queued_again_by_the_reclaim_cron(
    harness: Harness,
) -> None:
    from bot.jobs.reclaim import lost_queued_steps, reclaim_expired
    from bot.jobs.schedule import queued
    from bot.storage.runs import update_step

    harness.use(ScriptedEngine(graph_script(DIAMOND)))
    run_id = await harness.start("Build four parts")  # approved, not auto: steps run on command
    assert await actions.run_step(harness.ctx, run_id, None) == 1  # queued by the scheduler
    step = (await harness.state(run_id)).step(1)
    assert queued(step)
    job_id = step.runtime_state["queued_job"]
    redis = harness.ctx["redis"]
    assert (
        await lost_queued_steps(harness.ctx, now=step.runtime_state["queued_at"] + 3600) == []
    )  # still queued
    # the job is lost (a queue flushed, a worker that took it and died before marking the step)
    await redis.zrem("arq:queue", job_id)
    await redis.delete(f"arq:job:{job_id}")
    assert (
        await lost_queued_steps(harness.ctx) == []
    )  # within the grace: the scheduler may be enqueueing it
    assert (await lost_queued_steps(harness.ctx, now=step.runtime_state["queued_at"] + 3600))[0][
        :2
    ] == (run_id, 1)
    # a step queued long ago: the reclaim cron queues it again, and it runs
    await update_step(
        harness.ctx["db"], step.id, runtime_state={**step.runtime_state, "queued_at": 0.0}
    )
    assert await reclaim_expired(harness.ctx) == 1
    assert await reclaim_expired(harness.ctx) == 0  # its new job waits: not queued twice
    await harness.drain()
    state = await harness.state(run_id)
    assert state.step(1).status == StepStatus.COMPLETED and not queued(state.step(1))
    assert state.step(2).status == StepStatus.PENDING  # nothing else started on its own (not auto)


def test_marker_lines_finds_what_git_writes_and_not_headings() -> None:
    from bot.jobs.integrate import marker_lines

    text = (
        "a\n<<<<<<< HEAD\nmine\n||||||| base\nold\n=======\ntheirs\n>>>>>>> step\n"
        "Title\n========\n<<<<<<<x\n"
    )
    assert marker_lines(text) == [2, 4, 6, 8]
    assert marker_lines("plain\ntext =======\n") == []


async def test_an_integration_step_that_leaves_conflict_markers_fails_and_commits_nothing(
    harness: Harness,
) -> None:
    from tests.gitutil import git
    from tests.protocol.parallel_support import TimedEngine, run_with_workers
    from tests.protocol.test_protocol_parallel import conflicting_script

    # the engine "resolves" by saying so, and leaves the conflicted file as the merge wrote it
    engine = TimedEngine(conflicting_script({"message": "resolved, trust me"}))
    harness.use(engine)
    run = await start_protocol(
        harness.ctx, harness.project, "Build four parts", auto=True, approved=True
    )
    state = await run_with_workers(harness, run.id, workers=2)
    assert state.run.status == ProtocolStatus.BLOCKED, state.run.runtime_state
    integration = state.steps[4]
    assert integration.step_type == "integration" and integration.status == StepStatus.FAILED
    message = str(state.run.runtime_state["message"])
    assert "step 05 left conflict markers in shared.txt (line 1, " in message, message
    assert "nothing was committed" in message
    assert (
        git("log", "--all", "--fixed-strings", "--grep=[protocol-0001/05]", cwd=harness.origin)
        == ""
    )
    assert state.step(4).status == StepStatus.PENDING and "part-4" not in engine.spans


class SpanEngine(ScriptedEngine):
    """The scripted engine, noting every execute call's (start, end), whichever protocol's."""

    def __init__(self, script: dict[str, Any]) -> None:
        super().__init__(script)
        self.intervals: list[tuple[float, float]] = []

    async def run(self, request: Any) -> Any:
        start = time.monotonic()
        result = await super().run(request)
        if request.phase == "execute":
            self.intervals.append((start, time.monotonic()))
        return result


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = top = 0
    for _, delta in edges:  # an end sorts before a start at the same instant
        now += delta
        top = max(top, now)
    return top


async def test_the_repository_bound_holds_over_two_protocols(tmp_path: Any, origin: Any) -> None:
    from bot.jobs.worker import build_worker
    from tests.protocol.conftest import make_harness, protocol_settings

    settings = protocol_settings(
        tmp_path, max_parallel_steps=3, max_parallel_steps_per_repo=2, worker_max_jobs=1
    )
    async with make_harness(settings, origin) as h:
        engine = SpanEngine(graph_script(DIAMOND, delay_s=0.6))
        h.use(engine)
        runs = [
            await start_protocol(
                h.ctx, h.project, f"Build four parts {n}", auto=True, approved=True
            )
            for n in ("a", "b")
        ]
        workers = [
            build_worker(settings, ctx=h.ctx) for _ in range(4)
        ]  # room for 4 engines at once
        tasks = [asyncio.create_task(w.async_run()) for w in workers]
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = [await h.state(r.id) for r in runs]
                if all(
                    s.run.status
                    in (ProtocolStatus.COMPLETED, ProtocolStatus.BLOCKED, ProtocolStatus.FAILED)
                    for s in states
                ):
                    break
                await asyncio.sleep(0.1)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        states = [await h.state(r.id) for r in runs]
        assert [s.run.status for s in states] == [
            ProtocolStatus.COMPLETED,
            ProtocolStatus.COMPLETED,
        ], [s.run.runtime_state for s in states]
        assert len(engine.intervals) == 8
        # each diamond alone runs 02 and 03 at once (2 + 2 = 4 possible): the repository holds 2
        assert most_at_once(engine.intervals) == 2, engine.intervals


async def test_a_protocol_without_a_slot_waits_and_the_cron_starts_it_once_one_frees(
    tmp_path: Any, origin: Any
) -> None:
    from bot.jobs.env import JobEnv
    from bot.jobs.reclaim import reclaim_expired
    from bot.jobs.schedule import bound, schedule_ready, stalled
    from bot.storage.runs import update_run
    from tests.protocol.conftest import make_harness, protocol_settings

    async with make_harness(
        protocol_settings(tmp_path, max_parallel_steps_per_repo=1), origin
    ) as h:
        h.use(ScriptedEngine(graph_script(DIAMOND)))
        first = await h.start("Build four parts a")  # planned and approved; steps on command
        second = await h.start("Build four parts b")
        env = JobEnv.from_ctx(h.ctx)
        assert await actions.run_step(h.ctx, first, None) == 1  # 01 of the first takes the one slot
        await update_run(h.ctx["db"], second, auto_mode=True)
        b = await h.state(second)
        assert await bound(env, b) == 0
        assert await schedule_ready(h.ctx, second) == []  # no slot: it waits
        assert await stalled(env) == [second]
        # the slot frees without waking anybody (a cancel); the cron's sweep starts the waiting one
        await actions.cancel(h.ctx, first, by="alice")
        assert await reclaim_expired(h.ctx) == 1
        assert await stalled(env) == []
        await h.drain()
        assert (await h.state(second)).run.status == ProtocolStatus.COMPLETED
        assert (await h.state(first)).run.status == ProtocolStatus.CANCELLED


async def test_resume_after_a_fix_pushed_onto_the_protocol_branch_waits_for_ci_on_the_new_head(
    harness: Harness, tmp_path: Any
) -> None:
    from tests.gitutil import git

    run_id, red = await _blocked_by_red_ci(harness)
    name = (await harness.state(run_id)).run.protocol_name
    clone = tmp_path / "human"
    git("clone", "-q", "-b", name, str(harness.origin), str(clone), cwd=tmp_path)
    (clone / "fix.txt").write_text("the fix\n")
    git("add", "fix.txt", cwd=clone)
    git("commit", "-q", "-m", "fix the red CI", cwd=clone)
    git("push", "-q", "origin", name, cwd=clone)
    fixed = git("rev-parse", "HEAD", cwd=clone).strip()
    await actions.resume(harness.ctx, run_id)
    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.RUNNING and state.run.head_sha == fixed
    assert state.run.runtime_state["awaiting_ci"] == fixed
    assert await apply_ci_result(harness.ctx, run_id, red, "success") != "complete"  # the old head
    assert await apply_ci_result(harness.ctx, run_id, fixed, "success") == "complete"
    assert (await harness.state(run_id)).run.status == ProtocolStatus.COMPLETED


async def test_a_rewritten_protocol_branch_without_the_merges_is_not_adopted(
    harness: Harness, tmp_path: Any
) -> None:
    from tests.gitutil import git

    run_id, red = await _blocked_by_red_ci(harness)
    name = (await harness.state(run_id)).run.protocol_name
    clone = tmp_path / "rewrite"
    git("clone", "-q", "-b", name, str(harness.origin), str(clone), cwd=tmp_path)
    git("reset", "-q", "--hard", "HEAD~1", cwd=clone)  # drops the last merge
    (clone / "other.txt").write_text("x\n")
    git("add", "other.txt", cwd=clone)
    git("commit", "-q", "-m", "rewrite", cwd=clone)
    git("push", "-q", "--force", "origin", name, cwd=clone)
    await actions.resume(harness.ctx, run_id)
    state = await harness.state(run_id)
    assert state.run.head_sha == red and state.run.runtime_state["awaiting_ci"] == red


async def test_two_protocols_scheduling_at_once_share_the_repository_bound(
    tmp_path: Any, origin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each protocol schedules under its own integration lock: were the repository's slots
    counted outside one shared lock, two protocols counting at the same moment would each see
    the other's slots free and both start (seen once in CI: four steps at once under a bound
    of two). Here both counts are slowed so that they overlap: only one protocol may start."""
    from bot.jobs import schedule
    from bot.storage.runs import update_run
    from tests.protocol.conftest import make_harness, protocol_settings

    settings = protocol_settings(tmp_path, max_parallel_steps=3, max_parallel_steps_per_repo=1)
    async with make_harness(settings, origin) as h:
        h.use(ScriptedEngine(graph_script(DIAMOND)))
        ids = [await h.start(f"Build four parts {n}", approved=False) for n in ("a", "b")]
        assert [(await h.state(i)).run.status for i in ids] == [ProtocolStatus.PLANNED] * 2
        for run_id in ids:
            await update_run(h.ctx["db"], run_id, approved=True, auto_mode=True)
        counted = schedule.held_elsewhere

        async def slow_count(env: Any, project_id: int, run_id: int | None) -> int:
            held = await counted(env, project_id, run_id)
            await asyncio.sleep(0.3)  # the other protocol counts meanwhile, if it can
            return held

        monkeypatch.setattr(schedule, "held_elsewhere", slow_count)
        started = await asyncio.gather(*(schedule.schedule_ready(h.ctx, i) for i in ids))
        assert sorted(len(s) for s in started) == [0, 1], started
        queued = [s for i in ids for s in (await h.state(i)).steps if schedule.queued(s)]
        assert len(queued) == 1
