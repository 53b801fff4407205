"""A CI failure's fingerprint: which jobs failed, and the first error lines they printed (pure).

Two failures are "the same" when the same jobs fail with the same first error lines once the
parts that change from run to run are taken out: timestamps, numbers, paths, URLs and hex ids.
A step that fails the same way twice is not making progress, so the protocol stops and asks a
human instead of paying for a third attempt.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# ANSI colour and cursor sequences (CSI ... letter), and the bare ESC[0K GitLab sprinkles in.
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Za-z0-9]")

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
_ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?")
_CLOCK = re.compile(r"\b\d{1,2}:\d{2}:\d{2}(?:[.,]\d+)?\b")
_UUID = re.compile(
    r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
)
_HEX_PREFIXED = re.compile(r"\b0x[0-9a-fA-F]+\b")
# a run of 7+ hex digits holding at least one digit: commit shas, object ids, container ids
_HEX_ID = re.compile(r"\b(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{7,}\b")
# a path: something with a slash (or a backslash) in it, optionally a drive letter
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\w.@~+-]*[/\\])+[\w.@~+-]*")
_NUMBER = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")

LINE_LIMIT = 200
LINES_PER_JOB = 3


def normalise_line(line: str) -> str:
    """An error line without what differs between runs of the same failure."""
    text = ANSI_RE.sub("", line)
    text = _URL.sub("<url>", text)
    text = _ISO_TIME.sub("<time>", text)
    text = _CLOCK.sub("<time>", text)
    text = _UUID.sub("<id>", text)
    text = _HEX_PREFIXED.sub("<hex>", text)
    text = _HEX_ID.sub("<hex>", text)
    text = _PATH.sub("<path>", text)
    text = _NUMBER.sub("N", text)
    return _SPACE.sub(" ", text).strip()[:LINE_LIMIT]


@dataclass(frozen=True)
class Fingerprint:
    """`digest` compares failures; `label` names the failure for people (the block reason)."""

    digest: str
    label: str


def failure_fingerprint(jobs: Iterable[tuple[str, Sequence[str]]]) -> Fingerprint:
    """The fingerprint of a failing CI run from (job or check name, its first error lines).

    Order and duplicates do not matter (a re-run reports the same jobs again); each job counts
    with at most its first LINES_PER_JOB normalised error lines.
    """
    items = sorted(
        {
            (
                " ".join(name.split()),
                tuple(normalise_line(x) for x in lines[:LINES_PER_JOB] if x.strip()),
            )
            for name, lines in jobs
        }
    )
    payload = "\n".join(name + "\x1f" + "\x1e".join(lines) for name, lines in items)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    if not items:
        return Fingerprint(digest, "CI failed (no job named)")
    name, lines = items[0]
    label = f"{name}: {lines[0]}" if lines else name
    if len(items) > 1:
        label += f" (+{len(items) - 1} more failing)"
    return Fingerprint(digest, label[:300])
