"""The feedback a step's next attempt is given: a list of typed items, rendered into the
prompt's feedback section (pure).

A step keeps its items in `runtime_state["feedback"]` (JSON). Kinds:

- `qa_report`: the failing QA report of the previous attempt (its last QA_TAIL bytes);
- `ci_failure`: the evidence of a red CI run (bot/domain/ci_evidence.py), with its fingerprint;
- `guidance`: what a human wrote after `/retry [N]`;
- `review`: the review comments a review fix step addresses (bot/domain/review.py builds it).

Another source is one more kind: build a `FeedbackItem` and `add_item` it. A new failure
replaces the older failure items (the attempt they describe is gone); human guidance and review
comments stay until replaced by newer ones of their kind, so an automatic fix attempt or a
`/retry` still sees what the human asked for, whatever the previous attempt did to the step file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.domain.ci_evidence import CIEvidence, render_evidence, tail
from bot.domain.commands import sanitize_prompt_text

QA_TAIL = 8 * 1024
GUIDANCE_LIMIT = 4000
MAX_ITEMS = 8
# items that describe what went wrong with one attempt: only the newest one is kept
FAILURE_KINDS = frozenset({"qa_report", "ci_failure"})
# items that hold until a newer one of the same kind comes
REPLACED_KINDS = frozenset({"guidance", "review"})


@dataclass(frozen=True)
class FeedbackItem:
    """One piece of feedback: `kind`, a one-line `title`, the `body` text, and plain extras."""

    kind: str
    title: str
    body: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "title": self.title, "body": self.body, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeedbackItem:
        meta = data.get("meta")
        return cls(
            kind=str(data.get("kind") or "note"),
            title=str(data.get("title") or ""),
            body=str(data.get("body") or ""),
            meta=dict(meta) if isinstance(meta, Mapping) else {},
        )


def items_of(raw: Any) -> list[FeedbackItem]:
    """The stored feedback as items; a plain string (rows from before the list) is one note."""
    if isinstance(raw, str):
        return [FeedbackItem("note", "Feedback", raw)] if raw.strip() else []
    if not isinstance(raw, list):
        return []
    return [FeedbackItem.from_dict(x) for x in raw if isinstance(x, Mapping)]


def add_item(raw: Any, item: FeedbackItem) -> list[dict[str, Any]]:
    """The stored feedback with `item` added (JSON, for runtime_state["feedback"])."""
    items = items_of(raw)
    if item.kind in FAILURE_KINDS:
        items = [i for i in items if i.kind not in FAILURE_KINDS]
    elif item.kind in REPLACED_KINDS:
        items = [i for i in items if i.kind != item.kind]
    items.append(item)
    return [i.to_dict() for i in items[-MAX_ITEMS:]]


def qa_item(report: str, attempt: int) -> FeedbackItem:
    """A failing QA report: its last QA_TAIL bytes (the findings and the verdict are at the end)."""
    return FeedbackItem(
        "qa_report",
        f"QA report of attempt {attempt}: FAIL",
        tail(report.strip(), QA_TAIL),
        {"attempt": attempt},
    )


def ci_item(evidence: CIEvidence, attempt: int, sha: str | None = None) -> FeedbackItem:
    """A red CI run's evidence, with its fingerprint."""
    text = render_evidence(evidence, sha)
    fp = evidence.fingerprint()
    return FeedbackItem(
        "ci_failure",
        f"{text.title} (attempt {attempt})",
        text.body,
        {"attempt": attempt, "fingerprint": fp.digest, "failure": fp.label, "sha": sha or ""},
    )


def guidance_item(author: str | None, text: str) -> FeedbackItem:
    """What a human asked for with `/retry N text…` (hidden text removed, capped)."""
    who = f"@{author}" if author else "a maintainer"
    return FeedbackItem(
        "guidance",
        f"Guidance from {who}",
        sanitize_prompt_text(text, GUIDANCE_LIMIT),
        {"author": author or ""},
    )


_HEADINGS = {
    "qa_report": "The QA review of the previous attempt failed",
    "ci_failure": "CI failed on the previous attempt",
    "guidance": "A human's guidance for this attempt",
    "review": "Review comments this step addresses",
}


def render_feedback(raw: Any) -> str:
    """The feedback section's text; "" when there is none (a first attempt)."""
    parts = []
    for item in items_of(raw):
        heading = _HEADINGS.get(item.kind, item.kind.replace("_", " ").capitalize())
        parts.append(f"### {heading}: {item.title}\n\n{item.body.strip()}")
    return "\n\n".join(parts)


def latest_failure(raw: Any) -> FeedbackItem | None:
    """The newest failure item (what the current attempt is fixing), if any."""
    failures = [i for i in items_of(raw) if i.kind in FAILURE_KINDS]
    return failures[-1] if failures else None
