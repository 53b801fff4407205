"""Tests for the scripted engine: every phase, per-step overrides, repair path, file edits."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml

from bot.core.errors import EngineError
from engines.base import EngineRequest, Phase, TokenUsage
from engines.scripted import DEFAULT_SCRIPT_PATH, ScriptedEngine, fill, qa_verdict, step_section

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "protocol-planning.schema.json"
CONTEXT = {"task": "Add a greeting", "protocol": "0001-add-greeting"}


@pytest.fixture(scope="module")
def planning_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return schema


def req(workdir: Path, phase: Phase, **context: Any) -> EngineRequest:
    return EngineRequest(
        prompt=f"{phase} please",
        workdir=workdir,
        phase=phase,
        context={**CONTEXT, **context},
    )


async def test_default_planning_is_valid_against_the_schema(
    tmp_path: Path, planning_schema: dict[str, Any]
) -> None:
    engine = ScriptedEngine()
    request = EngineRequest(
        prompt="plan",
        workdir=tmp_path,
        phase="planning",
        output_schema=planning_schema,
        context=CONTEXT,
    )
    result = await engine.run(request)
    assert result.ok and result.exit_code == 0
    jsonschema.validate(result.structured, planning_schema)
    assert json.loads(result.final_message) == result.structured
    assert result.structured["title"] == "Add a greeting"
    assert "0001-add-greeting" in result.structured["plan"]
    assert [s["slug"] for s in result.structured["steps"]] == ["record-task", "add-greeting"]
    assert result.thread_id == "scripted-1"
    assert result.usage == result.thread_usage == TokenUsage(input_tokens=100, output_tokens=50)
    assert [e["type"] for e in result.events][-1] == "turn.completed"


async def test_invalid_first_planning_then_resume_repairs(
    tmp_path: Path, planning_schema: dict[str, Any]
) -> None:
    engine = ScriptedEngine({"planning": {"invalid_first": True, "steps": [
        {"slug": "only-step", "title": "Only step", "content": "Do {task}", "commit_type": "fix",
         "qa_policy": "skip"}]}})  # fmt: skip
    first = await engine.run(
        EngineRequest(prompt="plan", workdir=tmp_path, phase="planning",
                      output_schema=planning_schema, context=CONTEXT)
    )  # fmt: skip
    assert first.ok
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(first.structured, planning_schema)
    repaired = await engine.run(
        EngineRequest(prompt="fix it", workdir=tmp_path, phase="planning",
                      output_schema=planning_schema, context=CONTEXT,
                      resume_thread_id=first.thread_id, previous_usage=first.thread_usage)
    )  # fmt: skip
    jsonschema.validate(repaired.structured, planning_schema)
    assert isinstance(repaired.structured, dict)
    assert repaired.thread_id == first.thread_id
    assert repaired.structured["steps"][0]["content"] == "Do Add a greeting"
    assert repaired.usage == TokenUsage(input_tokens=100, output_tokens=50)
    assert repaired.thread_usage == TokenUsage(input_tokens=200, output_tokens=100)
    # A different protocol gets its own invalid first reply.
    other = await engine.run(req(tmp_path, "planning", protocol="0002-other"))
    assert "steps" not in json.loads(other.final_message)


async def test_non_json_invalid_reply_reports_parse_error(tmp_path: Path) -> None:
    engine = ScriptedEngine({"planning": {"invalid_first": 1, "invalid_reply": "Sorry, no JSON."}})
    result = await engine.run(
        EngineRequest(
            prompt="p", workdir=tmp_path, phase="planning", output_schema={}, context=CONTEXT
        )
    )
    assert result.structured is None
    assert result.parse_error is not None


async def test_decompose_uses_step_overrides_and_placeholders(tmp_path: Path) -> None:
    engine = ScriptedEngine({
        "decompose": {"default": "# {title}\nStep {step_index} of {protocol}",
                      "steps": {"special": "# Special {slug}", 3: {"text": "third {task}"}}},
    })  # fmt: skip
    plain = await engine.run(req(tmp_path, "decompose", step_index=1, slug="first", title="First"))
    assert plain.final_message == "# First\nStep 1 of 0001-add-greeting"
    special = await engine.run(req(tmp_path, "decompose", step_index=2, slug="special", title="S"))
    assert special.final_message == "# Special special"
    third = await engine.run(req(tmp_path, "decompose", step_index=3, slug="x", title="X"))
    assert third.final_message == "third Add a greeting"


async def test_default_script_execute_edits_files(tmp_path: Path) -> None:
    engine = ScriptedEngine(DEFAULT_SCRIPT_PATH)
    first = await engine.run(
        req(tmp_path, "execute", step_index=1, slug="record-task", title="Record")
    )
    assert first.ok and first.final_message == "Wrote TASK.md."
    assert (tmp_path / "TASK.md").read_text() == "# Task\n\nAdd a greeting\n"
    second = await engine.run(
        req(tmp_path, "execute", step_index=2, slug="add-greeting", title="G")
    )
    assert second.ok
    code = (tmp_path / "demo_greeting.py").read_text()
    assert 'return f"Hello, {name}!"' in code  # code braces survive placeholder filling
    changes = [e for e in second.events if e.get("item", {}).get("type") == "file_change"]
    assert {c["kind"] for c in changes[0]["item"]["changes"]} == {"add"}
    # A step the script does not name falls back to the default: append to NOTES.md.
    for _ in range(2):
        await engine.run(req(tmp_path, "execute", step_index=3, slug="extra", title="Extra"))
    assert (tmp_path / "NOTES.md").read_text() == "- step 3 (extra): Extra\n" * 2


async def test_execute_refuses_paths_outside_the_workdir(tmp_path: Path) -> None:
    engine = ScriptedEngine(
        {"execute": {"default": {"files": [{"path": "../escape.txt", "content": "x"}]}}}
    )
    result = await engine.run(req(tmp_path / "wt", "execute", step_index=1, slug="s"))
    assert result.outcome == "failed"
    assert result.error is not None and "leaves the workdir" in result.error
    assert not (tmp_path / "escape.txt").exists()


async def test_execute_delete_and_scripted_failure(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("old")
    engine = ScriptedEngine({"execute": {
        "default": {"files": [{"path": "old.txt", "delete": True}]},
        "steps": {"boom": {"fail": "agent crashed on {slug}"}},
    }})  # fmt: skip
    deleted = await engine.run(req(tmp_path, "execute", step_index=1, slug="clean"))
    assert deleted.ok and not (tmp_path / "old.txt").exists()
    failed = await engine.run(req(tmp_path, "execute", step_index=2, slug="boom"))
    assert failed.outcome == "failed" and failed.exit_code == 1
    assert failed.error == "agent crashed on boom"
    assert failed.usage == TokenUsage()


async def test_qa_verdict_sequence_per_step(tmp_path: Path) -> None:
    engine = ScriptedEngine({"qa": {
        "default": {"verdicts": ["PASS"], "report": "# QA {slug}"},
        "steps": {"flaky": {"verdicts": ["FAIL", "PASS"],
                            "usage": {"input_tokens": 7, "output_tokens": 3}}},
    }})  # fmt: skip
    messages = [
        (await engine.run(req(tmp_path, "qa", step_index=1, slug="flaky"))).final_message
        for _ in range(3)
    ]
    assert [m.rstrip().splitlines()[-1] for m in messages] == [
        "VERDICT: FAIL", "VERDICT: PASS", "VERDICT: PASS",
    ]  # fmt: skip
    assert messages[0].startswith("# QA flaky")
    other = await engine.run(req(tmp_path, "qa", step_index=2, slug="steady"))
    assert other.final_message.rstrip().endswith("VERDICT: PASS")
    assert other.usage == TokenUsage(input_tokens=100, output_tokens=50)
    flaky = await engine.run(req(tmp_path, "qa", step_index=1, slug="flaky", qa_attempt=1))
    assert flaky.final_message.rstrip().endswith("VERDICT: FAIL")  # explicit attempt wins
    assert flaky.usage == TokenUsage(input_tokens=7, output_tokens=3)


def test_qa_verdict_edge_cases() -> None:
    assert qa_verdict({}, 1) == "PASS"
    assert qa_verdict({"verdict": "fail"}, 1) == "FAIL"
    assert qa_verdict({"verdicts": ["maybe"]}, 1) == "FAIL"
    assert qa_verdict({"verdicts": ["FAIL", "PASS"]}, 0) == "FAIL"


async def test_usage_levels_and_discovery(tmp_path: Path) -> None:
    engine = ScriptedEngine({
        "usage": {"input_tokens": 1000, "output_tokens": 10},
        "discovery": {"message": "Found {protocol}",
                      "files": [{"path": "ci/check.sh", "content": "true\n"}]},
    })  # fmt: skip
    result = await engine.run(req(tmp_path, "discovery"))
    assert result.final_message == "Found 0001-add-greeting"
    assert (tmp_path / "ci" / "check.sh").read_text() == "true\n"
    assert result.usage == TokenUsage(input_tokens=1000, output_tokens=10)


async def test_script_file_is_reloaded_when_edited(tmp_path: Path) -> None:
    script = tmp_path / "script.yml"
    script.write_text(yaml.safe_dump({"decompose": {"default": "v1"}}))
    engine = ScriptedEngine(script)
    assert (await engine.run(req(tmp_path, "decompose", step_index=1))).final_message == "v1"
    script.write_text(yaml.safe_dump({"decompose": {"default": "version two"}}))

    os.utime(script, (time.time() + 5, time.time() + 5))
    assert (
        await engine.run(req(tmp_path, "decompose", step_index=1))
    ).final_message == "version two"


def test_bad_scripts_raise_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="cannot read"):
        ScriptedEngine(tmp_path / "missing.yml")
    broken = tmp_path / "broken.yml"
    broken.write_text("planning: [unclosed\n")
    with pytest.raises(EngineError, match="not valid YAML"):
        ScriptedEngine(broken)
    listy = tmp_path / "list.yml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(EngineError, match="must be a mapping"):
        ScriptedEngine(listy)


async def test_scripted_runs_are_fast(tmp_path: Path) -> None:
    engine = ScriptedEngine()
    started = time.perf_counter()
    calls: list[tuple[Phase, dict[str, Any]]] = [
        ("planning", {}),
        ("decompose", {"step_index": 1, "slug": "record-task", "title": "Record"}),
        ("execute", {"step_index": 1, "slug": "record-task", "title": "Record"}),
        ("qa", {"step_index": 1, "slug": "record-task", "title": "Record"}),
    ]
    for phase, context in calls:
        call_started = time.perf_counter()
        result = await engine.run(req(tmp_path, phase, **context))
        assert result.ok
        assert time.perf_counter() - call_started < 0.05
    assert time.perf_counter() - started < 0.2
    assert [r.phase for r in engine.requests] == ["planning", "decompose", "execute", "qa"]


def test_fill_and_step_section() -> None:
    assert fill("{task} {unknown} {slug}", {"task": "T"}) == "T {unknown} {slug}"
    section = {"default": {"message": "m", "files": []}, "steps": {"1": {"message": "one"}}}
    assert step_section(section, {"step_index": 1}) == {"message": "one", "files": []}
    assert step_section(section, {"step_index": 2}) == {"message": "m", "files": []}
    assert step_section({"steps": {"01": "x"}}, {"step_index": 1}) == {"text": "x"}
