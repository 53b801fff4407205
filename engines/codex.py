"""The codex engine: runs `codex exec --json` in a worktree and reads its JSONL event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.base import (
    LINES_SINK_MAX_LINE,
    EngineRequest,
    EngineResult,
    EventSink,
    LinesSink,
    Outcome,
    TokenUsage,
)
from engines.lifetime import die_with_parent
from engines.structured import parse_json_reply

ENGINE_ID = "codex"

log = logging.getLogger(__name__)

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

# The agent's sandbox: /tmp and the worker's $TMPDIR are not writable (Codex would otherwise add
# both, and a DATA_DIR below either would expose the bot's mirrors, hooks and database).
SANDBOX_OVERRIDES: tuple[str, ...] = (
    "sandbox_workspace_write.exclude_slash_tmp=true",
    "sandbox_workspace_write.exclude_tmpdir_env_var=true",
)
# What the agent's commands see of codex's own environment: a short allow-list, and never a key
# (Codex's default excludes *KEY*/*SECRET*/*TOKEN*; ours are explicit on top).
SHELL_ENV_INCLUDE: tuple[str, ...] = (
    "PATH", "HOME", "TMPDIR", "LANG", "LANGUAGE", "LC_*", "USER", "LOGNAME", "SHELL", "TERM", "TZ",
)  # fmt: skip
SHELL_ENV_EXCLUDE: tuple[str, ...] = (
    "CODEX_API_KEY", "OPENAI_API_KEY", "DEKSDENFLOW_*", "*KEY*", "*SECRET*", "*TOKEN*",
    "*PASSWORD*", "*CREDENTIAL*",
)  # fmt: skip
# What a per-run CODEX_HOME gets from the configured one: only what Codex needs to start.
CODEX_HOME_FILES: tuple[str, ...] = ("config.toml", "auth.json")


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ",".join(json.dumps(v) for v in values) + "]"


def sandbox_overrides(writable: Sequence[Path] = ()) -> list[str]:
    """The `-c` overrides that fence the agent in (pure)."""
    out = [
        *SANDBOX_OVERRIDES,
        'shell_environment_policy.inherit="all"',
        "shell_environment_policy.ignore_default_excludes=false",
        f"shell_environment_policy.exclude={_toml_list(SHELL_ENV_EXCLUDE)}",
        f"shell_environment_policy.include_only={_toml_list(SHELL_ENV_INCLUDE)}",
    ]
    if writable:
        out.append(f"sandbox_workspace_write.writable_roots={_toml_list(str(p) for p in writable)}")
    return out


# Limits that keep one chatty run from filling the worker's memory or the database row.
COMMAND_OUTPUT_LIMIT = 4000
STDERR_TAIL_BYTES = 8 * 1024
MAX_EVENTS = 5000
_LINE_LIMIT = 8 * 1024 * 1024
_READ_SIZE = 64 * 1024  # stdout is read in blocks of up to this, then split into lines
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
    # "-": the prompt comes on stdin. One argv element is capped at 128 KB on Linux (E2BIG),
    # and a plan, context or CI log can be longer than that.
    argv.append("-")
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


# Errors no retry can fix: codex would reconnect (5 times, with backoff) and then fail anyway, or,
# with retries configured higher, sit until the job timeout. Matched on the error text codex
# prints, which carries the provider's HTTP status ("unexpected status 401 Unauthorized: …").
_FATAL_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"\b401\b|unauthori[sz]ed|invalid[_ ]api[_ ]key|incorrect api key", re.I),
        "the model provider refused the credentials",
    ),
    (re.compile(r"\b403\b|forbidden", re.I), "the model provider refused access"),
    (
        re.compile(
            r"model[_ ]not[_ ]found|unknown model|model .{0,80}does not exist|"
            r"unsupported model|not a (?:valid|supported) model",
            re.I,
        ),
        "the model is unknown to the provider",
    ),
    (
        re.compile(r"missing environment variable|api key (?:is )?missing|no api key", re.I),
        "no API key reached codex",
    ),
)


def fatal_cause(event: Mapping[str, Any]) -> str | None:
    """The cause when `event` reports an error that retrying cannot fix, else None (pure)."""
    kind = event.get("type")
    message: Any = None
    if kind == "error":
        message = event.get("message")
    elif kind == "turn.failed":
        error = event.get("error")
        message = error.get("message") if isinstance(error, dict) else None
    elif kind in ("item.completed", "item.started"):
        item = event.get("item")
        if isinstance(item, dict) and item.get("type") == "error":
            message = item.get("message")
    if not isinstance(message, str) or not message:
        return None
    for pattern, what in _FATAL_PATTERNS:
        if pattern.search(message):
            return f"{what}: {_truncate(message.strip(), 500)}"
    return None


# stderr lines codex always prints, which say nothing about why a turn failed.
_STDERR_NOISE = ("Reading additional input from stdin", "WARNING: proceeding, even though")


def stderr_cause(stderr_tail: str, limit: int = 800) -> str:
    """The informative end of codex's stderr: noise lines dropped, at most `limit` characters."""
    lines = [
        line.rstrip()
        for line in stderr_tail.splitlines()
        if line.strip() and not line.lstrip().startswith(_STDERR_NOISE)
    ]
    return "\n".join(lines)[-limit:]


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
    if outcome == "usage_error":
        return f"codex rejected its command line (exit 2): {tail[-2000:] or 'no output'}"
    if outcome == "cancelled":
        return f"codex was stopped by a signal (exit {code})"
    cause = stderr_cause(stderr_tail)
    if parsed.turn_failed:
        # the stream says what failed; stderr often says why (config, auth, sandbox)
        return parsed.turn_failed + (f"\nstderr: {cause}" if cause else "")
    detail = parsed.errors[-1] if parsed.errors else tail[-2000:]
    message = f"codex failed (exit {code}): {detail or 'no error output'}"
    if parsed.errors and cause:
        message += f"\nstderr: {cause}"
    return message


