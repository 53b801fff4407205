"""The codex engine: runs `codex exec --json` in a worktree and reads its JSONL event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.base import EngineRequest, EngineResult, Outcome, TokenUsage
from engines.structured import parse_json_reply

ENGINE_ID = "codex"

# Variables a codex child may inherit from the worker's environment. Everything else (database
# URLs, forge credentials, our own settings) stays out of reach of model-generated commands.
ENV_ALLOWLIST: frozenset[str] = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LANGUAGE",
        "TMPDIR",
        "USER",
        "LOGNAME",
        "SHELL",
        "TERM",
        "TZ",
        "CODEX_HOME",
        "CODEX_API_KEY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
    }
)
ENV_ALLOW_PREFIXES: tuple[str, ...] = ("LC_",)

# Forge and CI credentials that must never reach the agent, even if a caller passes them.
_FORBIDDEN_NAMES: frozenset[str] = frozenset(
    {"GITHUB_TOKEN", "GH_TOKEN", "GITLAB_TOKEN", "CI_JOB_TOKEN", "GH_ENTERPRISE_TOKEN"}
)
_FORBIDDEN_PREFIXES: tuple[str, ...] = ("DEKSDENFLOW_",)
_FORBIDDEN_SUFFIXES: tuple[str, ...] = ("_TOKEN", "_SECRET", "_PRIVATE_KEY", "_PASSWORD")
# The key codex itself authenticates with is the one secret it must see.
_ALWAYS_ALLOWED: frozenset[str] = frozenset({"CODEX_API_KEY"})

# Limits that keep one chatty run from filling the worker's memory or the database row.
COMMAND_OUTPUT_LIMIT = 4000
STDERR_TAIL_BYTES = 8 * 1024
MAX_EVENTS = 5000
_LINE_LIMIT = 8 * 1024 * 1024
# After the codex process exits, how long stragglers holding its pipes may keep them open.
_PIPE_DRAIN_S = 5.0


def is_forbidden_env(name: str) -> bool:
    """True for variables that look like our settings or a forge/CI credential."""
    if name in _ALWAYS_ALLOWED:
        return False
    upper = name.upper()
    return (
        upper in _FORBIDDEN_NAMES
        or upper.startswith(_FORBIDDEN_PREFIXES)
        or upper.endswith(_FORBIDDEN_SUFFIXES)
    )


def scrub_env(
    base: Mapping[str, str], extra: Mapping[str, str], allow: Iterable[str] = ()
) -> dict[str, str]:
    """The child's environment: allowlisted `base` vars (+ `allow`), then `extra`, minus secrets."""
    allowed = ENV_ALLOWLIST | frozenset(allow)
    env = {
        name: value
        for name, value in base.items()
        if name in allowed or name.startswith(ENV_ALLOW_PREFIXES)
    }
    env.update(extra)
    return {name: value for name, value in env.items() if not is_forbidden_env(name)}


def build_codex_argv(
    request: EngineRequest,
    codex_bin: str,
    last_message_path: Path,
    schema_path: Path | None,
    config_overrides: Sequence[str] = (),
) -> list[str]:
    """The `codex exec` command line for one turn (a resume turn when resume_thread_id is set)."""
    argv = [
        codex_bin,
        "exec",
        "--json",
        "-C",
        str(request.workdir),
        # Always explicit: exec defaults to read-only and still exits 0 when writes fail.
        "--sandbox",
        request.sandbox,
    ]
    if request.model:
        argv += ["-m", request.model]
    argv += ["-o", str(last_message_path)]
    if schema_path is not None:
        argv += ["--output-schema", str(schema_path)]
    # Offline workers would otherwise wait ~5 s at exit for analytics and reach the network
    # at start for plugin sync.
    argv += ["-c", "analytics.enabled=false", "--disable", "plugins"]
    for override in config_overrides:
        argv += ["-c", override]
    if request.resume_thread_id:
        argv += ["resume", request.resume_thread_id]
    # "--" so a prompt starting with "-" is not read as a flag.
    argv += ["--", request.prompt]
    return argv


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… [{len(text) - limit} characters truncated]"


