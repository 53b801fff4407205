"""The scripted engine: deterministic, offline answers read from an editable YAML script."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import itertools
import json
import re
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bot.core.errors import EngineError
from engines.base import EngineRequest, EngineResult, EventSink, TokenUsage

ENGINE_ID = "scripted"
DEFAULT_SCRIPT_PATH = Path(__file__).with_name("scripted_default.yml")

_PLACEHOLDER = re.compile(r"\{(task|protocol|slug|title|step_index|phase)\}")
_VERDICTS = ("PASS", "FAIL")


def fill(text: str, context: Mapping[str, Any]) -> str:
    """Replace the known {placeholders} only, so code and JSON braces survive untouched."""

    def sub(match: re.Match[str]) -> str:
        value = context.get(match.group(1))
        return match.group(0) if value is None else str(value)

    return _PLACEHOLDER.sub(sub, text)


def fill_deep(value: Any, context: Mapping[str, Any]) -> Any:
    """fill() applied to every string inside a YAML value."""
    if isinstance(value, str):
        return fill(value, context)
    if isinstance(value, list):
        return [fill_deep(v, context) for v in value]
    if isinstance(value, dict):
        return {k: fill_deep(v, context) for k, v in value.items()}
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EngineError(f"scripted engine: {where} must be a mapping, got {type(value).__name__}")
    return value


def _entry(value: Any, where: str) -> dict[str, Any]:
    # A bare string is shorthand for the call's main text (decompose markdown, message).
    if isinstance(value, str):
        return {"text": value}
    return dict(_mapping(value, where))


def step_section(phase_section: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """The per-step entry of a phase (by slug, then by index), merged over its `default`."""
    default = _entry(phase_section.get("default"), "default")
    steps = _mapping(phase_section.get("steps"), "steps")
    slug = context.get("slug")
    index = context.get("step_index")
    candidates: list[Any] = [slug]
    if index is not None:
        # YAML keys may be ints (1:) or strings ("1", "01").
        candidates += [index, str(index)]
        if isinstance(index, int):
            candidates.append(f"{index:02d}")
    for key in candidates:
        if key is not None and key in steps:
            return {**default, **_entry(steps[key], f"steps.{key}")}
    return default


def usage_from(*sections: Mapping[str, Any]) -> TokenUsage:
    """The most specific `usage:` among the sections (call, phase, top level)."""
    for section in sections:
        usage = section.get("usage")
        if isinstance(usage, Mapping):
            return TokenUsage.from_mapping(usage)
    return TokenUsage(input_tokens=100, output_tokens=50)


def qa_verdict(section: Mapping[str, Any], attempt: int) -> str:
    """The verdict for the 1-based QA `attempt`; the last listed verdict repeats."""
    verdicts = section.get("verdicts", section.get("verdict", "PASS"))
    if isinstance(verdicts, str):
        verdicts = [verdicts]
    if not isinstance(verdicts, list) or not verdicts:
        verdicts = ["PASS"]
    verdict = str(verdicts[min(max(attempt, 1), len(verdicts)) - 1]).strip().upper()
    return verdict if verdict in _VERDICTS else "FAIL"


def build_plan(section: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """The planning reply: exactly the keys protocol-planning.schema.json allows."""
    filled = fill_deep(copy.deepcopy(dict(section)), context)
    steps = filled.get("steps") or []
    return {
        "title": str(filled.get("title") or context.get("task") or "Scripted protocol")[:200],
        "plan": str(filled.get("plan") or "# Plan\n"),
        "context": str(filled.get("context") or ""),
        "log": str(filled.get("log") or ""),
        "setup": str(filled.get("setup") or "# Setup\n"),
        "steps": [
            {
                "slug": str(step.get("slug")),
                "title": str(step.get("title")),
                "content": str(step.get("content") or f"# {step.get('title')}\n"),
                "commit_type": str(step.get("commit_type") or "feat"),
                "qa_policy": str(step.get("qa_policy") or "light"),
                "max_fix_attempts": step.get("max_fix_attempts"),
                # a step without `depends_on` in the script depends on the previous one
                "depends_on": step.get("depends_on"),
            }
            for step in steps
            if isinstance(step, dict)
        ],
    }


def _inside(workdir: Path, relative: str) -> Path:
    target = (workdir / relative).resolve()
    root = workdir.resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(root):
        raise EngineError(f"scripted engine: file path {relative!r} leaves the workdir")
    return target


def apply_files(workdir: Path, files: Any) -> list[dict[str, str]]:
    """Perform the scripted file edits; returns codex-style `changes` entries."""
    changes: list[dict[str, str]] = []
    for spec in files or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            raise EngineError(f"scripted engine: bad file entry {spec!r} (needs a path)")
        target = _inside(workdir, spec["path"])
        existed = target.exists()
        if spec.get("delete"):
            if existed:
                target.unlink()
                changes.append({"path": str(target), "kind": "delete"})
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if "content" in spec:
            target.write_text(str(spec["content"]))
        elif "append" in spec:
            with target.open("a") as handle:
                handle.write(str(spec["append"]))
        else:
            raise EngineError(
                f"scripted engine: file {spec['path']!r} needs content, append or delete"
            )
        changes.append({"path": str(target), "kind": "update" if existed else "add"})
    return changes


def _delay(section: Mapping[str, Any]) -> float:
    """`delay_s:` of a call or phase section: a non-negative number of seconds."""
    try:
        delay = float(section.get("delay_s", 0) or 0)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"scripted engine: delay_s must be a number: {exc}") from exc
    if delay < 0:
        raise EngineError("scripted engine: delay_s must not be negative")
    return delay


@dataclass
class _Reply:
    message: str
    usage: TokenUsage
    structured: Any | None = None
    changes: list[dict[str, str]] | None = None
    fail: str | None = None
    reasoning: str | None = None
    commands: list[Any] | None = None
    pace_s: float = 0.0
    # seconds the call waits before answering, like a model call does (bench/scale.py)
    delay_s: float = 0.0


_COMMAND_TIMEOUT_S = 30.0
_OUTPUT_LIMIT = 4000


async def run_command(workdir: Path, spec: Any) -> dict[str, Any]:
    """Run one scripted command for real in the workdir; a codex-style command item.

    Real runs, so the transcript shows true output; `sh -c` like codex's shell tool.
    """
    command = spec.get("command") if isinstance(spec, dict) else spec
    if not isinstance(command, str) or not command.strip():
        raise EngineError(f"scripted engine: bad command entry {spec!r}")
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", command, cwd=str(workdir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=_COMMAND_TIMEOUT_S)
        code = proc.returncode
    except TimeoutError:
        proc.kill()
        out, code = (await proc.communicate())[0], 124
    return {
        "type": "command_execution",
        "command": command,
        "aggregated_output": out.decode("utf-8", "replace")[-_OUTPUT_LIMIT:],
        "exit_code": code,
        "status": "completed" if code == 0 else "failed",
    }


def call_section(
    script: Mapping[str, Any], phase: str, context: Mapping[str, Any]
) -> dict[str, Any]:
    """The script section answering this call: the phase itself, or its per-step entry."""
    phase_section = _mapping(script.get(phase), phase)
    if phase in ("planning", "discovery"):
        return dict(phase_section)
    return step_section(phase_section, context)


def add_transcript_extras(
    reply: _Reply, script: Mapping[str, Any], request: EngineRequest, context: Mapping[str, Any]
) -> None:
    """Set the reply's transcript extras from its section of the script, if it has one.

    A reasoning line, real commands to run, and a pace between events (`pace_s`, so a demo or
    a browser test can watch a step happen).
    """
    with contextlib.suppress(EngineError):
        section = call_section(script, request.phase, context)
        if isinstance(section.get("reasoning"), str):
            reply.reasoning = fill(section["reasoning"], context)
        if request.phase in ("execute", "discovery") and reply.fail is None:
            commands = fill_deep(section.get("commands"), context)
            reply.commands = commands if isinstance(commands, list) else None
        pace = section.get("pace_s", script.get("pace_s", 0))
        reply.pace_s = float(pace) if isinstance(pace, int | float) else 0.0


class _EventStream:
    """One turn's events: the same, in the same order, that codex would stream, paced when asked."""

    def __init__(self, sink: EventSink | None, pace_s: float) -> None:
        self.events: list[dict[str, Any]] = []
        self._sink = sink
        self._pace_s = pace_s
        self._ids = itertools.count()

    def next_id(self) -> str:
        return f"item_{next(self._ids)}"

    def item(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"type": "item.completed", "item": {"id": self.next_id(), **body}}

    async def emit(self, event: dict[str, Any]) -> None:
        if self.events and self._pace_s > 0:
            await asyncio.sleep(self._pace_s)
        self.events.append(event)
        if self._sink is not None:
            self._sink(event)


