"""Planning repair, QA verdicts, token budgets, loop bounds and prompt overrides, via the jobs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from bot.domain.spec import LoopSpec, spec_to_dict, validate_spec
from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs.steps import execute_step, run_quality
from bot.storage.runs import update_run
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.protocol.conftest import (
    Harness,
    commit_to_origin,
    make_harness,
    one_step_planning,
    origin_file,
    origin_log,
    protocol_settings,
    scripted_script,
)

# -- planning -----------------------------------------------------------------------------


async def test_invalid_plan_gets_one_repair_turn_then_plans(harness: Harness) -> None:
    engine = ScriptedEngine(scripted_script(planning={"invalid_first": True}))
    harness.use(engine)
    run_id = await harness.start()

    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.PLANNED
    planning = [r for r in engine.requests if r.phase == "planning"]
    assert len(planning) == 2
    first, repair = planning
    assert first.resume_thread_id is None and first.sandbox == "read-only"
    assert first.output_schema is not None
    # the repair resumes the same thread, shows the schema errors and keeps the schema
    assert repair.resume_thread_id == "scripted-1"
    assert "did not validate" in repair.prompt and "steps" in repair.prompt
    assert repair.output_schema == first.output_schema
    assert repair.previous_usage is not None
    types = await harness.event_types(run_id)
    assert "planning.repair" in types and "planning.invalid" not in types
    (repair_event,) = await harness.events(run_id, "planning.repair")
    assert repair_event.metadata_["errors"]


async def test_plan_still_invalid_after_repair_fails_with_the_errors(harness: Harness) -> None:
    engine = ScriptedEngine(
        scripted_script(
            planning={"invalid_first": 2, "invalid_reply": '{"title": "no steps at all"}'}
        )
    )
    harness.use(engine)
    run_id = await harness.start()

    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.FAILED
    assert state.steps == []
    rs = state.run.runtime_state
    assert rs["errors"], rs
    assert any("steps" in e for e in rs["errors"]), rs["errors"]
    (invalid,) = await harness.events(run_id, "planning.invalid")
    assert invalid.metadata_["errors"] == rs["errors"]
    # exactly one repair turn, no third planning call
    assert [r.resume_thread_id is not None for r in engine.requests if r.phase == "planning"] == [
        False,
        True,
    ]
    assert state.run.protocol_name not in origin_log(harness.origin, "main")


async def test_planning_engine_failure_fails_the_protocol(harness: Harness) -> None:
    harness.use(ScriptedEngine(scripted_script(planning={"fail": "model unreachable"})))
    run_id = await harness.start()
    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.FAILED
    assert "model unreachable" in state.run.runtime_state["message"]


# -- QA -----------------------------------------------------------------------------------


class NoVerdictQA(ScriptedEngine):
    """The scripted engine, except that QA answers prose without a VERDICT line."""

    def __init__(self, reply: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.reply = reply

    async def run(self, request: EngineRequest) -> EngineResult:
        result = await super().run(request)
        if request.phase == "qa":
            result.final_message = self.reply
        return result


@pytest.mark.parametrize(
    "reply",
    [
        "Everything looks fine to me.",
        "My verdict would be PASS if the tests had run.\nVERDICT: PASS?",
        "verdict - pass",
    ],
)
async def test_qa_without_a_verdict_is_a_fail(harness: Harness, reply: str) -> None:
    harness.use(NoVerdictQA(reply, script=scripted_script(planning=one_step_planning())))
    run_id = await harness.start()
    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
    await harness.drain()

    state = await harness.state(run_id)
    step = state.step(1)
    assert step.runtime_state["qa_verdict"] == "FAIL"
    assert step.status == StepStatus.FAILED
    assert state.run.status == ProtocolStatus.BLOCKED
    # the planned step's default loop redid it twice, each time with the report as feedback
    assert "used all 2 loop iterations" in state.run.runtime_state["message"]
    name = state.run.protocol_name
    assert "test(qa): quality report for step 01: FAIL [protocol-0001/01-qa]" in origin_log(
        harness.origin, name
    )
    assert reply.strip() in origin_file(
        harness.origin, name, f".protocols/{name}/quality-report.md"
    )
    verdicts = await harness.events(run_id, "qa.verdict")
    assert [v.metadata_["verdict"] for v in verdicts] == ["FAIL"] * 3


async def test_qa_verdict_is_the_last_verdict_line(harness: Harness) -> None:
    harness.use(
        NoVerdictQA(
            "VERDICT: FAIL\nFixed after a second look.\nVERDICT: PASS\n",
            script=scripted_script(planning=one_step_planning()),
        )
    )
    run_id = await harness.start()
    await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    await harness.drain()
    state = await harness.state(run_id)
    assert state.step(1).runtime_state["qa_verdict"] == "PASS"
    assert state.run.status == ProtocolStatus.COMPLETED


async def test_qa_job_on_a_step_not_waiting_for_qa_is_refused(harness: Harness) -> None:
    run_id = await harness.start()
    assert await run_quality(harness.ctx, protocol_run_id=run_id, step_index=1) == "skipped-pending"
    assert "qa.refused" in await harness.event_types(run_id)


# -- budgets ------------------------------------------------------------------------------
# The scripted engine bills 150 tokens (100 in + 50 out) per call: planning + 2 decompose
# calls = 450 before any step runs; a step's execute call is 150.


def budget_harness(tmp_path: Path, origin: Path, **settings: Any) -> Any:
    return make_harness(protocol_settings(tmp_path, **settings), origin)


async def test_strict_protocol_budget_refuses_the_step_and_blocks(
    tmp_path: Path, origin: Path
) -> None:
    async with budget_harness(
        tmp_path, origin, max_tokens_per_protocol=400, token_budget_mode="strict"
    ) as h:
        engine = ScriptedEngine()
        h.use(engine)
        run_id = await h.start()
        assert (await h.state(run_id)).run.tokens_used == 450
        assert await execute_step(h.ctx, protocol_run_id=run_id, step_index=1) == "budget-blocked"
        state = await h.state(run_id)
        assert state.run.status == ProtocolStatus.BLOCKED
        assert state.run.runtime_state["message"] == (
            "protocol used 450 of its 400 token budget; blocking"
        )
        assert state.step(1).status == StepStatus.PENDING
        assert not [r for r in engine.requests if r.phase == "execute"]
        assert "budget.warning" not in await h.event_types(run_id)


async def test_strict_step_budget_blocks_the_step(tmp_path: Path, origin: Path) -> None:
    async with budget_harness(
        tmp_path, origin, max_tokens_per_step=100, token_budget_mode="strict"
    ) as h:
        h.use(ScriptedEngine())
        run_id = await h.start()
        assert await execute_step(h.ctx, protocol_run_id=run_id, step_index=1) == "budget-blocked"
        state = await h.state(run_id)
        assert state.step(1).status == StepStatus.BLOCKED
        assert state.step(1).tokens_used == 150
        assert state.run.status == ProtocolStatus.BLOCKED
        assert "over its budget of 100" in state.run.runtime_state["message"]
        # the work itself was committed and pushed; only the gate is closed
        assert any("[protocol-0001/01]" in s for s in origin_log(origin, state.run.protocol_name))


async def test_warn_mode_records_warnings_and_continues(tmp_path: Path, origin: Path) -> None:
    async with budget_harness(
        tmp_path,
        origin,
        max_tokens_per_protocol=400,
        max_tokens_per_step=100,
        token_budget_mode="warn",
    ) as h:
        h.use(ScriptedEngine())
        run_id = await h.start()
        assert await execute_step(h.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
        await h.drain()
        state = await h.state(run_id)
        assert state.step(1).status == StepStatus.COMPLETED
        assert state.run.status == ProtocolStatus.RUNNING
        warnings = [e.message for e in await h.events(run_id, "budget.warning")]
        assert any("protocol used 450 of its 400" in w for w in warnings), warnings
        assert any("over its budget of 100" in w for w in warnings), warnings


async def test_off_mode_ignores_budgets(tmp_path: Path, origin: Path) -> None:
    async with budget_harness(
        tmp_path, origin, max_tokens_per_protocol=1, max_tokens_per_step=1, token_budget_mode="off"
    ) as h:
        h.use(ScriptedEngine())
        run_id = await h.start()
        assert await execute_step(h.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
        await h.drain()
        assert (await h.state(run_id)).step(1).status == StepStatus.COMPLETED
        assert "budget.warning" not in await h.event_types(run_id)


# -- loop policy --------------------------------------------------------------------------


async def set_loop(h: Harness, run_id: int, step_index: int, loop: LoopSpec) -> None:
    """Planning output has no loop field: put the policy on the stored spec, like an operator."""
    state = await h.state(run_id)
    spec = validate_spec(state.run.template_config)
    steps = tuple(
        dataclasses.replace(s, loop=loop) if s.index == step_index else s for s in spec.steps
    )
    await update_run(
        h.ctx["db"], run_id, template_config=spec_to_dict(dataclasses.replace(spec, steps=steps))
    )


@pytest.mark.parametrize("bound", [1, 2])
async def test_loop_bound_reached_blocks_the_protocol(harness: Harness, bound: int) -> None:
    engine = ScriptedEngine(
        scripted_script(planning=one_step_planning(), qa={"default": {"verdicts": ["FAIL"]}})
    )
    harness.use(engine)
    run_id = await harness.start()
    await set_loop(harness, run_id, 1, LoopSpec(max_iterations=bound, back_to=1))

    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
    await harness.drain()  # QA FAIL → loop → execute → QA FAIL … until the bound

    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.BLOCKED
    assert state.run.runtime_state["loop_counts"] == {"1": bound}
    assert f"used all {bound} loop iterations" in state.run.runtime_state["message"]
    step = state.step(1)
    assert step.status == StepStatus.FAILED
    assert step.retries == bound
    # the step really ran again each time (a fresh engine call and a fresh commit)
    executes = [r for r in engine.requests if r.phase == "execute"]
    assert len(executes) == bound + 1
    assert [r.context["attempt"] for r in executes] == list(range(1, bound + 2))
    # the later attempts were shown the failing QA report
    assert all("Quality report" in r.prompt for r in executes[1:])
    assert len([r for r in engine.requests if r.phase == "qa"]) == bound + 1
    subjects = origin_log(harness.origin, state.run.protocol_name)
    assert len([s for s in subjects if s.endswith("[protocol-0001/01]")]) == bound + 1
    # identical FAIL reports make no new commit; every verdict is an event
    assert [s for s in subjects if s.endswith("[protocol-0001/01-qa]")]
    verdicts = [e.metadata_["verdict"] for e in await harness.events(run_id, "qa.verdict")]
    assert verdicts == ["FAIL"] * (bound + 1)


async def test_loop_passes_on_a_later_attempt(harness: Harness) -> None:
    engine = ScriptedEngine(
        scripted_script(
            planning=one_step_planning(), qa={"default": {"verdicts": ["FAIL", "PASS"]}}
        )
    )
    harness.use(engine)
    run_id = await harness.start()
    await set_loop(harness, run_id, 1, LoopSpec(max_iterations=3, back_to=1))
    await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    await harness.drain()
    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.COMPLETED
    assert state.run.runtime_state["loop_counts"] == {"1": 1}
    assert len([r for r in engine.requests if r.phase == "execute"]) == 2
    assert state.step(1).runtime_state["qa_attempts"] == 2


# -- prompt overrides ---------------------------------------------------------------------

OVERRIDE = "OVERRIDE-FROM-BASE-7731: step $step_index, $step_title\n"
BRANCH_ONLY = "OVERRIDE-FROM-PROTOCOL-BRANCH-9913: $step_title\n"


async def test_prompt_override_comes_from_the_base_branch_only(harness: Harness) -> None:
    commit_to_origin(
        harness.origin,
        "main",
        {".deksdenflow/prompts/execute-step.md": OVERRIDE},
        "custom execute prompt",
    )
    engine = ScriptedEngine()
    harness.use(engine)
    run_id = await harness.start()
    name = (await harness.state(run_id)).run.protocol_name
    # someone commits a different override on the protocol branch itself
    commit_to_origin(
        harness.origin,
        name,
        {
            ".deksdenflow/prompts/execute-step.md": BRANCH_ONLY,
            ".deksdenflow/prompts/quality-validator.md": BRANCH_ONLY,
        },
        "try to steer the agent from the protocol branch",
    )
    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
    await harness.drain()

    (execute,) = [r for r in engine.requests if r.phase == "execute"]
    assert execute.prompt == "OVERRIDE-FROM-BASE-7731: step 1, Record the task\n"
    (qa,) = [r for r in engine.requests if r.phase == "qa"]
    assert "9913" not in qa.prompt
    # the worktree did see the branch commit (so the file was there to be misused)
    state = await harness.state(run_id)
    assert (Path(state.run.worktree_path) / ".deksdenflow/prompts/execute-step.md").read_text() == (
        BRANCH_ONLY
    )


async def test_prompt_override_only_on_the_protocol_branch_is_ignored(harness: Harness) -> None:
    engine = ScriptedEngine()
    harness.use(engine)
    run_id = await harness.start()
    name = (await harness.state(run_id)).run.protocol_name
    commit_to_origin(
        harness.origin,
        name,
        {".deksdenflow/prompts/execute-step.md": BRANCH_ONLY},
        "override on the protocol branch only",
    )
    await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    (execute,) = [r for r in engine.requests if r.phase == "execute"]
    assert "9913" not in execute.prompt
    assert "Record the task" in execute.prompt
