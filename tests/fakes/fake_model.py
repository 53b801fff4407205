"""A local fake of the OpenAI Responses API that the real codex CLI can talk to in tests."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

JSON = dict[str, Any]


@dataclass(frozen=True)
class FakeResponse:
    """One model sampling: the output items codex receives, then the usage it is billed."""

    items: Sequence[JSON]
    input_tokens: int = 100
    cached_input_tokens: int = 0
    output_tokens: int = 20
    reasoning_output_tokens: int = 0
    # When set, the stream ends with response.failed carrying this message instead of
    # response.completed: codex turns it into turn.failed (no retries in our config).
    failure: str | None = None

    def usage(self) -> JSON:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_input_tokens},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_output_tokens},
            "total_tokens": self.input_tokens + self.output_tokens,
        }


def assistant_message(text: str) -> JSON:
    """The final assistant message item."""
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text}],
    }


def shell_call(cmd: str, call_id: str = "call_shell") -> JSON:
    """A function_call item asking codex to run a shell command."""
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": "exec_command",
        "arguments": json.dumps({"cmd": cmd}),
    }


def apply_patch_call(patch: str, call_id: str = "call_patch") -> JSON:
    """A custom_tool_call item asking codex to apply a patch in its own patch grammar."""
    return {"type": "custom_tool_call", "call_id": call_id, "name": "apply_patch", "input": patch}


def add_file_patch(path: str, content: str) -> str:
    """The apply_patch text that creates `path` (relative to the workdir) with `content`."""
    lines = content.splitlines() or [""]
    body = "".join(f"+{line}\n" for line in lines)
    return f"*** Begin Patch\n*** Add File: {path}\n{body}*** End Patch\n"


def final(
    text: str,
    *,
    input_tokens: int = 100,
    cached_input_tokens: int = 0,
    output_tokens: int = 20,
    reasoning_output_tokens: int = 0,
) -> FakeResponse:
    """A response that ends the turn with an assistant message."""
    return FakeResponse(
        [assistant_message(text)],
        input_tokens,
        cached_input_tokens,
        output_tokens,
        reasoning_output_tokens,
    )


def tool_then(
    item: JSON,
    *,
    input_tokens: int = 100,
    cached_input_tokens: int = 0,
    output_tokens: int = 20,
    reasoning_output_tokens: int = 0,
) -> FakeResponse:
    """A response that only calls a tool; codex comes back with its output in the next request."""
    return FakeResponse(
        [item], input_tokens, cached_input_tokens, output_tokens, reasoning_output_tokens
    )


@dataclass
class RecordedRequest:
    """What codex sent us, kept for assertions."""

    method: str
    path: str
    headers: dict[str, str]
    body: JSON | None

    def input_items(self) -> list[JSON]:
        items = (self.body or {}).get("input", [])
        return [i for i in items if isinstance(i, dict)]

    def tool_outputs(self) -> dict[str, Any]:
        """call_id -> output of every earlier tool call this request carries."""
        return {
            str(i["call_id"]): i.get("output")
            for i in self.input_items()
            if i.get("type") in ("function_call_output", "custom_tool_call_output")
        }

    def user_texts(self) -> list[str]:
        texts: list[str] = []
        for item in self.input_items():
            if item.get("type") == "message" and item.get("role") == "user":
                for part in item.get("content", []):
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        texts.append(part["text"])
        return texts


# A responder decides the reply from the request (e.g. by looking at request.user_texts()).
Responder = Callable[[RecordedRequest], FakeResponse]


@dataclass
class FakeModelServer:
    """Threaded HTTP server answering POST /v1/responses from a programmable queue.

    Each POST pops one entry (a FakeResponse, or a Responder called with the request body).
    When the queue is empty it answers `fallback_text` and records the request in `unexpected`,
    so a test that under-scripts sees a clear failure instead of a hang. A responder that
    raises makes the stream fail (codex reports turn.failed); the error lands in `errors`.
    """

    fallback_text: str = "fake model: no scripted response left"
    requests: list[RecordedRequest] = field(default_factory=list)
    unexpected: list[RecordedRequest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # When set, every POST /responses answers this HTTP status with an OpenAI-style error body
    # (e.g. 401 for a wrong key), as a provider refusing the request would.
    http_error: int | None = None
    # ... with this body instead of the wrong-key one (e.g. an unknown model's `model_not_found`)
    http_error_body: dict[str, Any] | None = None
    _queue: deque[FakeResponse | Responder] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _counter: int = 0

    # -- programming -----------------------------------------------------------------------
    def enqueue(self, *responses: FakeResponse | Responder) -> None:
        with self._lock:
            self._queue.extend(responses)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def response_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/responses")]

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """What goes into config.toml: codex appends /responses itself."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeModelServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: the connection closes after each response, which is how codex learns
            # the event stream has ended.
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                return

            def do_GET(self) -> None:
                server._record(self, None)
                # codex may probe /models; an empty list keeps it on the configured model.
                self._send_json(
                    200 if self.path.endswith("/models") else 404, {"data": [], "models": []}
                )

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                recorded = server._record(self, body if isinstance(body, dict) else None)
                if not self.path.endswith("/responses"):
                    self._send_json(404, {"error": {"message": f"fake: no route {self.path}"}})
                    return
                if server.http_error is not None:
                    self._send_json(
                        server.http_error,
                        server.http_error_body
                        or {
                            "error": {
                                "message": "Incorrect API key provided",
                                "code": "invalid_api_key",
                            }
                        },
                    )
                    return
                response = server._next(recorded)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                for event in server._events(response):
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.wfile.flush()

            def _send_json(self, status: int, payload: JSON) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A short poll interval keeps stop() (and so each test's teardown) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------
    def _record(self, handler: BaseHTTPRequestHandler, body: JSON | None) -> RecordedRequest:
        recorded = RecordedRequest(
            method=handler.command,
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
        )
        with self._lock:
            self.requests.append(recorded)
        return recorded

    def _next(self, recorded: RecordedRequest) -> FakeResponse:
        with self._lock:
            entry = self._queue.popleft() if self._queue else None
            self._counter += 1
        if entry is None:
            with self._lock:
                self.unexpected.append(recorded)
            return final(self.fallback_text)
        if isinstance(entry, FakeResponse):
            return entry
        try:
            return entry(recorded)
        except Exception as exc:  # a bug in a test's responder: fail the stream, loudly
            message = f"fake model responder raised {exc!r}"
            with self._lock:
                self.errors.append(message)
            return FakeResponse([], failure=message)

    def _events(self, response: FakeResponse) -> Iterator[JSON]:
        response_id = f"resp_{self._counter}"
        yield {"type": "response.created", "response": {"id": response_id}}
        for n, item in enumerate(response.items):
            # codex wants ids on output items; give each a stable one unless scripted.
            yield {
                "type": "response.output_item.done",
                "item": {"id": f"item_{self._counter}_{n}", **item},
            }
        if response.failure is not None:
            yield {
                "type": "response.failed",
                "response": {
                    "id": response_id,
                    "error": {"code": "server_error", "message": response.failure},
                },
            }
            return
        yield {
            "type": "response.completed",
            "response": {"id": response_id, "usage": response.usage()},
        }


def write_codex_home(home: Path, base_url: str, *, env_key: str = "FAKE_MODEL_KEY") -> Path:
    """Create a CODEX_HOME whose config.toml points codex at the fake server."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        'model_provider = "fake"\n'
        'model = "gpt-5.5"\n'
        "\n"
        "[model_providers.fake]\n"
        'name = "Fake model"\n'
        f'base_url = "{base_url}"\n'
        f'env_key = "{env_key}"\n'
        'wire_api = "responses"\n'
        "request_max_retries = 0\n"
        "stream_max_retries = 0\n"
    )
    return home