def timeout_error(timeout_s: float, parsed: ParsedRun, stderr_tail: str) -> str:
    """The error of a run stopped at its timeout, with the last cause codex gave, if any."""
    cause = parsed.turn_failed or (parsed.errors[-1] if parsed.errors else "")
    cause = cause or stderr_cause(stderr_tail)
    return f"codex did not finish within {timeout_s:g} s and was stopped" + (
        f"; last error: {_truncate(cause, 800)}" if cause else ""
    )


def stopped_early_error(cause: str | None, stderr_tail: str) -> str:
    """The error of a run stopped on a fatal stream error, with stderr's cause, if any."""
    error = f"codex stopped early: {cause}"
    if tail := stderr_cause(stderr_tail):
        error += f"\nstderr: {tail}"
    return error


def run_usage(
    request: EngineRequest, parsed: ParsedRun, run_codex_home: Path | None
) -> tuple[TokenUsage, TokenUsage]:
    """(this turn's usage, the thread's usage so far) of a finished run."""
    resumed = request.resume_thread_id is not None
    recorded = parsed.usage
    if recorded is None and run_codex_home is not None:
        # stopped before turn.completed (timeout, failure): what codex recorded was billed
        recorded = usage_from_sessions(run_codex_home, parsed.thread_id or request.resume_thread_id)
    if recorded is not None:
        return turn_usage(recorded, request.previous_usage, resumed), recorded
    # No turn.completed: nothing billed that we can see this turn.
    return TokenUsage(), (request.previous_usage if resumed else None) or TokenUsage()


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


def source_codex_home(env: Mapping[str, str]) -> Path | None:
    """The configured CODEX_HOME (config, auth, saved sessions), default `~/.codex`."""
    if env.get("CODEX_HOME"):
        return Path(env["CODEX_HOME"])
    if env.get("HOME"):
        return Path(env["HOME"]) / ".codex"
    return None


