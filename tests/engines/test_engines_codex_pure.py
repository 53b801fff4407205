"""Tests for the codex engine's pure parts: argv, JSONL parsing, exit codes, env scrubbing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engines.base import EngineRequest, TokenUsage
from engines.codex import (
    COMMAND_OUTPUT_LIMIT,
    CodexEventParser,
    ParsedRun,
    build_codex_argv,
    error_message,
    fatal_cause,
    is_forbidden_env,
    outcome_for_exit,
    parse_codex_events,
    scrub_env,
    turn_usage,
)

# Captured from codex 0.169.0 against the fake model (paths shortened).
APPLY_PATCH_RUN = """\
{"type":"thread.started","thread_id":"01a225ab-a056-7a81-9c53-4d09e60475c8"}
{"type":"turn.started"}
{"type":"item.started","item":{"id":"item_0","type":"file_change","changes":[{"path":"/r/hello.txt","kind":"add"}],"status":"in_progress"}}
{"type":"item.completed","item":{"id":"item_0","type":"file_change","changes":[{"path":"/r/hello.txt","kind":"add"}],"status":"completed"}}
{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"Done"}}
{"type":"turn.completed","usage":{"input_tokens":300,"cached_input_tokens":20,"cache_write_input_tokens":0,"output_tokens":50,"reasoning_output_tokens":7}}
"""

MISSING_KEY_RUN = """\
{"type":"thread.started","thread_id":"01a225ab-bb25-79f3-9e45-ac40b49a302c"}
{"type":"turn.started"}
{"type":"error","message":"Missing environment variable: `FAKE_MODEL_KEY`."}
{"type":"turn.failed","error":{"message":"Missing environment variable: `FAKE_MODEL_KEY`."}}
"""


def request(tmp_path: Path, **changes: Any) -> EngineRequest:
    return replace(EngineRequest(prompt="Do it", workdir=tmp_path, phase="execute"), **changes)


def test_argv_fresh_turn(tmp_path: Path) -> None:
    argv = build_codex_argv(request(tmp_path), "codex", Path("/t/last.txt"), None)
    assert argv == [
        "codex", "exec", "--json", "-C", str(tmp_path), "--sandbox", "workspace-write",
        "-o", "/t/last.txt", "-c", "analytics.enabled=false", "--disable", "plugins",
        "-",
    ]  # fmt: skip
    assert "Do it" not in argv  # the prompt goes through stdin


def test_argv_with_model_schema_and_overrides(tmp_path: Path) -> None:
    req = request(tmp_path, model="gpt-5.5", sandbox="read-only", output_schema={"type": "object"})
    argv = build_codex_argv(
        req,
        "/bin/codex",
        Path("/t/last.txt"),
        Path("/t/schema.json"),
        ['model_reasoning_effort="low"'],
    )
    assert argv[:2] == ["/bin/codex", "exec"]
    assert argv[argv.index("--sandbox") + 1] == "read-only"
    assert argv[argv.index("-m") + 1] == "gpt-5.5"
    assert argv[argv.index("--output-schema") + 1] == "/t/schema.json"
    assert 'model_reasoning_effort="low"' in argv
    assert "resume" not in argv
    assert argv[-1] == "-"


def test_argv_resume_puts_options_before_resume(tmp_path: Path) -> None:
    req = request(tmp_path, model="m", resume_thread_id="thread-1", prompt="-fix the JSON")
    argv = build_codex_argv(req, "codex", Path("/t/l"), None)
    resume_at = argv.index("resume")
    assert argv[resume_at:] == ["resume", "thread-1", "-"]
    for flag in ("-C", "--sandbox", "-m", "-o", "--json", "--disable"):
        assert argv.index(flag) < resume_at


def test_parse_successful_run() -> None:
    parsed = parse_codex_events(APPLY_PATCH_RUN.splitlines())
    assert parsed.thread_id == "01a225ab-a056-7a81-9c53-4d09e60475c8"
    assert parsed.final_message == "Done"
    assert parsed.usage == TokenUsage(300, 20, 50, 7)
    assert parsed.turn_failed is None and parsed.errors == []
    assert parsed.events[0]["type"] == "thread.started"
    assert len(parsed.events) == 6


def test_parse_failed_run() -> None:
    parsed = parse_codex_events(MISSING_KEY_RUN.splitlines())
    assert parsed.turn_failed == "Missing environment variable: `FAKE_MODEL_KEY`."
    assert parsed.errors == ["Missing environment variable: `FAKE_MODEL_KEY`."]
    assert parsed.usage is None
    assert outcome_for_exit(1, parsed.turn_failed) == "failed"
    # the stream's cause first, then what stderr adds (codex's fixed noise lines dropped)
    noisy = "Reading additional input from stdin...\nconfig error: bad provider\n"
    assert error_message("failed", 1, parsed, noisy) == (
        f"{parsed.turn_failed}\nstderr: config error: bad provider"
    )
    assert error_message("failed", 1, parsed, "Reading additional input from stdin...") == (
        parsed.turn_failed
    )


def test_fatal_cause_spots_auth_and_model_errors_only() -> None:
    reconnect = {
        "type": "error",
        "message": "Reconnecting... 1/5 (unexpected status 401 Unauthorized: Incorrect API key)",
    }
    cause = fatal_cause(reconnect)
    assert cause is not None and "401" in cause and "credentials" in cause
    assert fatal_cause({"type": "error", "message": "unexpected status 403 Forbidden"})
    unknown = {"type": "error", "message": "The model `gpt-9` does not exist or you lack access"}
    assert "model" in (fatal_cause(unknown) or "")
    assert fatal_cause({"type": "error", "message": "Reconnecting... 2/5 (status 503)"}) is None
    assert fatal_cause({"type": "item.completed", "item": {"type": "agent_message"}}) is None


def test_parse_keeps_last_agent_message_and_skips_noise() -> None:
    lines: list[str | bytes] = [
        "",
        "not json",
        b'{"type":"item.completed","item":{"id":"a","type":"agent_message","text":"first"}}',
        '["a list"]',
        '{"type":"item.completed","item":{"id":"b","type":"agent_message","text":"second"}}',
        '{"type":"item.completed","item":{"id":"c","type":"error","message":"tool hiccup"}}',
    ]
    parsed = parse_codex_events(lines)
    assert parsed.final_message == "second"
    assert parsed.bad_lines == 2
    assert parsed.errors == ["tool hiccup"]


def test_command_output_is_truncated_in_events() -> None:
    big = "x" * (COMMAND_OUTPUT_LIMIT * 3)
    event = {
        "type": "item.completed",
        "item": {"id": "i", "type": "command_execution", "command": "cat big",
                 "aggregated_output": big, "exit_code": 0, "status": "completed"},
    }  # fmt: skip
    parsed = parse_codex_events([json.dumps(event)])
    stored = parsed.events[0]["item"]["aggregated_output"]
    assert stored.startswith("x" * COMMAND_OUTPUT_LIMIT)
    assert len(stored) < COMMAND_OUTPUT_LIMIT + 100
    assert "truncated" in stored


def test_event_cap_counts_dropped_events() -> None:
    parser = CodexEventParser(max_events=2)
    for n in range(5):
        parser.feed(json.dumps({"type": "item.updated", "n": n}))
    parser.feed('{"type":"turn.completed","usage":{"input_tokens":1,"output_tokens":2}}')
    assert len(parser.run.events) == 2
    assert parser.run.dropped_events == 4
    # State still follows events that were not stored.
    assert parser.run.usage == TokenUsage(input_tokens=1, output_tokens=2)


def test_resume_usage_is_the_delta_of_running_totals() -> None:
    first = parse_codex_events(APPLY_PATCH_RUN.splitlines())
    assert first.usage is not None
    resumed_total = TokenUsage(1300, 120, 57, 9)
    assert turn_usage(resumed_total, first.usage, resumed=True) == TokenUsage(1000, 100, 7, 2)
    # A fresh thread's total is the turn's own usage, whatever the caller passed as previous.
    assert turn_usage(first.usage, TokenUsage(5, 0, 5, 0), resumed=False) == first.usage
    assert turn_usage(resumed_total, None, resumed=True) == resumed_total


@pytest.mark.parametrize(
    ("code", "turn_failed", "outcome"),
    [
        (0, None, "completed"),
        (0, "stream disconnected", "failed"),
        (1, None, "failed"),
        (2, None, "usage_error"),
        (130, None, "cancelled"),
        (143, None, "cancelled"),
        (-9, None, "cancelled"),
        (101, None, "failed"),
    ],
)
def test_outcome_for_exit(code: int, turn_failed: str | None, outcome: str) -> None:
    assert outcome_for_exit(code, turn_failed) == outcome


def test_error_messages() -> None:
    empty = ParsedRun()
    assert error_message("completed", 0, empty, "") is None
    assert "exit 2" in (error_message("usage_error", 2, empty, "error: unexpected argument") or "")
    assert "unexpected argument" in (
        error_message("usage_error", 2, empty, "error: unexpected argument") or ""
    )
    assert error_message("failed", 1, empty, "boom\n") == "codex failed (exit 1): boom"
    assert (
        error_message("failed", 1, ParsedRun(errors=["reconnecting"]), "x")
        == "codex failed (exit 1): reconnecting\nstderr: x"
    )
    assert "signal" in (error_message("cancelled", -15, empty, "") or "")


@pytest.mark.parametrize(
    "name",
    ["DEKSDENFLOW_DATABASE_URL", "GITHUB_TOKEN", "GH_TOKEN", "GITLAB_TOKEN", "CI_JOB_TOKEN",
     "NPM_TOKEN", "github_token", "WEBHOOK_SECRET", "APP_PRIVATE_KEY", "PGPASSWORD_PASSWORD"],
)  # fmt: skip
def test_forbidden_env_names(name: str) -> None:
    assert is_forbidden_env(name)


@pytest.mark.parametrize("name", ["CODEX_API_KEY", "PATH", "HOME", "CODEX_HOME", "FAKE_MODEL_KEY"])
def test_allowed_env_names(name: str) -> None:
    assert not is_forbidden_env(name)


def test_scrub_env_allowlist_extra_and_secrets() -> None:
    base = {
        "PATH": "/usr/bin",
        "HOME": "/home/w",
        "LC_ALL": "C.UTF-8",
        "HTTPS_PROXY": "http://proxy:3128",
        "CODEX_API_KEY": "sk-codex",
        "DATABASE_URL": "postgresql://secret",
        "DEKSDENFLOW_GITHUB_PRIVATE_KEY": "pem",
        "GITHUB_TOKEN": "ghs_x",
        "AZURE_OPENAI_API_KEY": "az",
    }
    extra = {"FOO": "bar", "GH_TOKEN": "leak", "DEKSDENFLOW_X": "leak", "CODEX_HOME": "/ch"}
    env = scrub_env(base, extra, allow=["AZURE_OPENAI_API_KEY"])
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/home/w",
        "LC_ALL": "C.UTF-8",
        "HTTPS_PROXY": "http://proxy:3128",
        "CODEX_API_KEY": "sk-codex",
        "AZURE_OPENAI_API_KEY": "az",
        "FOO": "bar",
        "CODEX_HOME": "/ch",
    }
    # Even an explicit allow cannot let a forge token through.
    assert "GITHUB_TOKEN" not in scrub_env(base, {}, allow=["GITHUB_TOKEN"])
