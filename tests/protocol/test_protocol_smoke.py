"""The scripted engine end to end through the jobs: plan, execute, QA, completion."""

from __future__ import annotations

from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs.steps import execute_step
from tests.protocol.conftest import Harness, origin_branches, origin_files, origin_log


async def test_scripted_protocol_runs_to_completion(harness: Harness) -> None:
    run_id = await harness.start()
    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.PLANNED, state.run.runtime_state
    name = state.run.protocol_name
    assert name == "0001-add-a-greeting"
    assert [s.status for s in state.steps] == [StepStatus.PENDING, StepStatus.PENDING]

    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
    await harness.drain()  # the QA job it enqueued
    assert await execute_step(harness.ctx, protocol_run_id=run_id, step_index=2) == "needs_qa-run"
    await harness.drain()

    state = await harness.state(run_id)
    assert state.run.status == ProtocolStatus.COMPLETED
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED, StepStatus.COMPLETED]
    assert name in origin_branches(harness.origin)
    assert origin_log(harness.origin, name) == [
        "init",
        "feat(protocol): add plan for Add a greeting [protocol-0001/00]",
        "docs(record): Record the task [protocol-0001/01]",
        "test(qa): quality report for step 01: PASS [protocol-0001/01-qa]",
        "feat(add): Add a greeting module [protocol-0001/02]",
        "test(qa): quality report for step 02: PASS [protocol-0001/02-qa]",
    ]
    files = origin_files(harness.origin, name, f".protocols/{name}")
    assert f".protocols/{name}/quality-report.md" in files
