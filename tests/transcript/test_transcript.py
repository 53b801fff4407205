"""The step transcript: engine events → redacted items in batches; cost per step and run."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from bot.jobs.protocol import execute_step
from bot.models import TranscriptItem
from bot.pricing import DEFAULT_PRICES, cost_usd
from bot.transcript import (
    REDACTED,
    TranscriptRecorder,
    redact,
    secret_values,
    transcript_entry,
    transcript_page,
)
from engines.base import TokenUsage
from engines.scripted import ScriptedEngine
from tests.protocol.conftest import Harness, scripted_script


def test_entries_for_each_kind_of_codex_event() -> None:
    wd = Path("/w")
    cmd = {
        "type": "item.completed",
        "item": {"type": "command_execution", "command": "pytest -q", "exit_code": 1,
                 "aggregated_output": "x" * 5000 + "1 failed", "status": "failed"},
    }  # fmt: skip
    entry = transcript_entry(cmd, wd)
    assert entry is not None and entry["kind"] == "command" and entry["text"] == "pytest -q"
    assert entry["data"]["exit_code"] == 1 and entry["data"]["output"].endswith("1 failed")
    assert len(entry["data"]["output"]) < 2100
    change = {"type": "item.completed", "item": {"type": "file_change",
              "changes": [{"path": "/w/a/b.py", "kind": "add"}]}}  # fmt: skip
    assert transcript_entry(change, wd) == {
        "kind": "file_change", "text": "add a/b.py",
        "data": {"changes": [{"path": "a/b.py", "kind": "add"}]},
    }  # fmt: skip
    usage = {"type": "turn.completed", "usage": {"input_tokens": 1200, "output_tokens": 30}}
    assert transcript_entry(usage) == {
        "kind": "usage", "text": "tokens: 1,200 in (0 cached), 30 out",
        "data": {"usage": {"input_tokens": 1200, "output_tokens": 30}},
    }  # fmt: skip
    failed = {"type": "turn.failed", "error": {"message": "unexpected status 401"}}
    assert transcript_entry(failed) == {"kind": "error", "text": "unexpected status 401", "data": {}}
    assert transcript_entry({"type": "thread.started", "thread_id": "t"}) is None
    started_msg = {"type": "item.started", "item": {"type": "agent_message", "text": ""}}
    assert transcript_entry(started_msg) is None


def test_redaction_reaches_nested_values_and_env_keys() -> None:
    secrets = secret_values(
        ["whsec-0123456789"],
        {"DEPLOY": "project-secret-42"},
        {"CODEX_API_KEY": "sk-live-abcdef", "PATH": "/usr/bin", "SHORT_TOKEN": "abc"},
    )
    assert set(secrets) == {"whsec-0123456789", "project-secret-42", "sk-live-abcdef"}
    value = {"text": "key sk-live-abcdef!", "data": {"output": ["project-secret-42 here"]}}
    assert redact(value, secrets) == {
        "text": f"key {REDACTED}!", "data": {"output": [f"{REDACTED} here"]},
    }  # fmt: skip


async def test_recorder_batches_and_redacts(harness: Harness) -> None:
    db = harness.ctx["db"]
    recorder = TranscriptRecorder(
        db, protocol_run_id=7, step_run_id=3, phase="execute", secrets=("sk-secret-value",),
        interval_s=0.05,
    )  # fmt: skip
    for n in range(300):
        recorder.add({"type": "item.completed",
                      "item": {"type": "agent_message", "text": f"m{n} sk-secret-value"}})  # fmt: skip
    await recorder.close()
    items = await transcript_page(db, step_run_id=3, limit=1000)
    assert len(items) == 300 == recorder.stored
    assert items[0].text == f"m0 {REDACTED}" and items[-1].text == f"m299 {REDACTED}"
    # paging: the newest page before an id, oldest first
    last = await transcript_page(db, step_run_id=3, before=items[-1].id + 1, limit=10)
    assert [i.text.split()[0] for i in last] == [f"m{n}" for n in range(290, 300)]


async def test_a_scripted_step_stores_its_transcript_and_cost(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODEX_API_KEY", "sk-from-the-worker-env")
    script = scripted_script(
        execute={"default": {
            "reasoning": "Thinking about {title}",
            "commands": ["echo key=sk-from-the-worker-env", "exit 3"],
            "files": [{"path": "NOTES.md", "append": "- {slug}\n"}],
            "message": "Done with {slug}",
            "usage": {"input_tokens": 2000, "cached_input_tokens": 500, "output_tokens": 300},
        }},
    )  # fmt: skip
    harness.use(ScriptedEngine(script))
    run_id = await harness.start()
    await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    state = await harness.state(run_id)
    step = state.step(1)
    async with harness.ctx["db"].sessions() as session:
        rows = list((await session.execute(
            select(TranscriptItem).where(TranscriptItem.step_run_id == step.id)
            .order_by(TranscriptItem.id))).scalars())  # fmt: skip
    kinds = [(r.phase, r.kind) for r in rows]
    assert kinds[:8] == [
        ("execute", "turn"), ("execute", "reasoning"), ("execute", "file_change"),
        ("execute", "command"), ("execute", "command"), ("execute", "command"),
        ("execute", "command"), ("execute", "message"),
    ]  # fmt: skip
    echo = rows[4]
    assert echo.data["exit_code"] == 0
    assert echo.data["output"] == f"key={REDACTED}\n"
    assert rows[6].data["exit_code"] == 3
    assert rows[2].text == "add TASK.md"  # step 1 (record-task) writes its own file
    # the planning turns are stored too, on the run without a step
    planning = await transcript_page(harness.ctx["db"], protocol_run_id=run_id, limit=500)
    assert any(i.step_run_id is None and i.phase == "planning" for i in planning)
    # cost: the execute turn at gpt-5.5's default price (+ the QA turn, if any ran)
    expected = cost_usd(
        TokenUsage(input_tokens=2000, cached_input_tokens=500, output_tokens=300),
        DEFAULT_PRICES["gpt-5.5"],
    )
    assert step.cost_usd == pytest.approx(expected)
    assert state.run.cost_usd > step.cost_usd  # planning and decomposition cost too
