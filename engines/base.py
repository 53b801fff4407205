"""The Engine interface: one request in, one result out, whatever agent does the work."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

Phase = Literal["planning", "decompose", "execute", "qa", "discovery"]
SandboxMode = Literal["read-only", "workspace-write", "danger-full-access"]
Outcome = Literal["completed", "failed", "timeout", "usage_error", "not_found", "cancelled"]

PHASES: tuple[Phase, ...] = ("planning", "decompose", "execute", "qa", "discovery")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class EventSink(Protocol):
    """Receives each JSONL event of a turn as it arrives (Codex's own event shape).

    `raw` is the line as the engine read it, when there was one: a consumer that stores events
    keeps those bytes instead of encoding the event again. The sink is called on the engine's
    reading loop, so it must be quick and must not block: buffer, don't write.
    """

    def __call__(self, event: dict[str, Any], raw: bytes | None = None, /) -> None: ...


# A line longer than this never reaches a LinesSink: it goes to the EventSink as its (compacted)
# event, so a consumer never holds an engine's megabytes of command output.
LINES_SINK_MAX_LINE = 16 * 1024


class LinesSink(Protocol):
    """Receives a turn's JSONL as the engine read it: whole lines, a block at a time.

    `data` ends with a newline and holds `lines` lines. An engine that reads JSONL hands its
    bytes here, as they arrive, instead of calling the EventSink once per event: a consumer that
    stores the stream pays one call per block, not per event. Events it has no bytes for (and
    lines over LINES_SINK_MAX_LINE) still go to the EventSink, in order with the blocks. An
    empty `data` says the stream has ended: what the consumer buffered may go now, while the
    engine finishes the turn. Called on the engine's reading loop: buffer, don't write.
    """

    def __call__(self, data: bytes, lines: int, /) -> None: ...


@dataclass(frozen=True)
class TokenUsage:
    """Token counts as Codex reports them; `total` is input + output like the API bills."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_output_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.input_tokens + other.input_tokens,
            self.cached_input_tokens + other.cached_input_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_output_tokens + other.reasoning_output_tokens,
        )

    def __sub__(self, other: TokenUsage) -> TokenUsage:
        # Clamp at zero: a running total that went down (a compacted or replaced thread)
        # must not produce a negative turn cost.
        return TokenUsage(
            max(0, self.input_tokens - other.input_tokens),
            max(0, self.cached_input_tokens - other.cached_input_tokens),
            max(0, self.output_tokens - other.output_tokens),
            max(0, self.reasoning_output_tokens - other.reasoning_output_tokens),
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_output_tokens": self.reasoning_output_tokens,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> TokenUsage:
        """Read a usage object leniently: missing or non-integer fields count as 0."""
        if not data:
            return cls()

        def num(key: str) -> int:
            value = data.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        return cls(
            num("input_tokens"),
            num("cached_input_tokens"),
            num("output_tokens"),
            num("reasoning_output_tokens"),
        )


@dataclass(frozen=True)
class EngineRequest:
    """Everything an engine needs for one turn."""

    prompt: str
    workdir: Path
    phase: Phase
    model: str | None = None
    sandbox: SandboxMode = "workspace-write"
    output_schema: dict[str, Any] | None = None
    timeout_s: float = 900
    env: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    # A follow-up turn in an existing thread (`codex exec ... resume <id> "<prompt>"`).
    resume_thread_id: str | None = None
    # The thread's running total before this turn, so the turn's own usage can be derived.
    previous_usage: TokenUsage | None = None
    # Free-form hints (step_index, slug, title, protocol, task…) used by the scripted engine.
    context: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    # Optional live consumer of the turn's events (the transcript); None: nobody is watching.
    sink: EventSink | None = None
    # The same consumer's block form, for engines that read JSONL; None: events go to `sink`.
    lines_sink: LinesSink | None = None


@dataclass
class EngineResult:
    """What one turn produced, ready to be stored and acted upon."""

    outcome: Outcome
    exit_code: int | None
    final_message: str = ""
    structured: Any | None = None
    parse_error: str | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)
    thread_usage: TokenUsage = field(default_factory=TokenUsage)
    thread_id: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == "completed"


@runtime_checkable
class Engine(Protocol):
    """An agent that can run one turn of work in a directory."""

    engine_id: str

    async def run(self, request: EngineRequest) -> EngineResult: ...