def _compact_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event as stored: command output cut to COMMAND_OUTPUT_LIMIT characters."""
    item = event.get("item")
    if isinstance(item, dict) and item.get("type") == "command_execution":
        output = item.get("aggregated_output")
        if isinstance(output, str) and len(output) > COMMAND_OUTPUT_LIMIT:
            return {
                **event,
                "item": {**item, "aggregated_output": _truncate(output, COMMAND_OUTPUT_LIMIT)},
            }
    return event


@dataclass
class ParsedRun:
    """What a codex JSONL stream told us."""

    thread_id: str | None = None
    final_message: str = ""
    usage: TokenUsage | None = None
    turn_failed: str | None = None
    errors: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    dropped_events: int = 0
    bad_lines: int = 0


class CodexEventParser:
    """Incremental JSONL reader: feed it lines as they arrive, read `.run` at the end."""

    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self.run = ParsedRun()
        self._max_events = max_events

    def feed(self, line: str | bytes) -> dict[str, Any] | None:
        """Parse one line; returns the stored event, or None for blank or non-JSON lines."""
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        text = text.strip()
        if not text:
            return None
        try:
            event = json.loads(text)
        except ValueError:
            self.run.bad_lines += 1
            return None
        if not isinstance(event, dict):
            self.run.bad_lines += 1
            return None
        event = _compact_event(event)
        self._apply(event)
        if len(self.run.events) < self._max_events:
            self.run.events.append(event)
        else:
            self.run.dropped_events += 1
        return event

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "thread.started" and isinstance(event.get("thread_id"), str):
            self.run.thread_id = event["thread_id"]
        elif kind == "turn.completed":
            usage = event.get("usage")
            self.run.usage = TokenUsage.from_mapping(usage if isinstance(usage, dict) else None)
        elif kind == "turn.failed":
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self.run.turn_failed = str(message) if message else "turn failed"
        elif kind == "error":
            # Top-level errors are often non-fatal (reconnect notices); keep them for the log.
            self.run.errors.append(str(event.get("message", "")))
        elif kind == "item.completed":
            item = event.get("item")
            if not isinstance(item, dict):
                return
            if item.get("type") == "agent_message" and isinstance(item.get("text"), str):
                self.run.final_message = item["text"]
            elif item.get("type") == "error" and item.get("message"):
                self.run.errors.append(str(item["message"]))


def parse_codex_events(lines: Iterable[str | bytes]) -> ParsedRun:
    """Parse a whole `codex exec --json` stdout."""
    parser = CodexEventParser()
    for line in lines:
        parser.feed(line)
    return parser.run


def outcome_for_exit(code: int, turn_failed: str | None = None) -> Outcome:
    """Map codex's exit status to an outcome."""
    if code == 0:
        # Exit 0 means the turn completed; a turn.failed in the stream still wins.
        return "failed" if turn_failed else "completed"
    if code == 2:
        return "usage_error"
    # Negative: killed by a signal (asyncio convention); 130/143: SIGINT/SIGTERM handled by codex.
    if code < 0 or code in (130, 143):
        return "cancelled"
    return "failed"


def turn_usage(thread_usage: TokenUsage, previous: TokenUsage | None, resumed: bool) -> TokenUsage:
    """This turn's usage: codex reports the thread's running total, so subtract on resume."""
    if resumed and previous is not None:
        return thread_usage - previous
    return thread_usage


def error_message(
    outcome: Outcome, code: int | None, parsed: ParsedRun, stderr_tail: str
) -> str | None:
    """A human message for a run that did not complete."""
    if outcome == "completed":
        return None
    tail = stderr_tail.strip()
    if parsed.turn_failed:
        return parsed.turn_failed
    if outcome == "usage_error":
        return f"codex rejected its command line (exit 2): {tail[-2000:] or 'no output'}"
    if outcome == "cancelled":
        return f"codex was stopped by a signal (exit {code})"
    detail = parsed.errors[-1] if parsed.errors else tail[-2000:]
    return f"codex failed (exit {code}): {detail or 'no error output'}"


class _Tail:
    """Keeps the last `limit` bytes written to it."""

    def __init__(self, limit: int) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._limit = limit

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self._limit:
            self._size -= len(self._chunks.popleft())

    def text(self) -> str:
        return b"".join(self._chunks)[-self._limit :].decode("utf-8", "replace")


def _ensure_codex_home(env: Mapping[str, str]) -> None:
    """codex refuses to start when CODEX_HOME does not exist."""
    if env.get("CODEX_HOME"):
        Path(env["CODEX_HOME"]).mkdir(parents=True, exist_ok=True)


