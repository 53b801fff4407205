"""Plans that are graphs: the ways out of a blocked protocol, the reclaim of lost queued steps,
the repository bound, and conflict markers an integration step leaves behind."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from bot import actions
from bot.actions import start_protocol
from bot.ci import apply_ci_result
from bot.models import Project
from engines.scripted import ScriptedEngine
from tests.protocol.conftest import Harness
from tests.protocol.parallel_support import DIAMOND, graph_script
from tests.protocol.test_protocol_parallel import _feed_ci


async def _blocked_by_red_ci(harness: Harness) -> tuple[int, str]:
    """A diamond whose every step is merged, blocked by red CI on the protocol branch."""
    async with harness.ctx["db"].sessions.begin() as session:
        await session.execute(update(Project).where(Project.id == harness.project.id).values(ci_provider="github-actions"))
    harness.project.ci_provider = "github-actions"
    harness.use(ScriptedEngine(graph_script(DIAMOND)))
    run = await start_protocol(harness.ctx, harness.project, "Build four parts", auto=True, approved=True)
    state = await _feed_ci(harness, run.id, "failure")
    assert state.run.status == "blocked", state.run.runtime_state
    red = state.run.runtime_state["ci_red"]
    assert red == state.run.head_sha
    assert "a green re-run of CI there, or /resume after it" in state.run.runtime_state["message"]
    return run.id, red


async def test_a_green_rerun_of_ci_on_the_blocked_head_completes_the_protocol(harness: Harness) -> None:
    run_id, red = await _blocked_by_red_ci(harness)
    # red again on a re-run: still blocked, with the same reason
    assert await apply_ci_result(harness.ctx, run_id, red, "failure", [("tests", "failure")]) == "blocked"
    assert (await harness.state(run_id)).run.status == "blocked"
    assert await apply_ci_result(harness.ctx, run_id, red, "success") == "complete"
    state = await harness.state(run_id)
    assert state.run.status == "completed", state.run.runtime_state
    assert "ci_red" not in state.run.runtime_state and "message" not in state.run.runtime_state
    # a late duplicate of the red result changes nothing any more
    await apply_ci_result(harness.ctx, run_id, red, "failure", [("tests", "failure")])
    assert (await harness.state(run_id)).run.status == "completed"


@pytest.mark.parametrize("command", ["resume", "retry"])
async def test_resume_or_retry_waits_for_ci_again_and_green_completes(harness: Harness, command: str) -> None:
    run_id, red = await _blocked_by_red_ci(harness)
    if command == "resume":
        await actions.resume(harness.ctx, run_id)
    else:
        assert await actions.retry(harness.ctx, run_id) == 0  # no step failed: the protocol's CI
    await harness.drain()
    state = await harness.state(run_id)
    assert state.run.status == "running", state.run.runtime_state
    assert state.run.runtime_state["awaiting_ci"] == red
    assert await apply_ci_result(harness.ctx, run_id, red, "success") == "complete"
    assert (await harness.state(run_id)).run.status == "completed"


async def test_red_again_after_resume_blocks_again(harness: Harness) -> None:
    run_id, red = await _blocked_by_red_ci(harness)
    await actions.resume(harness.ctx, run_id)
    assert await apply_ci_result(harness.ctx, run_id, red, "failure", [("lint", "failure")]) == "blocked"
    state = await harness.state(run_id)
    assert state.run.status == "blocked" and "(lint on" in state.run.runtime_state["message"]


async def test_a_queued_step_whose_job_is_lost_is_queued_again_by_the_reclaim_cron(harness: Harness) -> None:
    from bot.jobs.reclaim import lost_queued_steps, reclaim_expired
    from bot.jobs.schedule import queued
    from bot.runs import update_step

    harness.use(ScriptedEngine(graph_script(DIAMOND)))
    run_id = await harness.start("Build four parts")  # approved, not auto: steps run on command
    assert await actions.run_step(harness.ctx, run_id, None) == 1  # queued by the scheduler
    step = (await harness.state(run_id)).step(1)
    assert queued(step)
    job_id = step.runtime_state["queued_job"]
    redis = harness.ctx["redis"]
    assert await lost_queued_steps(harness.ctx, now=step.runtime_state["queued_at"] + 3600) == []  # still queued
    # the job is lost (a queue flushed, a worker that took it and died before marking the step)
    await redis.zrem("arq:queue", job_id)
    await redis.delete(f"arq:job:{job_id}")
    assert await lost_queued_steps(harness.ctx) == []  # within the grace: the scheduler may be enqueueing it
    assert (await lost_queued_steps(harness.ctx, now=step.runtime_state["queued_at"] + 3600))[0][:2] == (run_id, 1)
    # a step queued long ago: the reclaim cron queues it again, and it runs
    await update_step(harness.ctx["db"], step.id, runtime_state={**step.runtime_state, "queued_at": 0.0})
    assert await reclaim_expired(harness.ctx) == 1
    assert await reclaim_expired(harness.ctx) == 0  # its new job waits: not queued twice
    await harness.drain()
    state = await harness.state(run_id)
    assert state.step(1).status == "completed" and not queued(state.step(1))
    assert state.step(2).status == "pending"  # nothing else started on its own (not auto)


def test_marker_lines_finds_what_git_writes_and_not_headings() -> None:
    from bot.jobs.integrate import marker_lines

    text = "a\n<<<<<<< HEAD\nmine\n||||||| base\nold\n=======\ntheirs\n>>>>>>> step\nTitle\n========\n<<<<<<<x\n"
    assert marker_lines(text) == [2, 4, 6, 8]
    assert marker_lines("plain\ntext =======\n") == []


async def test_an_integration_step_that_leaves_conflict_markers_fails_and_commits_nothing(harness: Harness) -> None:
    from tests.gitutil import git
    from tests.protocol.parallel_support import TimedEngine, run_with_workers
    from tests.protocol.test_protocol_parallel import conflicting_script

    # the engine "resolves" by saying so, and leaves the conflicted file as the merge wrote it
    engine = TimedEngine(conflicting_script({"message": "resolved, trust me"}))
    harness.use(engine)
    run = await start_protocol(harness.ctx, harness.project, "Build four parts", auto=True, approved=True)
    state = await run_with_workers(harness, run.id, workers=2)
    assert state.run.status == "blocked", state.run.runtime_state
    integration = state.steps[4]
    assert integration.step_type == "integration" and integration.status == "failed"
    message = str(state.run.runtime_state["message"])
    assert "step 05 left conflict markers in shared.txt (line 1, " in message, message
    assert "nothing was committed" in message
    assert git("log", "--all", "--fixed-strings", "--grep=[protocol-0001/05]", cwd=harness.origin) == ""
    assert state.step(4).status == "pending" and "part-4" not in engine.spans
