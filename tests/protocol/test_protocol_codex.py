"""End to end with the real codex CLI against the fake model: plan, decompose, execute, QA."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.domain.states import ProtocolStatus, StepStatus
from bot.jobs.steps import execute_step
from engines.codex import CodexEngine
from engines.scripted import ScriptedEngine
from tests.fakes.codex_fixtures import FAKE_KEY_NAME, FakeCodex
from tests.fakes.fake_model import add_file_patch, apply_patch_call, final, tool_then
from tests.protocol.conftest import (
    Harness,
    make_harness,
    origin_branches,
    origin_file,
    origin_files,
    origin_log,
    protocol_settings,
)

pytestmark = pytest.mark.codex

TASK = "Add a greeting file"
PLAN = {
    "title": TASK,
    "plan": "# Plan\n\n1. Add greeting.txt saying hello.\n",
    "context": "# Context\n\nA tiny repository.\n",
    "log": "# Log\n",
    "setup": "# Setup\n\nNothing to install.\n",
    "steps": [
        {
            "slug": "add-greeting",
            "title": "Add greeting.txt",
            "content": "# Add greeting.txt\n\nCreate greeting.txt.\n",
            "commit_type": "feat",
            "qa_policy": "full",
        }
    ],
}
DETAIL = "# Add greeting.txt\n\n## Goal\nCreate greeting.txt containing `Hello, world!`.\n"


def codex_engine(fake: FakeCodex) -> CodexEngine:
    # The job builds its own EngineRequest (no per-request env): the provider key reaches
    # codex from the worker's environment through the allowlist, like a deployment would.
    return CodexEngine(
        fake.codex_bin,
        codex_home=str(fake.home),
        env_allow=[FAKE_KEY_NAME],
        base_env={**os.environ, **fake.env},
    )


@pytest.fixture
async def codex_harness(
    tmp_path: Path, origin: Path, fake_codex: FakeCodex
) -> AsyncIterator[Harness]:
    settings = protocol_settings(
        tmp_path,
        engine="codex",
        codex_bin=fake_codex.codex_bin,
        protocol_planning_model="gpt-5.5",
        protocol_decompose_model="gpt-5.5",
        protocol_exec_model="gpt-5.5",
        protocol_qa_model="gpt-5.5",
        engine_timeout_s=120,
    )
    async with make_harness(settings, origin) as h:
        h.use(codex_engine(fake_codex), ScriptedEngine())
        yield h


async def test_codex_plans_executes_and_passes_qa(
    codex_harness: Harness, fake_codex: FakeCodex
) -> None:
    h = codex_harness
    server = fake_codex.server
    server.enqueue(
        final(json.dumps(PLAN), input_tokens=300, output_tokens=40),  # planning
        final(
            json.dumps({"content": DETAIL}), input_tokens=200, output_tokens=30
        ),  # decompose step 01
        tool_then(  # execute: one apply_patch, then the final message
            apply_patch_call(add_file_patch("greeting.txt", "Hello, world!")),
            input_tokens=120,
            output_tokens=20,
        ),
        final("Added greeting.txt", input_tokens=200, cached_input_tokens=50, output_tokens=12),
        final(  # QA
            "greeting.txt exists and says hello.\n\nVERDICT: PASS",
            input_tokens=150,
            output_tokens=10,
        ),
    )
    run_id = await h.start(TASK)
    state = await h.state(run_id)
    assert state.run.status == ProtocolStatus.PLANNED, state.run.runtime_state
    name = state.run.protocol_name
    assert name == "0001-add-a-greeting-file"

    assert await execute_step(h.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa-run"
    await h.drain()

    assert not server.unexpected and not server.errors and server.pending() == 0
    state = await h.state(run_id)
    assert state.run.status == ProtocolStatus.COMPLETED, state.run.runtime_state
    step = state.step(1)
    assert step.status == StepStatus.COMPLETED
    assert step.runtime_state["qa_verdict"] == "PASS"

    # the branch and its commits on the origin
    assert name in origin_branches(h.origin)
    assert origin_log(h.origin, name) == [
        "init",
        f"feat(protocol): add plan for {TASK} [protocol-0001/00]",
        "feat(add): Add greeting.txt [protocol-0001/01]",
        "test(qa): quality report for step 01: PASS [protocol-0001/01-qa]",
    ]
    assert origin_file(h.origin, name, "greeting.txt") == "Hello, world!\n"
    root = f".protocols/{name}"
    files = set(origin_files(h.origin, name, root))
    for rel in (
        "plan.md",
        "context.md",
        "log.md",
        "00-setup.md",
        "01-add-greeting.md",
        "quality-report.md",
    ):
        assert f"{root}/{rel}" in files, files
    assert origin_file(h.origin, name, f"{root}/plan.md") == PLAN["plan"]
    # decomposition replaced the planned step text with the detailed one
    assert origin_file(h.origin, name, f"{root}/01-add-greeting.md") == DETAIL
    assert "VERDICT: PASS" in origin_file(h.origin, name, f"{root}/quality-report.md")
    assert "executed" in origin_file(h.origin, name, f"{root}/log.md")

    # token usage: the fake's figures (input + output), per step and per protocol
    execute_tokens = (120 + 20) + (200 + 12)
    qa_tokens = 150 + 10
    assert step.tokens_used == execute_tokens + qa_tokens
    assert state.run.tokens_used == (300 + 40) + (200 + 30) + execute_tokens + qa_tokens

    # events: one engine.completed per phase, the step's transitions and the verdict
    events = await h.events(run_id)
    engine_events = [e for e in events if e.event_type == "engine.completed"]
    assert [e.metadata_["phase"] for e in engine_events] == [
        "planning",
        "decompose",
        "execute",
        "qa",
    ]
    assert all(e.metadata_["engine"] == "codex" for e in engine_events)
    execute_event = engine_events[2]
    assert execute_event.metadata_["usage"] == {
        "input_tokens": 320,
        "cached_input_tokens": 50,
        "output_tokens": 32,
        "reasoning_output_tokens": 0,
    }
    kinds = [
        e.get("item", {}).get("type")
        for e in execute_event.metadata_["engine_events"]
        if e.get("type") == "item.completed"
    ]
    assert kinds == ["file_change", "agent_message"]
    types = [e.event_type for e in events]
    for wanted in ("step.running", "step.needs_qa", "step.completed", "protocol.completed"):
        assert wanted in types, types
    (verdict,) = [e for e in events if e.event_type == "qa.verdict"]
    assert verdict.metadata_["verdict"] == "PASS"

    # what codex sent the model: planning with our schema, the step prompt, then QA
    requests = server.response_requests()
    assert len(requests) == 5
    fmt = requests[0].body["text"]["format"]  # type: ignore[index]
    assert fmt["type"] == "json_schema" and "steps" in fmt["schema"]["properties"]
    assert TASK in requests[0].user_texts()[-1]
    assert "greeting.txt" in requests[2].user_texts()[-1] or "Add greeting.txt" in str(
        requests[2].user_texts()
    )
    # the draft PR the Local forge recorded
    forge = h.ctx["forges"].forge_for(h.project)
    pulls = await forge.records("pull")
    assert [p.key for p in pulls] == [name]


async def test_codex_planning_repair_counts_only_the_turns_own_tokens(
    codex_harness: Harness, fake_codex: FakeCodex
) -> None:
    """Codex reports the thread's running total after `resume`: the bot stores the delta."""
    h = codex_harness
    fake_codex.server.enqueue(
        final('{"title": "missing everything"}', input_tokens=300, output_tokens=40),
        final(json.dumps(PLAN), input_tokens=500, output_tokens=60),  # the repair turn
        final(json.dumps({"content": DETAIL}), input_tokens=200, output_tokens=30),
    )
    run_id = await h.start(TASK)
    state = await h.state(run_id)
    assert state.run.status == ProtocolStatus.PLANNED, state.run.runtime_state
    assert state.run.tokens_used == (300 + 40) + (500 + 60) + (200 + 30)
    planning = [
        e.metadata_
        for e in await h.events(run_id, "engine.completed")
        if e.metadata_["phase"] == "planning"
    ]
    assert [p["usage"]["input_tokens"] for p in planning] == [300, 500]
    assert [p["thread_usage"]["input_tokens"] for p in planning] == [300, 800]
    assert planning[0]["thread_id"] == planning[1]["thread_id"]
    assert "planning.repair" in await h.event_types(run_id)
    repair_request = fake_codex.server.response_requests()[1]
    assert "did not validate" in repair_request.user_texts()[-1]


