"""Tests for the engine interface types, JSON reply parsing and the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.core.errors import EngineError
from engines.base import Engine, EngineRequest, EngineResult, TokenUsage
from engines.codex import CodexEngine
from engines.registry import EngineRegistry, default_registry
from engines.scripted import ScriptedEngine
from engines.structured import parse_json_reply


def test_token_usage_arithmetic() -> None:
    a = TokenUsage(100, 10, 50, 5)
    b = TokenUsage(30, 5, 20, 1)
    assert a.total == 150
    assert a + b == TokenUsage(130, 15, 70, 6)
    assert a - b == TokenUsage(70, 5, 30, 4)
    # A running total that shrank never yields a negative turn cost.
    assert b - a == TokenUsage()


def test_token_usage_from_mapping_is_lenient() -> None:
    usage = TokenUsage.from_mapping(
        {
            "input_tokens": 7,
            "output_tokens": "x",
            "cache_write_input_tokens": 3,
            "cached_input_tokens": True,
        }
    )
    assert usage == TokenUsage(input_tokens=7)
    assert TokenUsage.from_mapping(None) == TokenUsage()
    assert TokenUsage.from_mapping(usage.to_dict()) == usage


def test_request_defaults_and_result_ok(tmp_path: Path) -> None:
    request = EngineRequest(prompt="p", workdir=tmp_path, phase="execute")
    assert request.sandbox == "workspace-write"
    assert dict(request.env) == {} and dict(request.context) == {}
    assert request.timeout_s == 900
    assert EngineResult(outcome="completed", exit_code=0).ok
    assert not EngineResult(outcome="timeout", exit_code=None).ok


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1}',
        '  {"a": 1}\n',
        '```json\n{"a": 1}\n```',
        '```\n{"a": 1}\n```',
        'Here is the plan:\n```json\n{"a": 1}\n```\nThanks.',
        'The plan: {"a": 1}',
    ],
)
def test_parse_json_reply_accepts_fences_and_prose(text: str) -> None:
    assert parse_json_reply(text) == ({"a": 1}, None)


@pytest.mark.parametrize("text", ["", "   ", "no json here", "```json\n{broken\n```"])
def test_parse_json_reply_reports_why(text: str) -> None:
    value, error = parse_json_reply(text)
    assert value is None
    assert error


def test_registry_get_and_unknown_id(tmp_path: Path) -> None:
    registry = default_registry(codex_bin="/opt/codex", codex_home=str(tmp_path))
    assert registry.ids() == ["codex", "scripted"]
    assert "codex" in registry and len(registry) == 2
    codex = registry.get("codex")
    assert isinstance(codex, CodexEngine) and codex.codex_bin == "/opt/codex"
    assert isinstance(registry.get("scripted"), ScriptedEngine)
    assert isinstance(codex, Engine)
    with pytest.raises(
        EngineError, match=r"unknown engine 'claude'; known engines: codex, scripted"
    ):
        registry.get("claude")


def test_registry_register_refuses_duplicates_unless_replacing() -> None:
    registry = EngineRegistry([ScriptedEngine({})])
    with pytest.raises(EngineError, match="already registered"):
        registry.register(ScriptedEngine({}))
    replacement = ScriptedEngine({})
    registry.register(replacement, replace=True)
    assert registry.get("scripted") is replacement
    registry.register(ScriptedEngine({}, engine_id="scripted-2"))
    assert list(registry) == ["scripted", "scripted-2"]
