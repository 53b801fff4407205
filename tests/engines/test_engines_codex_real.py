"""The codex engine driving the real codex CLI against the local fake model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest

from engines.base import EngineRequest, TokenUsage
from tests.fakes.codex_fixtures import FakeCodex
from tests.fakes.fake_model import (
    FakeResponse,
    add_file_patch,
    apply_patch_call,
    final,
    shell_call,
    tool_then,
)

pytestmark = pytest.mark.codex

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "protocol-planning.schema.json"
PLAN = {
    "title": "Add a greeting",
    "plan": "# Plan\n1. Add greeting.txt",
    "context": "# Context\n",
    "log": "# Log\n",
    "setup": "# Setup\nNothing.",
    "steps": [
        {
            "slug": "add-greeting",
            "title": "Add greeting.txt",
            "content": "# Add greeting.txt\n",
            "commit_type": "feat",
            "qa_policy": "light",
            "max_fix_attempts": None,
            "depends_on": None,
        }
    ],
}


def git_status(repo: Path) -> str:
    done = subprocess.run(
        ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def request(fake: FakeCodex, workdir: Path, prompt: str, **kw: Any) -> EngineRequest:
    return EngineRequest(
        prompt=prompt, workdir=workdir, phase=kw.pop("phase", "execute"),
        model=kw.pop("model", "gpt-5.5"),
        env=fake.env, timeout_s=60, **kw,
    )  # fmt: skip


async def test_apply_patch_turn_edits_the_worktree(fake_codex: FakeCodex, git_repo: Path) -> None:
    fake_codex.server.enqueue(
        tool_then(
            apply_patch_call(add_file_patch("greeting.txt", "Hello, world!")), input_tokens=120
        ),
        tool_then(shell_call("cat greeting.txt"), input_tokens=150, output_tokens=5),
        final("Added greeting.txt", input_tokens=200, cached_input_tokens=50, output_tokens=12),
    )
    result = await fake_codex.engine().run(request(fake_codex, git_repo, "Add greeting.txt"))

    assert result.outcome == "completed", result.error
    assert result.exit_code == 0
    assert (git_repo / "greeting.txt").read_text() == "Hello, world!\n"
    assert result.final_message == "Added greeting.txt"
    # Usage is summed over the turn's three model calls.
    assert result.usage == TokenUsage(470, 50, 37, 0)
    assert result.thread_id
    completed = [e["item"] for e in result.events if e["type"] == "item.completed"]
    assert [item["type"] for item in completed] == [
        "file_change",
        "command_execution",
        "agent_message",
    ]
    # endswith: the login shell may print its own noise first (e.g. pyenv rehash warnings).
    assert completed[1]["aggregated_output"].endswith("Hello, world!\n")
    assert completed[1]["exit_code"] == 0
    # The model saw both tool outputs, and the prompt, through the scrubbed environment.
    requests = fake_codex.server.response_requests()
    assert len(requests) == 3 and not fake_codex.server.unexpected
    assert requests[0].user_texts()[-1] == "Add greeting.txt"
    assert "Hello, world!" in str(requests[2].tool_outputs()["call_shell"])
    assert requests[0].headers["authorization"] == "Bearer fake-key-for-tests"
    # The agent cannot commit under workspace-write: the bot does that afterwards.
    assert git_status(git_repo) == "?? greeting.txt"


async def test_structured_planning_output(fake_codex: FakeCodex, git_repo: Path) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    fake_codex.server.enqueue(final("```json\n" + json.dumps(PLAN) + "\n```"))
    result = await fake_codex.engine().run(
        request(
            fake_codex,
            git_repo,
            "Plan it",
            phase="planning",
            sandbox="read-only",
            output_schema=schema,
        )
    )
    assert result.ok, result.error
    assert result.parse_error is None
    jsonschema.validate(result.structured, schema)
    assert result.structured == PLAN
    # codex forwarded our schema to the model as a strict json_schema format.
    text_format = fake_codex.server.response_requests()[0].body["text"]["format"]  # type: ignore[index]
    assert text_format["type"] == "json_schema" and text_format["schema"] == schema


async def test_resume_turn_reports_its_own_usage(fake_codex: FakeCodex, git_repo: Path) -> None:
    engine = fake_codex.engine()
    fake_codex.server.enqueue(final("not json at all", input_tokens=300, output_tokens=40))
    first = await engine.run(
        request(fake_codex, git_repo, "Plan it", phase="planning", output_schema={"type": "object"})
    )
    assert first.ok and first.structured is None and first.parse_error
    assert first.usage == first.thread_usage == TokenUsage(300, 0, 40, 0)

    fake_codex.server.enqueue(
        final(json.dumps({"fixed": True}), input_tokens=500, output_tokens=25)
    )
    second = await engine.run(
        request(
            fake_codex, git_repo, "Your reply was not JSON; answer again.", phase="planning",
            output_schema={"type": "object"}, resume_thread_id=first.thread_id,
            previous_usage=first.thread_usage,
        )
    )  # fmt: skip
    assert second.ok, second.error
    assert second.thread_id == first.thread_id
    assert second.structured == {"fixed": True}
    assert second.thread_usage == TokenUsage(800, 0, 65, 0)
    assert second.usage == TokenUsage(500, 0, 25, 0)
    # The resumed request carried the whole conversation, and the schema given before `resume`.
    last = fake_codex.server.response_requests()[-1]
    assert (last.body or {})["text"]["format"]["schema"] == {"type": "object"}
    texts = last.user_texts()
    assert "Plan it" in texts and texts[-1] == "Your reply was not JSON; answer again."


async def test_model_failure_is_a_failed_outcome(fake_codex: FakeCodex, git_repo: Path) -> None:
    fake_codex.server.enqueue(FakeResponse([], failure="the fake model is overloaded"))
    result = await fake_codex.engine().run(request(fake_codex, git_repo, "Do it"))
    assert result.outcome == "failed"
    assert result.exit_code == 1
    assert result.error is not None and "overloaded" in result.error


async def test_missing_provider_key_fails_clearly(fake_codex: FakeCodex, git_repo: Path) -> None:
    result = await fake_codex.engine().run(
        EngineRequest(prompt="Do it", workdir=git_repo, phase="execute", timeout_s=60)
    )
    assert result.outcome == "failed"
    assert result.error is not None and "FAKE_MODEL_KEY" in result.error
    assert fake_codex.server.response_requests() == []


async def test_provider_401_stops_the_turn_at_once_with_the_cause(
    fake_codex: FakeCodex, git_repo: Path
) -> None:
    # codex's own retry policy (5 reconnects with backoff), not the tests' zero-retry config:
    # the engine must spot the 401 in the stream and stop, not wait for the retries or timeout
    config = fake_codex.home / "config.toml"
    config.write_text(
        config.read_text()
        .replace("request_max_retries = 0\n", "request_max_retries = 8\n")
        .replace("stream_max_retries = 0\n", "stream_max_retries = 8\n")
    )
    fake_codex.server.http_error = 401
    seen: list[dict[str, Any]] = []
    result = await fake_codex.engine(kill_grace_s=2).run(
        request(fake_codex, git_repo, "Do it", sink=lambda event, raw=None: seen.append(event))
    )
    assert result.outcome == "failed"
    assert result.error is not None and "401" in result.error
    assert "credentials" in result.error
    assert result.duration_s < 10
    # fewer requests than codex's retry budget: it was stopped, it did not give up by itself
    assert 1 <= len(fake_codex.server.response_requests()) < 9
    assert any(e.get("type") == "error" for e in seen)


# How OpenAI answers a model it does not serve: 404 with `model_not_found` (the classic API), or
# 400 naming the model (the Responses API); codex passes the status and body through to its
# error text ("unexpected status 404 Not Found: …").
UNKNOWN_MODEL_ANSWERS: dict[str, tuple[int, dict[str, Any]]] = {
    "404 model_not_found": (404, {"error": {
        "message": "The model `gpt-nope` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}}),
    "400 does not exist": (400, {"error": {
        "message": "The requested model 'gpt-nope' does not exist.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}),
}  # fmt: skip


@pytest.mark.parametrize("answer", sorted(UNKNOWN_MODEL_ANSWERS))
async def test_unknown_model_stops_the_turn_at_once_with_the_cause(
    fake_codex: FakeCodex, git_repo: Path, answer: str
) -> None:
    # codex's own retry budget again: the stop must come from the engine reading the cause
    config = fake_codex.home / "config.toml"
    config.write_text(
        config.read_text()
        .replace("request_max_retries = 0\n", "request_max_retries = 8\n")
        .replace("stream_max_retries = 0\n", "stream_max_retries = 8\n")
    )
    fake_codex.server.http_error, fake_codex.server.http_error_body = UNKNOWN_MODEL_ANSWERS[answer]
    result = await fake_codex.engine(kill_grace_s=2).run(
        request(fake_codex, git_repo, "Do it", model="gpt-nope")
    )
    assert result.outcome == "failed"
    assert result.error is not None
    assert "model is unknown to the provider" in result.error, result.error
    assert "gpt-nope" in result.error
    assert result.duration_s < 10
    assert 1 <= len(fake_codex.server.response_requests()) < 9
    sent = fake_codex.server.response_requests()[0].body
    assert sent is not None and sent["model"] == "gpt-nope"


async def test_sink_sees_every_event_as_it_arrives(fake_codex: FakeCodex, git_repo: Path) -> None:
    fake_codex.server.enqueue(
        tool_then(shell_call("echo hello-from-shell", "c1")),
        final("All done"),
    )
    seen: list[dict[str, Any]] = []
    lines: list[bytes | None] = []

    def sink(event: dict[str, Any], raw: bytes | None = None) -> None:
        seen.append(event)
        lines.append(raw)

    result = await fake_codex.engine().run(request(fake_codex, git_repo, "Do it", sink=sink))
    assert result.ok
    assert seen == result.events
    # the raw line each event was read from, for consumers that store without re-encoding
    assert all(raw is not None and json.loads(raw) == e for raw, e in zip(lines, seen, strict=True))
    kinds = [(e.get("type"), (e.get("item") or {}).get("type")) for e in seen]
    assert ("item.completed", "command_execution") in kinds
    assert ("item.completed", "agent_message") in kinds
    assert kinds[-1] == ("turn.completed", None)