async def _emit_work(stream: _EventStream, request: EngineRequest, reply: _Reply) -> None:
    """The turn's work before its answer: reasoning, file changes, then each command run.

    A command that cannot run fails the reply and ends the turn's work there.
    """
    if reply.reasoning:
        await stream.emit(stream.item({"type": "reasoning", "text": reply.reasoning}))
    if reply.changes:
        await stream.emit(
            stream.item({"type": "file_change", "changes": reply.changes, "status": "completed"})
        )
    for spec in reply.commands or []:
        shown = spec.get("command") if isinstance(spec, dict) else spec
        begun: dict[str, Any] = {
            "id": stream.next_id(), "type": "command_execution",
            "command": str(shown), "aggregated_output": "", "status": "in_progress",
        }  # fmt: skip
        await stream.emit({"type": "item.started", "item": begun})
        try:
            done = await run_command(request.workdir, spec)
        except (EngineError, OSError) as exc:
            reply.fail = str(exc)
            break
        await stream.emit({"type": "item.completed", "item": {**begun, **done}})


def _structured(request: EngineRequest, reply: _Reply) -> tuple[Any | None, str | None]:
    """(structured reply, parse error) of a completed turn asked for an output schema."""
    if request.output_schema is None:
        return None, None
    if reply.structured is not None:
        return reply.structured, None
    try:
        return json.loads(reply.message), None
    except ValueError as exc:
        return None, f"the final message is not JSON: {exc}"


