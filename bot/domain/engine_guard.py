"""What the bot does to an engine's output before storing, committing or publishing any of it
(pure).

The agent's text is untrusted: it may echo secrets it read, be megabytes long, or pretend to be
something it is not. Every result passes through `sanitize_result` (secrets redacted, event log
capped) right after the engine returns; reports are capped before they are committed; a
decompose reply counts only as the schema's JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from bot.domain.secrets_scan import SecretScanner, process_scanner
from engines.base import EngineResult

# A committed QA report, like a comment or check-run text, stays readable and within forge limits.
QA_REPORT_LIMIT = 64 * 1024
# The engine's own events stored with one engine.* event: per event, and all together.
EVENT_LIMIT = 2000
EVENTS_TOTAL_LIMIT = 64 * 1024
FINAL_MESSAGE_LIMIT = 256 * 1024

DECOMPOSE_SCHEMA_FILE = "step-decompose.schema.json"


def _schemas_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "schemas"


def decompose_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((_schemas_dir() / DECOMPOSE_SCHEMA_FILE).read_text())
    return data


def cap_text(text: str, limit: int, what: str = "text", tail: int = 4096) -> str:
    """`text` cut to at most `limit` UTF-8 bytes: its start, a note saying so, and its last
    `tail` bytes (where a reply's summary and verdict line are)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    note = f"\n\n… [{what} cut: {len(data)} bytes, the middle is left out] …\n\n"
    tail = min(tail, limit // 2)
    room = max(limit - len(note.encode("utf-8")) - tail, 0)
    head = data[:room].decode("utf-8", "ignore")
    end = data[len(data) - tail :].decode("utf-8", "ignore")
    return head + note + end


def cap_report(report: str) -> str:
    """A QA report as committed: ≤ 64 KB, with a note when it was cut."""
    return cap_text(report, QA_REPORT_LIMIT, "report")


def cap_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest events that fit EVENTS_TOTAL_LIMIT, each at most EVENT_LIMIT characters."""
    kept: list[dict[str, Any]] = []
    total = 0
    for event in reversed(events):
        text = json.dumps(event, default=str)
        if len(text) > EVENT_LIMIT:
            event = {"type": event.get("type"), "truncated": text[:EVENT_LIMIT]}
            text = json.dumps(event)
        total += len(text)
        if total > EVENTS_TOTAL_LIMIT:
            kept.append({"type": "deksdenflow.events_dropped", "count": len(events) - len(kept)})
            break
        kept.append(event)
    return list(reversed(kept))


def sanitize_result(result: EngineResult, scanner: SecretScanner | None = None) -> EngineResult:
    """The result with secrets redacted everywhere and its sizes capped (a new object)."""
    scan = scanner if scanner is not None else process_scanner()
    return dataclasses.replace(
        result,
        final_message=cap_text(scan.redact(result.final_message), FINAL_MESSAGE_LIMIT, "message"),
        structured=scan.redact_obj(result.structured),
        parse_error=scan.redact(result.parse_error) if result.parse_error else result.parse_error,
        error=scan.redact(result.error) if result.error else result.error,
        events=scan.redact_obj(cap_events(result.events)),
    )


def decomposed_content(result: EngineResult) -> str | None:
    """A decompose turn's new step content, or None: only the schema's JSON counts, never chat."""
    if not result.ok:
        return None
    data = result.structured
    if data is None:
        try:
            data = json.loads(result.final_message)
        except ValueError:
            return None
    if not Draft202012Validator(decompose_schema()).is_valid(data):
        return None
    content: str = data["content"]
    if not content.strip():
        return None
    return content.rstrip("\n") + "\n"
