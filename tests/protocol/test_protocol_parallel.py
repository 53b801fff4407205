"""Plans that are graphs: steps side by side on child branches, merged into the protocol branch."""

from __future__ import annotations

from typing import Any

from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs.actions import start_protocol
from engines.scripted import ScriptedEngine
from tests.gitutil import git
from tests.protocol.conftest import Harness, origin_branches, origin_file, origin_log
from tests.protocol.parallel_support import DIAMOND, TimedEngine, graph_script, run_with_workers


async def test_diamond_runs_02_and_03_side_by_side_on_two_workers(harness: Harness) -> None:
    engine = TimedEngine(graph_script(DIAMOND, delay_s=1.0))
    harness.use(engine)
    run = await start_protocol(
        harness.ctx, harness.project, "Build four parts", auto=True, approved=True
    )
    state = await run_with_workers(harness, run.id, workers=2)
    assert state.run.status == ProtocolStatus.COMPLETED, (state.run.status, state.run.runtime_state)
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED] * 4
    (s2, e2), (s3, e3) = engine.spans["part-2"], engine.spans["part-3"]
    assert s2 < e3 and s3 < e2, "02 and 03 did not overlap"
    s4 = engine.spans["part-4"][0]
    assert s4 > max(e2, e3) and engine.spans["part-1"][1] < min(
        s2, s3
    )  # never before its dependencies
    name = state.run.protocol_name
    for i in (1, 2, 3, 4):
        assert origin_file(harness.origin, name, f"part{i}.txt") == f"part {i}\n"
    # step 04 started from the integrated head: its own commit's parent has both 02 and 03
    sha4 = git(
        "log",
        "--format=%H",
        "--grep",
        "[protocol-0001/04]",
        "--fixed-strings",
        name,
        cwd=harness.origin,
    ).split()
    assert len(sha4) == 1
    tree = git("ls-tree", "--name-only", f"{sha4[0]}^", cwd=harness.origin).split()
    assert {"part2.txt", "part3.txt"} <= set(tree)
    subjects = origin_log(harness.origin, name)
    for i in (1, 2, 3, 4):
        assert sum(f"[protocol-0001/0{i}]" in s for s in subjects) == 1, (
            subjects
        )  # one commit per step
        assert sum(s.startswith(f"merge: step 0{i} ") for s in subjects) == 1, (
            subjects
        )  # and its merge
    merges = git("log", "--merges", "--format=%B", name, cwd=harness.origin)
    assert (
        "Protocol-Step: protocol-0001/02" in merges and "Protocol-Step: protocol-0001/03" in merges
    )
    # the child branches are gone once merged
    assert [b for b in origin_branches(harness.origin) if "--" in b] == []


async def test_a_linear_plan_keeps_one_branch(harness: Harness) -> None:
    harness.use(ScriptedEngine(graph_script([None, None, None])))
    run = await start_protocol(
        harness.ctx, harness.project, "Three parts", auto=True, approved=True
    )
    state = await run_with_workers(harness, run.id, workers=2)
    assert state.run.status == ProtocolStatus.COMPLETED
    subjects = origin_log(harness.origin, state.run.protocol_name)
    assert not any(s.startswith("merge:") for s in subjects)
    assert [b for b in origin_branches(harness.origin) if "--" in b] == []


def conflicting_script(resolve: dict[str, Any]) -> dict[str, Any]:
    """02 and 03 write the same file differently; the integration step (whichever of them is
    merged second) is answered by `resolve`."""
    shared = {
        f"part-{i}": {
            "message": f"part {i}",
            "delay_s": 0.3,
            "files": [{"path": "shared.txt", "content": f"from {i}\n"}],
        }
        for i in (2, 3)
    }
    return graph_script(DIAMOND, 0.0, {**shared, **{f"integrate-0{i}": resolve for i in (2, 3)}})


async def test_a_conflict_becomes_an_integration_step_that_resolves_it(harness: Harness) -> None:
    resolve = {
        "message": "resolved",
        "files": [{"path": "shared.txt", "content": "from 2 and 3\n"}],
    }
    engine = TimedEngine(conflicting_script(resolve))
    harness.use(engine)
    run = await start_protocol(
        harness.ctx, harness.project, "Build four parts", auto=True, approved=True
    )
    state = await run_with_workers(harness, run.id, workers=2)
    assert state.run.status == ProtocolStatus.COMPLETED, (state.run.status, state.run.runtime_state)
    assert len(state.steps) == 5 and state.steps[4].step_type == "integration"
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED] * 5
    conflict = [e for e in await harness.events(run.id, "step.conflict")]
    assert len(conflict) == 1 and "shared.txt" in conflict[0].message
    [integration] = [
        r for r in engine.requests if str(r.context.get("slug", "")).startswith("integrate-")
    ]
    prompt = integration.prompt
    # the engine is told both steps' intents and where they collide
    assert (
        "Integrate step" in prompt
        and "## Step 02" in prompt
        and "## Step 03" in prompt
        and "shared.txt" in prompt
    )
    name = state.run.protocol_name
    assert origin_file(harness.origin, name, "shared.txt") == "from 2 and 3\n"
    sha4 = git(
        "log",
        "--format=%H",
        "--fixed-strings",
        "--grep",
        "[protocol-0001/04]",
        name,
        cwd=harness.origin,
    ).split()
    assert git("show", f"{sha4[0]}^:shared.txt", cwd=harness.origin) == "from 2 and 3\n"
    assert engine.spans["part-4"][0] > engine.spans[state.steps[4].step_name.split("-", 1)[1]][1]
    assert [b for b in origin_branches(harness.origin) if "--" in b] == []


