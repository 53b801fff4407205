"""Tests for the fake Responses-API server itself (no codex involved)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.fakes.fake_model import (
    FakeModelServer,
    FakeResponse,
    RecordedRequest,
    add_file_patch,
    final,
    shell_call,
    tool_then,
)


def sse_events(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")
    ]


def post(server: FakeModelServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(f"{server.base_url}/responses", json=body, timeout=10)
    assert response.headers["content-type"] == "text/event-stream"
    return sse_events(response.text)


def test_queue_responder_and_fallback() -> None:
    def by_prompt(request: RecordedRequest) -> FakeResponse:
        return final(f"echo: {request.user_texts()[-1]}", output_tokens=3)

    with FakeModelServer() as server:
        server.enqueue(tool_then(shell_call("ls", call_id="c1"), input_tokens=10), by_prompt)
        first = post(server, {"input": []})
        assert [e["type"] for e in first] == [
            "response.created", "response.output_item.done", "response.completed",
        ]  # fmt: skip
        assert first[1]["item"]["name"] == "exec_command"
        assert json.loads(first[1]["item"]["arguments"]) == {"cmd": "ls"}
        assert first[2]["response"]["usage"]["input_tokens"] == 10

        body = {"input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "README.md"},
        ]}  # fmt: skip
        second = post(server, body)
        assert second[1]["item"]["content"][0]["text"] == "echo: hi"
        assert server.requests[1].tool_outputs() == {"c1": "README.md"}
        assert server.requests[1].user_texts() == ["hi"]
        assert server.pending() == 0 and server.unexpected == []

        third = post(server, {"input": []})
        assert "no scripted response" in third[1]["item"]["content"][0]["text"]
        assert len(server.unexpected) == 1


def test_failure_response_and_patch_text() -> None:
    with FakeModelServer() as server:

        def broken(request: RecordedRequest) -> FakeResponse:
            raise KeyError("oops")

        server.enqueue(FakeResponse([], failure="overloaded"), broken)
        events = post(server, {"input": []})
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["error"]["message"] == "overloaded"
        events = post(server, {"input": []})
        assert "responder raised KeyError('oops')" in events[-1]["response"]["error"]["message"]
        assert server.errors == [events[-1]["response"]["error"]["message"]]
        assert httpx.get(f"{server.base_url}/nope", timeout=10).status_code == 404
    assert add_file_patch("a/b.txt", "one\ntwo") == (
        "*** Begin Patch\n*** Add File: a/b.txt\n+one\n+two\n*** End Patch\n"
    )
