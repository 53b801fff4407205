"""What the bot does to engine output before storing or publishing it (pure)."""

from __future__ import annotations

import json

from bot.domain.engine_guard import (
    QA_REPORT_LIMIT,
    cap_events,
    cap_report,
    cap_text,
    decomposed_content,
    sanitize_result,
)
from bot.domain.secrets_scan import SecretScanner
from engines.base import EngineResult

SECRET = "sanitize-me-secret-value"


def test_cap_text_keeps_head_note_and_tail() -> None:
    text = "start\n" + "é" * 100_000 + "\nVERDICT: PASS\n"
    out = cap_text(text, 10_000, "message")
    assert len(out.encode()) <= 10_000
    assert out.startswith("start\n") and out.endswith("VERDICT: PASS\n")
    assert "message cut" in out
    assert cap_text("short", 10) == "short"


def test_cap_report_is_64_kb() -> None:
    out = cap_report("x" * (10 * 1024 * 1024))
    assert len(out.encode()) <= QA_REPORT_LIMIT and "report cut" in out


def test_cap_events_keeps_the_newest_within_limits() -> None:
    events = [{"type": "item.completed", "n": i, "text": "y" * 5000} for i in range(100)]
    kept = cap_events(events)
    assert len(json.dumps(kept)) < 70 * 1024
    assert kept[0]["type"] == "deksdenflow.events_dropped"
    assert "truncated" in kept[-1]


def test_sanitize_result_redacts_everything() -> None:
    result = EngineResult(
        outcome="completed", exit_code=0, final_message=f"key {SECRET}",
        structured={"content": SECRET}, error=f"boom {SECRET}",
        events=[{"type": "item.completed", "item": {"text": SECRET}}],
    )  # fmt: skip
    clean = sanitize_result(result, SecretScanner([SECRET]))
    assert SECRET not in repr(clean)
    assert SECRET in result.final_message  # the original is left alone


def test_decomposed_content_only_from_the_schema_json() -> None:
    def res(message: str, structured: object = None, outcome: str = "completed") -> EngineResult:
        return EngineResult(
            outcome=outcome,  # type: ignore[arg-type]
            exit_code=0,
            final_message=message,
            structured=structured,
        )

    assert decomposed_content(res('{"content": "# Step\\nDo it"}')) == "# Step\nDo it\n"
    assert decomposed_content(res("", {"content": "# S"})) == "# S\n"
    assert decomposed_content(res("I cannot write files, sorry.")) is None
    assert decomposed_content(res('{"content": ""}')) is None
    assert decomposed_content(res('{"content": "x", "extra": 1}')) is None
    assert decomposed_content(res('{"text": "x"}')) is None
    assert decomposed_content(res('{"content": "x"}', outcome="failed")) is None