async def test_an_unresolved_conflict_blocks_the_protocol_and_04_never_starts(
    harness: Harness,
) -> None:
    engine = TimedEngine(conflicting_script({"fail": "the two versions cannot both hold"}))
    harness.use(engine)
    run = await start_protocol(
        harness.ctx, harness.project, "Build four parts", auto=True, approved=True
    )
    state = await run_with_workers(harness, run.id, workers=2)
    assert state.run.status == ProtocolStatus.BLOCKED
    integration = state.steps[4]
    assert integration.status == StepStatus.FAILED and integration.summary.startswith(
        "Integrate step 0"
    )
    assert "the two versions cannot both hold" in str(state.run.runtime_state.get("message"))
    assert state.step(4).status == StepStatus.PENDING and "part-4" not in engine.spans


async def test_cancel_stops_every_running_step_and_pushes_nothing(harness: Harness) -> None:
    import asyncio
    import contextlib

    from bot.jobs import actions
    from bot.jobs.worker import build_worker

    engine = TimedEngine(
        graph_script(
            DIAMOND,
            delay_s=20.0,
            execute_steps={"part-1": {"files": [{"path": "part1.txt", "content": "1\n"}]}},
        )
    )
    harness.use(engine)
    run = await start_protocol(
        harness.ctx, harness.project, "Build four parts", auto=True, approved=True
    )
    worker = build_worker(harness.ctx["settings"], ctx=harness.ctx)
    task = asyncio.create_task(worker.async_run())
    try:
        for _ in range(300):
            state = await harness.state(run.id)
            if [s.status for s in state.steps][1:3] == [
                StepStatus.RUNNING,
                StepStatus.RUNNING,
            ] and len(engine.starts) >= 3:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("02 and 03 never ran side by side")
        stopped_at = asyncio.get_running_loop().time()
        await actions.cancel(harness.ctx, run.id, by="alice")
        for _ in range(100):
            events = await harness.events(run.id, "step.stopped")
            if len(events) >= 2:
                break
            await asyncio.sleep(0.1)
        assert asyncio.get_running_loop().time() - stopped_at < 10  # not the engine's 20 s
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    state = await harness.state(run.id)
    assert state.run.status == ProtocolStatus.CANCELLED
    assert [s.status for s in state.steps] == [
        StepStatus.COMPLETED,
        StepStatus.CANCELLED,
        StepStatus.CANCELLED,
        StepStatus.CANCELLED,
    ]
    for i in (2, 3):  # nothing of the stopped steps reached the forge
        assert (
            git(
                "log",
                "--all",
                "--fixed-strings",
                f"--grep=[protocol-0001/0{i}]",
                cwd=harness.origin,
            )
            == ""
        )


async def _feed_ci(harness: Harness, run_id: int, protocol_result: str) -> Any:
    """Green CI on each step's child-branch commit as it waits, then `protocol_result` on the
    protocol branch once every step is merged; the final state."""
    from bot.jobs.ci import apply_ci_result

    for _ in range(40):
        await harness.drain()
        state = await harness.state(run_id)
        awaiting = (state.run.runtime_state or {}).get("awaiting_ci")
        if awaiting:
            await apply_ci_result(
                harness.ctx,
                run_id,
                awaiting,
                protocol_result,  # type: ignore[arg-type]
                [("tests", "failure")],
            )
            await harness.drain()
            return await harness.state(run_id)
        waiting = [
            s
            for s in state.steps
            if s.status == StepStatus.NEEDS_QA and (s.runtime_state or {}).get("commit_sha")
        ]
        for s in waiting:
            await apply_ci_result(harness.ctx, run_id, s.runtime_state["commit_sha"], "success")
    raise AssertionError("the protocol never waited for CI on its branch")