class ScriptedEngine:
    """Answers every phase from a YAML script (a path, or a dict passed by a test)."""

    engine_id = ENGINE_ID

    def __init__(
        self, script: Mapping[str, Any] | Path | str | None = None, *, engine_id: str = ENGINE_ID
    ) -> None:
        self.engine_id = engine_id
        self._path: Path | None = None
        self._mtime: float | None = None
        self._script: dict[str, Any] = {}
        if isinstance(script, Mapping):
            self._script = copy.deepcopy(dict(script))
        else:
            self._path = Path(script) if script is not None else DEFAULT_SCRIPT_PATH
            self._reload()
        self._threads = itertools.count(1)
        # Planning calls (repairs included) and QA attempts per protocol/step, for sequences.
        self._planning_calls: defaultdict[str, int] = defaultdict(int)
        self._qa_calls: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.requests: list[EngineRequest] = []

    @property
    def script(self) -> dict[str, Any]:
        self._reload()
        return self._script

    def _reload(self) -> None:
        """(Re)read the YAML file when it changed, so a user's edits apply without a restart."""
        if self._path is None:
            return
        try:
            mtime = self._path.stat().st_mtime
            if mtime == self._mtime:
                return
            loaded = yaml.safe_load(self._path.read_text())
        except OSError as exc:
            raise EngineError(f"scripted engine: cannot read script {self._path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise EngineError(f"scripted engine: {self._path} is not valid YAML: {exc}") from exc
        self._script = _mapping(loaded, f"script {self._path}")
        self._mtime = mtime

    async def run(self, request: EngineRequest) -> EngineResult:
        started = time.monotonic()
        self.requests.append(request)
        script = self.script
        context = {"phase": request.phase, **dict(request.context)}
        thread_id = request.resume_thread_id or f"scripted-{next(self._threads)}"
        try:
            reply = self._reply(script, request, context)
        except EngineError as exc:
            reply = _Reply(message="", usage=TokenUsage(), fail=str(exc))
        # `delay_s` stands for a long engine turn (a model call); a cancelled job cancels it
        if reply.delay_s > 0:
            await asyncio.sleep(reply.delay_s)
        add_transcript_extras(reply, script, request, context)

        stream = _EventStream(request.sink, reply.pace_s)
        await stream.emit({"type": "thread.started", "thread_id": thread_id})
        await stream.emit({"type": "turn.started"})
        await _emit_work(stream, request, reply)
        base = (
            (request.previous_usage or TokenUsage()) if request.resume_thread_id else TokenUsage()
        )
        if reply.fail is not None:
            await stream.emit({"type": "turn.failed", "error": {"message": reply.fail}})
            return EngineResult(
                outcome="failed",
                exit_code=1,
                final_message=reply.message,
                usage=TokenUsage(),
                thread_usage=base,
                thread_id=thread_id,
                events=stream.events,
                error=reply.fail,
                duration_s=time.monotonic() - started,
            )
        await stream.emit(stream.item({"type": "agent_message", "text": reply.message}))
        thread_usage = base + reply.usage
        await stream.emit({"type": "turn.completed", "usage": thread_usage.to_dict()})

        structured, parse_error = _structured(request, reply)
        return EngineResult(
            outcome="completed",
            exit_code=0,
            final_message=reply.message,
            structured=structured,
            parse_error=parse_error,
            usage=reply.usage,
            thread_usage=thread_usage,
            thread_id=thread_id,
            events=stream.events,
            duration_s=time.monotonic() - started,
        )

    def _reply(
        self, script: Mapping[str, Any], request: EngineRequest, context: Mapping[str, Any]
    ) -> _Reply:
        phase_section = _mapping(script.get(request.phase), request.phase)
        protocol = str(context.get("protocol", ""))
        if request.phase == "planning":
            reply = self._planning(script, phase_section, request, context, protocol)
            return dataclasses.replace(reply, delay_s=_delay(phase_section))

        call = (
            step_section(phase_section, context)
            if request.phase != "discovery"
            else dict(phase_section)
        )
        reply = self._call_reply(request, context, protocol, call, phase_section, script)
        # a step's own delay_s wins over its phase's
        delay = _delay(call) if "delay_s" in call else _delay(phase_section)
        return dataclasses.replace(reply, delay_s=delay)

    def _call_reply(
        self,
        request: EngineRequest,
        context: Mapping[str, Any],
        protocol: str,
        call: Mapping[str, Any],
        phase_section: Mapping[str, Any],
        script: Mapping[str, Any],
    ) -> _Reply:
        usage = usage_from(call, phase_section, script)
        if call.get("fail"):
            return _Reply(message="", usage=usage, fail=fill(str(call["fail"]), context))

        if request.phase == "decompose":
            if "raw" in call:  # a reply exactly as written (a chat answer instead of the JSON)
                return _Reply(message=fill(str(call["raw"]), context), usage=usage)
            text = fill(str(call.get("text", call.get("content", "# {title}\n"))), context)
            if request.output_schema is None:
                return _Reply(message=text, usage=usage)
            # asked for the decompose schema: the file's content as JSON, like a model would
            data = {"content": text}
            return _Reply(message=json.dumps(data), usage=usage, structured=data)

        if request.phase == "qa":
            key = (protocol, str(context.get("slug", context.get("step_index", ""))))
            self._qa_calls[key] += 1
            attempt = context.get("qa_attempt") or context.get("attempt") or self._qa_calls[key]
            verdict = qa_verdict(call, int(attempt))
            report = fill(str(call.get("text", call.get("report", "# Quality report\n"))), context)
            return _Reply(message=f"{report.rstrip()}\n\nVERDICT: {verdict}\n", usage=usage)

        # execute and discovery both edit files in the workdir.
        changes = apply_files(request.workdir, fill_deep(call.get("files"), context))
        message = fill(str(call.get("text", call.get("message", "Done."))), context)
        return _Reply(message=message, usage=usage, changes=changes)

    def _planning(
        self,
        script: Mapping[str, Any],
        section: Mapping[str, Any],
        request: EngineRequest,
        context: Mapping[str, Any],
        protocol: str,
    ) -> _Reply:
        usage = usage_from(section, script)
        if section.get("fail"):
            return _Reply(message="", usage=usage, fail=fill(str(section["fail"]), context))
        invalid = section.get("invalid_first", False)
        invalid_count = int(invalid) if not isinstance(invalid, bool) else (1 if invalid else 0)
        # Repair turns (resumes) count too: N=1 exercises a successful repair, N=2 a plan that
        # is still invalid after its one repair turn.
        self._planning_calls[protocol] += 1
        if self._planning_calls[protocol] <= invalid_count:
            reply = str(section.get("invalid_reply", '{"title": "An incomplete plan"}'))
            return _Reply(message=fill(reply, context), usage=usage)
        plan = build_plan(section, context)
        return _Reply(message=json.dumps(plan, indent=2), usage=usage, structured=plan)