def _read_text(path: Path) -> str:
    """The file's text, or "" when it is missing, unreadable or blank (small local file)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    return text if text.strip() else ""


# How long a cancelled run's process group gets between SIGTERM and SIGKILL.
CANCEL_GRACE_S = 2.0


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class CodexEngine:
    """Runs the real codex CLI; one `run` is one turn."""

    engine_id = ENGINE_ID

    def __init__(
        self,
        codex_bin: str = "codex",
        *,
        codex_home: str | None = None,
        env_allow: Iterable[str] = (),
        base_env: Mapping[str, str] | None = None,
        config_overrides: Sequence[str] = (),
        kill_grace_s: float = 5.0,
    ) -> None:
        self.codex_bin = codex_bin
        self.codex_home = codex_home
        self.env_allow = tuple(env_allow)
        # None: read os.environ at run time, never at import.
        self._base_env = base_env
        self.config_overrides = tuple(config_overrides)
        self.kill_grace_s = kill_grace_s

    def child_env(self, request: EngineRequest) -> dict[str, str]:
        base = dict(os.environ if self._base_env is None else self._base_env)
        extra = dict(request.env)
        if self.codex_home:
            extra.setdefault("CODEX_HOME", self.codex_home)
        return scrub_env(base, extra, self.env_allow)

    async def run(self, request: EngineRequest) -> EngineResult:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="deksdenflow-codex-") as tmp:
            last_message_path = Path(tmp) / "last-message.txt"
            schema_path: Path | None = None
            if request.output_schema is not None:
                schema_path = Path(tmp) / "output-schema.json"
                schema_path.write_text(json.dumps(request.output_schema))
            argv = build_codex_argv(
                request, self.codex_bin, last_message_path, schema_path, self.config_overrides
            )
            env = self.child_env(request)
            _ensure_codex_home(env)
            result = await self._run_process(request, argv, env, last_message_path, started)
        return result

    async def _run_process(
        self,
        request: EngineRequest,
        argv: list[str],
        env: dict[str, str],
        last_message_path: Path,
        started: float,
    ) -> EngineResult:
        if not request.workdir.is_dir():
            return EngineResult(
                outcome="failed",
                exit_code=None,
                error=f"workdir {request.workdir} does not exist",
                thread_usage=request.previous_usage or TokenUsage(),
                duration_s=time.monotonic() - started,
            )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(request.workdir),
                # Own process group, so a timeout can stop codex and every command it spawned.
                start_new_session=True,
                limit=_LINE_LIMIT,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            return EngineResult(
                outcome="not_found",
                exit_code=None,
                error=(
                    f"cannot run the codex CLI {self.codex_bin!r} ({exc.strerror or exc}); "
                    "install @openai/codex or set DEKSDENFLOW_CODEX_BIN to its path"
                ),
                thread_usage=request.previous_usage or TokenUsage(),
                duration_s=time.monotonic() - started,
            )

        parser = CodexEventParser()
        stderr_tail = _Tail(STDERR_TAIL_BYTES)
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.create_task(self._read_stdout(proc.stdout, parser)),
            asyncio.create_task(self._read_stderr(proc.stderr, stderr_tail)),
        ]
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), timeout=request.timeout_s)
            except TimeoutError:
                timed_out = True
                await self._stop(proc)
            # Readers end at EOF; a straggler that inherited the pipes must not hold us forever.
            _done, pending = await asyncio.wait(readers, timeout=_PIPE_DRAIN_S)
            if pending:
                _signal_group(proc.pid, signal.SIGKILL)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        except asyncio.CancelledError:
            # /cancel or /pause: the whole group goes within seconds, not after a full grace
            await self._stop(proc, grace_s=min(self.kill_grace_s, CANCEL_GRACE_S))
            for task in readers:
                task.cancel()
            raise

        parsed = parser.run
        if parsed.dropped_events:
            parsed.events.append(
                {"type": "deksdenflow.events_dropped", "count": parsed.dropped_events}
            )
        code = proc.returncode
        if timed_out:
            outcome: Outcome = "timeout"
            error: str | None = (
                f"codex did not finish within {request.timeout_s:g} s and was stopped"
            )
        else:
            assert code is not None
            outcome = outcome_for_exit(code, parsed.turn_failed)
            error = error_message(outcome, code, parsed, stderr_tail.text())

        # -o holds exactly the last agent message; prefer it over our own reading.
        final_message = _read_text(last_message_path) or parsed.final_message

        structured: Any | None = None
        parse_error: str | None = None
        if request.output_schema is not None:
            structured, parse_error = parse_json_reply(final_message)

        resumed = request.resume_thread_id is not None
        if parsed.usage is not None:
            thread_usage = parsed.usage
            usage = turn_usage(thread_usage, request.previous_usage, resumed)
        else:
            # No turn.completed: nothing billed that we can see this turn.
            thread_usage = (request.previous_usage if resumed else None) or TokenUsage()
            usage = TokenUsage()

        return EngineResult(
            outcome=outcome,
            exit_code=None if timed_out else code,
            final_message=final_message,
            structured=structured,
            parse_error=parse_error,
            usage=usage,
            thread_usage=thread_usage,
            thread_id=parsed.thread_id or request.resume_thread_id,
            events=parsed.events,
            error=error,
            duration_s=time.monotonic() - started,
        )

    async def _stop(self, proc: asyncio.subprocess.Process, grace_s: float | None = None) -> None:
        """SIGTERM the whole process group, then SIGKILL it after the grace period."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=self.kill_grace_s if grace_s is None else grace_s)
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Commands codex started may ignore SIGTERM even after codex itself has gone.
        _signal_group(proc.pid, signal.SIGKILL)

    @staticmethod
    async def _read_stdout(stream: asyncio.StreamReader, parser: CodexEventParser) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                # A line over _LINE_LIMIT: asyncio has discarded it; keep reading.
                parser.run.bad_lines += 1
                continue
            if not line:
                return
            parser.feed(line)

    @staticmethod
    async def _read_stderr(stream: asyncio.StreamReader, tail: _Tail) -> None:
        while chunk := await stream.read(65536):
            tail.write(chunk)