@dataclass(frozen=True)
class RunDirs:
    """A run's private directories inside its scratch dir (mode 0700, removed afterwards)."""

    home: Path  # HOME: empty, writable by the agent
    tmp: Path  # TMPDIR: empty, writable by the agent
    codex_home: Path  # CODEX_HOME: config and auth copied in; not writable by the agent


def _session_files(codex_home: Path, thread_id: str) -> list[Path]:
    sessions = codex_home / "sessions"
    if not thread_id or not sessions.is_dir() or "/" in thread_id:
        return []
    return sorted(sessions.rglob(f"rollout-*{thread_id}.jsonl"))


def _copy_private(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copyfile(src, dst)
    dst.chmod(0o600)


def prepare_run_dirs(scratch: Path, source: Path | None, resume_thread_id: str | None) -> RunDirs:
    """HOME, TMPDIR and CODEX_HOME for one run: nothing of the worker's home is visible.

    The per-run CODEX_HOME gets config.toml and auth.json, plus the saved session of the thread
    being resumed, and nothing else (no other thread's history, no logs of earlier runs).
    """
    dirs = RunDirs(scratch / "home", scratch / "tmp", scratch / "codex-home")
    for path in (dirs.home, dirs.tmp, dirs.codex_home):
        path.mkdir(mode=0o700)
    if source is not None and source.is_dir():
        for name in CODEX_HOME_FILES:
            if (source / name).is_file():
                _copy_private(source / name, dirs.codex_home / name)
        for found in _session_files(source, resume_thread_id or ""):
            _copy_private(found, dirs.codex_home / found.relative_to(source))
    return dirs


@dataclass(frozen=True)
class EngineUser:
    """The unprivileged account the agent runs as (DEKSDENFLOW_ENGINE_USER)."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, name: str) -> EngineUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ValueError(f"engine user {name!r} does not exist") from None
        return cls(name, entry.pw_uid, entry.pw_gid)

    def argv_prefix(self) -> list[str]:
        """setpriv drops to the user before codex starts; codex then builds its own sandbox."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]


def chown_tree(root: Path, uid: int, gid: int, *, skip: frozenset[str] = frozenset()) -> None:
    """lchown every entry below `root` (never following a link the agent may have planted)."""
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in (*dirnames, *filenames):
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(dirpath, name), uid, gid)


def save_sessions(run_home: Path, source: Path | None, thread_id: str | None) -> None:
    """Keep the thread's session in the configured CODEX_HOME, so a later turn can resume it."""
    if source is None or not thread_id:
        return
    for found in _session_files(run_home, thread_id):
        _copy_private(found, source / found.relative_to(run_home))


def usage_from_sessions(codex_home: Path, thread_id: str | None) -> TokenUsage | None:
    """The thread's running token total as codex last recorded it in its session file.

    The JSONL stream reports usage only in turn.completed; a turn stopped by our timeout never
    gets there, but codex has written a token record after every model response by then.
    """
    if not thread_id:
        return None
    found: TokenUsage | None = None
    for path in _session_files(codex_home, thread_id):
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if "token" not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            payload = record.get("payload") if isinstance(record, dict) else None
            if not isinstance(payload, dict):
                continue
            total: Any = None
            if record.get("type") == "token_usage_record":
                total = payload.get("thread_token_usage")
            elif payload.get("type") == "token_count" and isinstance(payload.get("info"), dict):
                total = payload["info"].get("total_token_usage")
            if isinstance(total, dict):
                found = TokenUsage.from_mapping(total)
    return found


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