async def test_ci_gates_each_step_on_its_branch_and_completion_on_the_protocol_branch(
    harness: Harness,
) -> None:
    from sqlalchemy import update

    from bot.storage.models import Project

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
    state = await _feed_ci(harness, run.id, "success")
    assert state.run.status == ProtocolStatus.COMPLETED, state.run.runtime_state
    events = [e.event_type for e in await harness.events(run.id)]
    assert events.index("protocol.awaiting_ci") < events.index("protocol.completed")


async def test_red_ci_on_the_protocol_branch_after_the_merges_blocks_it(harness: Harness) -> None:
    from sqlalchemy import update

    from bot.storage.models import Project

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
    assert state.run.status == ProtocolStatus.BLOCKED
    assert (
        "CI failed on the protocol branch after the steps were merged (tests"
        in state.run.runtime_state["message"]
    )


async def test_run_step_names_the_missing_dependencies_and_next_starts_every_ready_step(
    harness: Harness,
) -> None:
    import pytest

    from bot.core.errors import DependenciesPending
    from bot.jobs import actions

    harness.use(ScriptedEngine(graph_script(DIAMOND)))
    run_id = await harness.start("Build four parts")  # approved, not auto: steps run on command
    with pytest.raises(DependenciesPending) as info:
        await actions.run_step(harness.ctx, run_id, 4)
    assert str(info.value) == "step 04 waits for steps 02, 03 (not completed yet)"
    assert await actions.run_step(harness.ctx, run_id, None) == 1  # next: the only ready step
    await harness.drain()
    with pytest.raises(DependenciesPending, match="step 04 waits for steps 02, 03"):
        await actions.run_step(harness.ctx, run_id, 4)
    await actions.run_step(harness.ctx, run_id, None)  # next: 02 and 03 together
    state = await harness.state(run_id)
    assert [bool((s.runtime_state or {}).get("queued_attempt") == 0) for s in state.steps] == [
        True,
        True,
        True,
        False,
    ]
    await harness.drain()
    assert await actions.run_step(harness.ctx, run_id, 4) == 4
    await harness.drain()
    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.COMPLETED, state.run.runtime_state


async def test_the_bound_keeps_02_and_03_apart(tmp_path: Any, origin: Any) -> None:
    from tests.protocol.conftest import make_harness, protocol_settings

    async with make_harness(protocol_settings(tmp_path, max_parallel_steps=1), origin) as h:
        engine = TimedEngine(graph_script(DIAMOND, delay_s=0.5))
        h.use(engine)
        run = await start_protocol(h.ctx, h.project, "Build four parts", auto=True, approved=True)
        state = await run_with_workers(h, run.id, workers=2)
        assert state.run.status == ProtocolStatus.COMPLETED
        (s2, e2), (s3, e3) = engine.spans["part-2"], engine.spans["part-3"]
        assert e2 <= s3 or e3 <= s2, "two steps ran at once under max_parallel_steps=1"


async def test_a_rejected_merge_push_blocks_the_protocol_with_the_reason(harness: Harness) -> None:
    import stat

    harness.use(ScriptedEngine(graph_script(DIAMOND)))
    hook = harness.origin / "hooks" / "pre-receive"
    # the forge refuses merge commits on the protocol branch (a protected branch, say)
    hook.write_text(
        "#!/bin/sh\nwhile read old new ref; do\n"
        '  case "$ref" in *--*) continue;; esac\n'
        '  if [ "$(git rev-list --parents -n1 "$new" | wc -w)" -gt 2 ]; '
        'then echo "merge commits refused" >&2; exit 1; fi\n'
        "done\n"
    )
    hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    run = await start_protocol(
        harness.ctx, harness.project, "Build four parts", auto=True, approved=True
    )
    await harness.drain()
    state = await harness.state(run.id)
    assert state.run.status == ProtocolStatus.BLOCKED
    message = str(state.run.runtime_state["message"])
    assert message.startswith("merging step 01 into the protocol branch failed: git push failed"), (
        message
    )
    assert [s.status for s in state.steps] == [
        StepStatus.COMPLETED,
        StepStatus.PENDING,
        StepStatus.PENDING,
        StepStatus.PENDING,
    ]


async def test_a_cycle_or_an_unknown_id_is_rejected_at_planning(harness: Harness) -> None:
    for deps, error in (
        ([None, [3], [2]], "$.steps[1].depends_on: dependency cycle 2 → 3 → 2"),
        ([None, [9]], "$.steps[1].depends_on[0]: no step with id 9"),
    ):
        harness.use(ScriptedEngine(graph_script(deps)))
        run_id = await harness.start("Build parts")
        state = await harness.state(run_id)
        assert state.run.status == ProtocolStatus.FAILED, state.run.status
        assert error in str(state.run.runtime_state), state.run.runtime_state
        assert state.steps == []  # nothing was planned