# The provider's answers that no retry can fix, and what the step's reason must then say:
# a refused key, and a model it does not serve (OpenAI: 404 or 400 with `model_not_found`).
REFUSALS = {
    "401 wrong key": (401, None, ("401", "credentials")),
    "404 unknown model": (404, {"error": {
        "message": "The model `gpt-nope` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}},
        ("model is unknown to the provider", "gpt-nope")),
    "400 unknown model": (400, {"error": {
        "message": "The requested model 'gpt-nope' does not exist.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}},
        ("model is unknown to the provider", "gpt-nope")),
}  # fmt: skip


@pytest.mark.parametrize("refusal", list(REFUSALS))
async def test_a_refusing_provider_fails_the_step_within_seconds_with_the_cause(
    codex_harness: Harness, fake_codex: FakeCodex, refusal: str
) -> None:
    # planned offline (a scripted engine standing in under the codex id), then the real CLI
    # runs the step against a provider that refuses the key or the model, with codex's own
    # retry budget: the stop must come from the engine reading the cause, not from a timeout
    codex_harness.use(ScriptedEngine(engine_id="codex"))
    run_id = await codex_harness.start(TASK)
    assert (await codex_harness.state(run_id)).run.status == ProtocolStatus.PLANNED
    config = fake_codex.home / "config.toml"
    config.write_text(
        config.read_text()
        .replace("request_max_retries = 0\n", "request_max_retries = 8\n")
        .replace("stream_max_retries = 0\n", "stream_max_retries = 8\n")
    )
    status, body, expected = REFUSALS[refusal]
    fake_codex.server.http_error, fake_codex.server.http_error_body = status, body
    codex_harness.use(codex_engine(fake_codex), ScriptedEngine())
    started = time.monotonic()
    outcome = await execute_step(codex_harness.ctx, protocol_run_id=run_id, step_index=1)
    elapsed = time.monotonic() - started
    assert outcome == "failed"
    assert elapsed < 10, elapsed
    assert 1 <= len(fake_codex.server.response_requests()) < 9  # stopped, not given up
    state = await codex_harness.state(run_id)
    step = state.step(1)
    assert step.status == StepStatus.FAILED
    reason = step.runtime_state["error"]
    assert all(part in reason for part in expected), reason
    assert state.run.status == ProtocolStatus.BLOCKED
    assert expected[0] in state.run.runtime_state["message"]