class _StreamWatch:
    """Hands the turn's JSONL to the request's sinks and notices errors that end it for good."""

    def __init__(self, sink: EventSink | None, lines_sink: LinesSink | None = None) -> None:
        self.sink = sink
        self.lines_sink = lines_sink
        self.fatal = asyncio.Event()
        self.cause: str | None = None

    def block(self, data: bytes, parser: CodexEventParser) -> None:
        """Whole lines as read (`data` ends with a newline): each parsed and watched.

        With a LinesSink the bytes go on in one piece, one call per block: the per-line work
        is the engine's own parsing, nothing more.
        """
        lines = data.split(b"\n")
        lines.pop()  # the empty rest after the last newline
        keep = self.lines_sink
        if keep is None:
            for line in lines:
                if (event := parser.feed(line)) is not None:
                    self.see(event, line)
            return
        if len(data) > LINES_SINK_MAX_LINE and max(map(len, lines)) >= LINES_SINK_MAX_LINE:
            self._block_with_long_lines(data, lines, parser)
            return
        for line in lines:
            if (event := parser.feed(line)) is not None:
                self.check(event)
        self.keep(data, len(lines))

    def _block_with_long_lines(
        self, data: bytes, lines: list[bytes], parser: CodexEventParser
    ) -> None:
        # the runs of ordinary lines go on as bytes, each long line as its compacted event
        start = offset = count = 0
        for line in lines:
            end = offset + len(line) + 1
            event = parser.feed(line)
            if len(line) >= LINES_SINK_MAX_LINE:
                if count:
                    self.keep(data[start:offset], count)
                start, count = end, 0
                if event is not None:
                    self.see(event)
            else:
                count += 1
                if event is not None:
                    self.check(event)
            offset = end
        if count:
            self.keep(data[start:], count)

    def keep(self, data: bytes, lines: int) -> None:
        if self.lines_sink is not None:
            try:
                self.lines_sink(data, lines)
            except Exception:  # a broken consumer must not break the turn; drop it
                log.exception("transcript sink failed; the rest of this turn is not recorded")
                self.lines_sink = self.sink = None

    def see(self, event: dict[str, Any], raw: bytes | None = None) -> None:
        if self.sink is not None:
            try:
                self.sink(event, raw)
            except Exception:  # a broken consumer must not break the turn; drop it
                log.exception("transcript sink failed; the rest of this turn is not recorded")
                self.sink = self.lines_sink = None
        self.check(event)

    def check(self, event: dict[str, Any]) -> None:
        if self.cause is None and event.get("type") != "turn.failed":
            cause = fatal_cause(event)
            if cause is not None:
                self.cause = cause
                self.fatal.set()


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
        scratch_root: str | None = None,
        run_as: str | None = None,
    ) -> None:
        self.codex_bin = codex_bin
        self.codex_home = codex_home
        self.env_allow = tuple(env_allow)
        # None: read os.environ at run time, never at import.
        self._base_env = base_env
        self.config_overrides = tuple(config_overrides)
        self.kill_grace_s = kill_grace_s
        # Where per-run scratch dirs go (None: the system's temp dir). Codex never makes it
        # writable for the agent: only the run's own HOME and TMPDIR inside it.
        self.scratch_root = scratch_root
        # An unprivileged account for codex and every command of the agent: it cannot read the
        # worker's database, keys, stored credentials or /proc. None: the worker's own user.
        self.run_as = run_as

    def child_env(self, request: EngineRequest) -> dict[str, str]:
        base = dict(os.environ if self._base_env is None else self._base_env)
        extra = dict(request.env)
        if self.codex_home:
            extra.setdefault("CODEX_HOME", self.codex_home)
        return scrub_env(base, extra, self.env_allow)

    async def run(self, request: EngineRequest) -> EngineResult:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="deksdenflow-codex-", dir=self.scratch_root) as tmp:
            scratch = Path(tmp)
            last_message_path = scratch / "last-message.txt"
            schema_path: Path | None = None
            if request.output_schema is not None:
                schema_path = scratch / "output-schema.json"
                schema_path.write_text(json.dumps(request.output_schema))
            env = self.child_env(request)
            source = source_codex_home(env)
            if source is not None and env.get("CODEX_HOME"):
                source.mkdir(parents=True, exist_ok=True, mode=0o700)
            dirs = prepare_run_dirs(scratch, source, request.resume_thread_id)
            env.update(HOME=str(dirs.home), TMPDIR=str(dirs.tmp), CODEX_HOME=str(dirs.codex_home))
            user = EngineUser.lookup(self.run_as) if self.run_as else None
            if user is not None:
                # the agent's own git refuses a repository whose metadata another user owns
                (dirs.home / ".gitconfig").write_text("[safe]\n\tdirectory = *\n")
                chown_tree(scratch, user.uid, user.gid)
            # ours last: a configured override must not reopen /tmp or hand the agent a key
            overrides = [*self.config_overrides, *sandbox_overrides([dirs.home, dirs.tmp])]
            argv = build_codex_argv(
                request, self.codex_bin, last_message_path, schema_path, overrides
            )
            if user is None:
                result = await self._run_process(
                    request, argv, env, last_message_path, started, dirs.codex_home
                )
            else:
                result = await self._run_as(
                    user, request, argv, env, last_message_path, started, dirs
                )
            save_sessions(dirs.codex_home, source, result.thread_id)
        return result

    async def _run_process(
        self,
        request: EngineRequest,
        argv: list[str],
        env: dict[str, str],
        last_message_path: Path,
        started: float,
        run_codex_home: Path | None = None,
    ) -> EngineResult:
        proc = await self._spawn(request, argv, env, started)
        if isinstance(proc, EngineResult):
            return proc
        parser = CodexEventParser()
        stderr_tail = _Tail(STDERR_TAIL_BYTES)
        watch = _StreamWatch(request.sink, request.lines_sink)
        timed_out, stopped_early = await self._supervise(proc, request, parser, stderr_tail, watch)

        parsed = parser.run
        if parsed.dropped_events:
            parsed.events.append(
                {"type": "deksdenflow.events_dropped", "count": parsed.dropped_events}
            )
        code = proc.returncode
        if timed_out:
            outcome: Outcome = "timeout"
            error: str | None = timeout_error(request.timeout_s, parsed, stderr_tail.text())
        elif stopped_early:
            outcome = "failed"
            error = stopped_early_error(watch.cause, stderr_tail.text())
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

        usage, thread_usage = run_usage(request, parsed, run_codex_home)
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

    async def _spawn(
        self, request: EngineRequest, argv: list[str], env: dict[str, str], started: float
    ) -> asyncio.subprocess.Process | EngineResult:
        """Start codex in the request's workdir, or the result that says why it could not."""
        if not request.workdir.is_dir():
            return EngineResult(
                outcome="failed",
                exit_code=None,
                error=f"workdir {request.workdir} does not exist",
                thread_usage=request.previous_usage or TokenUsage(),
                duration_s=time.monotonic() - started,
            )
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                # the prompt goes in on stdin ("-"), then EOF: codex never waits on an open pipe
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(request.workdir),
                # Own process group, so a timeout can stop codex and every command it spawned.
                start_new_session=True,
                # ... and it dies with this worker, even a SIGKILLed one (engines/lifetime.py)
                preexec_fn=die_with_parent(),
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

    async def _supervise(
        self,
        proc: asyncio.subprocess.Process,
        request: EngineRequest,
        parser: CodexEventParser,
        stderr_tail: _Tail,
        watch: _StreamWatch,
    ) -> tuple[bool, bool]:
        """Feed codex its prompt and read its output until it ends or is stopped.

        Returns (timed out, stopped early on a fatal stream error); a cancelled run stops the
        process group and re-raises.
        """
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdin is not None
        readers = [
            asyncio.create_task(self._read_stdout(proc.stdout, parser, watch)),
            asyncio.create_task(self._read_stderr(proc.stderr, stderr_tail)),
            asyncio.create_task(self._write_stdin(proc.stdin, request.prompt.encode("utf-8"))),
        ]
        timed_out = stopped_early = False
        exited = asyncio.create_task(proc.wait())
        fatal_seen = asyncio.create_task(watch.fatal.wait())
        try:
            try:
                # Whichever comes first: codex exits, the stream reports an error no retry can
                # fix (stop now instead of waiting out its reconnects or our timeout), or time.
                await asyncio.wait(
                    (exited, fatal_seen),
                    timeout=request.timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not exited.done():
                    stopped_early = watch.fatal.is_set()
                    timed_out = not stopped_early
                    await self._stop(proc)
            finally:
                fatal_seen.cancel()
                if not exited.done():
                    exited.cancel()
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
        return timed_out, stopped_early

    async def _run_as(
        self,
        user: EngineUser,
        request: EngineRequest,
        argv: list[str],
        env: dict[str, str],
        last_message_path: Path,
        started: float,
        dirs: RunDirs,
    ) -> EngineResult:
        """One run as `user`: the worktree is theirs for the run, the bot's again afterwards.

        `.git` stays the bot's: the link the bot checks before each git command is never
        writable by the agent's account.
        """
        workdir = request.workdir
        me_uid, me_gid = os.geteuid(), os.getegid()
        if workdir.is_dir():
            await asyncio.to_thread(
                chown_tree, workdir, user.uid, user.gid, skip=frozenset({".git"})
            )
        try:
            return await self._run_process(
                request, user.argv_prefix() + argv, env, last_message_path, started, dirs.codex_home
            )
        finally:
            if workdir.is_dir():
                await asyncio.to_thread(chown_tree, workdir, me_uid, me_gid)

    async def _stop(self, proc: asyncio.subprocess.Process, grace_s: float | None = None) -> None:
        """SIGTERM the whole process group, then SIGKILL it after the grace period."""
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(
                proc.wait(), timeout=self.kill_grace_s if grace_s is None else grace_s
            )
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Commands codex started may ignore SIGTERM even after codex itself has gone.
        _signal_group(proc.pid, signal.SIGKILL)

    @staticmethod
    async def _read_stdout(
        stream: asyncio.StreamReader, parser: CodexEventParser, watch: _StreamWatch
    ) -> None:
        # Blocks as codex writes them, cut at the last newline: each event is seen as soon as
        # its line is complete, and one await serves a block of lines, not each line.
        pending: list[bytes] = []  # the start of a line not complete yet
        size = 0
        skipping = False  # inside a line over _LINE_LIMIT: dropped, counted as a bad line
        while data := await stream.read(_READ_SIZE):
            end = data.rfind(b"\n") + 1
            if not end:
                if not skipping:
                    pending.append(data)
                    size += len(data)
                    if size > _LINE_LIMIT:
                        parser.run.bad_lines += 1
                        pending, size, skipping = [], 0, True
                continue
            start = 0
            if skipping:
                start, skipping = data.find(b"\n") + 1, False
            if pending:
                pending.append(data[:end])
                whole = b"".join(pending)
                pending, size = [], 0
            else:
                whole = data[start:end]
            if end < len(data):
                pending, size = [data[end:]], len(data) - end
            if whole:
                watch.block(whole, parser)
        if pending and not skipping:  # a last line with no newline
            watch.block(b"".join(pending) + b"\n", parser)
        watch.keep(b"", 0)  # the end: the consumer need not wait for the turn to finish

    @staticmethod
    async def _write_stdin(stream: asyncio.StreamWriter, data: bytes) -> None:
        # A codex that exits early (bad flag, killed) closes its end: not our error to report.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stream.write(data)
            await stream.drain()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stream.close()
            await stream.wait_closed()

    @staticmethod
    async def _read_stderr(stream: asyncio.StreamReader, tail: _Tail) -> None:
        while chunk := await stream.read(65536):
            tail.write(chunk)
