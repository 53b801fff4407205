"""What a failed CI run says, trimmed for the next attempt's prompt (pure).

The forges hand over raw material: a GitHub Actions job log (timestamps on every line,
`##[group]`/`##[error]` markers), a GitLab job trace (`section_start`/`section_end` markers and
ANSI colours), a check run's summary and annotations, or the log tail a CI script posts to
/webhooks/ci. This module turns each into a short, readable excerpt: the failing step's section
where the log shows one, else the tail; at most EVIDENCE_LIMIT bytes for one CI run in all.
Secrets are taken out by the caller's redactor before anything is kept (see `redacted`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bot.domain.fingerprint import ANSI_RE, Fingerprint, failure_fingerprint

EVIDENCE_LIMIT = 16 * 1024  # bytes of log text for one failing CI run, every job together
RAW_LOG_LIMIT = 4 * 1024 * 1024  # what is read of one raw log before trimming (its tail)
MAX_JOBS = 10
SUMMARY_LIMIT = 2000
MAX_ANNOTATIONS = 20

_GH_STAMP = re.compile(r"^\ufeff?\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z ?")
_GL_SECTION = re.compile(r"section_(?:start|end):\d+:[A-Za-z0-9_.-]+(?:\[[^\]]*\])?\r?")
# GitLab's optional per-line timestamps (runner 17+): "2024-05-01T10:00:00.123456Z 00O "
_GL_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z [0-9a-f]{2}[OE]\+? ?")

# Lines that say what went wrong. Generic runner lines ("exit code 1") count only when a job
# printed nothing more specific.
_ERROR_LINE = re.compile(
    r"##\[error\]|\b(?:[A-Z]\w*(?:Error|Exception)|error|ERROR|Error|FAILED|FAIL|fatal|panic)\b"
    r"|^E {2,}\S|Traceback"
)
_GENERIC = re.compile(
    r"Process completed with exit code|Job failed: exit code|ERROR: Job failed|exit status \d+\s*$|"
    r"\b0 errors?\b|^\s*Error: Process completed",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class FailedJob:
    """One failing job or check run and what it printed (already trimmed and redacted)."""

    name: str
    conclusion: str = "failure"
    summary: str = ""  # a check run's output.title/summary/text; the failing stage of the CI hook
    annotations: tuple[str, ...] = ()  # "path:line: message"
    log: str = ""  # the failing section or the tail of the job's log
    error_lines: tuple[str, ...] = ()  # the first error lines, for the fingerprint

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "conclusion": self.conclusion,
            "summary": self.summary,
            "annotations": list(self.annotations),
            "log": self.log,
            "error_lines": list(self.error_lines),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FailedJob:
        def strings(key: str) -> tuple[str, ...]:
            value = data.get(key)
            return tuple(str(v) for v in value) if isinstance(value, list) else ()

        return cls(
            name=str(data.get("name") or "ci"),
            conclusion=str(data.get("conclusion") or "failure"),
            summary=str(data.get("summary") or ""),
            annotations=strings("annotations"),
            log=str(data.get("log") or ""),
            error_lines=strings("error_lines"),
        )


@dataclass(frozen=True)
class CIEvidence:
    """The evidence of one failing CI run on one commit."""

    source: str
    jobs: tuple[FailedJob, ...] = ()
    note: str = ""  # why there is less than asked for (a fetch that failed, say)

    @property
    def failing(self) -> list[tuple[str, str]]:
        return sorted((j.name, j.conclusion) for j in self.jobs)

    def fingerprint(self) -> Fingerprint:
        return failure_fingerprint((j.name, j.error_lines) for j in self.jobs)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "jobs": [j.to_dict() for j in self.jobs], "note": self.note}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CIEvidence:
        jobs = data.get("jobs")
        return cls(
            source=str(data.get("source") or "ci"),
            jobs=tuple(FailedJob.from_dict(j) for j in jobs if isinstance(j, Mapping))
            if isinstance(jobs, list)
            else (),
            note=str(data.get("note") or ""),
        )


def names_only(source: str, failing: Iterable[tuple[str, str]], note: str = "") -> CIEvidence:
    """Evidence that only knows which checks failed (a status, or a fetch that did not work)."""
    return CIEvidence(source, tuple(FailedJob(n, c) for n, c in sorted(set(failing))), note)


# -- text helpers ---------------------------------------------------------------------------


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def tail(text: str, limit: int) -> str:
    """The last `limit` UTF-8 bytes of `text`, cut at a line start, with a note when cut."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    note = f"[… {len(data) - limit} earlier bytes left out …]\n"
    if utf8_len(note) * 2 > limit:  # too small a limit for a note: the bare tail
        note = ""
    room = max(limit - utf8_len(note), 0)
    kept = data[len(data) - room :].decode("utf-8", "ignore")
    newline = kept.find("\n")
    if 0 <= newline < len(kept) // 2:
        kept = kept[newline + 1 :]
    return note + kept


def _overwrite(line: str) -> str:
    # a carriage return redraws the line (progress bars): the reader sees the last drawing
    parts = [p for p in line.split("\r") if p.strip()]
    return parts[-1] if parts else ""


def clean_github_log(text: str) -> str:
    """A GitHub Actions job log without timestamps, colours and progress redraws."""
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        out.append(_overwrite(ANSI_RE.sub("", _GH_STAMP.sub("", line))))
    return "\n".join(out).strip("\n")


def github_failing_section(log: str) -> str:
    """The step of a cleaned Actions log that failed: the last `##[group]Run …` section that
    holds an `##[error]` line, with the group markers made readable; "" when none does."""
    sections: list[list[str]] = [[]]
    for line in log.split("\n"):
        if line.startswith("##[group]Run ") or line.startswith("Post job cleanup."):
            sections.append([])
        sections[-1].append(line)
    failing = [s for s in sections if any(x.startswith("##[error]") for x in s)]
    if not failing:
        return ""
    lines = []
    for line in failing[-1]:
        if line.startswith("##[endgroup]"):
            continue
        lines.append("▶ " + line[len("##[group]") :] if line.startswith("##[group]") else line)
    return "\n".join(lines).strip("\n")


def clean_gitlab_trace(text: str) -> str:
    """A GitLab job trace without section markers, colours, timestamps and redraws."""
    out: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = _GL_SECTION.sub("", line)
        line = _GL_STAMP.sub("", ANSI_RE.sub("", line))
        line = _overwrite(line)
        if line.strip() or (out and out[-1].strip()):
            out.append(line)
    return "\n".join(out).strip("\n")


def first_error_lines(text: str, count: int = 3) -> tuple[str, ...]:
    """The first `count` lines that say what went wrong; generic runner lines only as a last
    resort (every failing job prints "exit code 1", which tells failures apart not at all)."""
    specific: list[str] = []
    generic: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or not _ERROR_LINE.search(line):
            continue
        line = line.removeprefix("##[error]").strip()
        if _GENERIC.search(line):
            generic.append(line)
        elif line not in specific:
            specific.append(line)
        if len(specific) >= count:
            break
    return tuple((specific or generic)[:count])


# -- evidence builders ----------------------------------------------------------------------


def github_job(
    name: str,
    conclusion: str,
    *,
    output: Mapping[str, Any] | None = None,
    annotations: Iterable[Mapping[str, Any]] = (),
    log: str | None = None,
    limit: int = EVIDENCE_LIMIT,
) -> FailedJob:
    """A failed check run: its output, its failure annotations, and its Actions log (if any)."""
    out = output or {}
    summary = "\n\n".join(
        str(out.get(k)).strip() for k in ("title", "summary", "text") if out.get(k)
    )
    notes = []
    for a in annotations:
        if a.get("annotation_level") not in (None, "failure", "warning"):
            continue
        where = f"{a.get('path') or '?'}:{a.get('start_line') or '?'}"
        message = " ".join(str(a.get("message") or "").split())
        notes.append(f"{where}: {message}"[:500])
        if len(notes) >= MAX_ANNOTATIONS:
            break
    text = ""
    if log:
        cleaned = clean_github_log(log)
        text = github_failing_section(cleaned) or cleaned
    excerpt = tail(text, limit) if text else ""
    errors = first_error_lines(text or summary or "\n".join(notes))
    if not errors and notes:
        errors = tuple(notes[:3])
    return FailedJob(name, conclusion, tail(summary, SUMMARY_LIMIT), tuple(notes), excerpt, errors)


def gitlab_job(
    name: str, status: str, trace: str | None, stage: str = "", limit: int = EVIDENCE_LIMIT
) -> FailedJob:
    """A failed GitLab job from its trace: the tail, cleaned."""
    text = clean_gitlab_trace(trace or "")
    summary = f"stage: {stage}" if stage else ""
    return FailedJob(
        name, status, summary, (), tail(text, limit) if text else "", first_error_lines(text)
    )


def hook_job(name: str, stage: str, log_tail: str, limit: int = EVIDENCE_LIMIT) -> FailedJob:
    """What report.sh sent: the failing stage and its log tail (any CI system's format)."""
    text = clean_gitlab_trace(clean_github_log(log_tail)) if log_tail else ""
    summary = f"failing stage: {stage}" if stage else ""
    return FailedJob(
        name, "failure", summary, (), tail(text, limit) if text else "", first_error_lines(text)
    )


def within_budget(evidence: CIEvidence, limit: int = EVIDENCE_LIMIT) -> CIEvidence:
    """At most MAX_JOBS jobs and `limit` bytes of logs and summaries in all: each job gets an
    equal share (the tail of its log is where the failure is)."""
    jobs = evidence.jobs[:MAX_JOBS]
    if not jobs:
        return evidence
    share = max(limit // len(jobs), 512)
    fitted = []
    for job in jobs:
        summary = tail(job.summary, min(SUMMARY_LIMIT, share // 4)) if job.summary else ""
        room = max(share - utf8_len(summary) - sum(utf8_len(a) for a in job.annotations), 256)
        fitted.append(replace(job, summary=summary, log=tail(job.log, room) if job.log else ""))
    return replace(evidence, jobs=tuple(fitted))


def redacted(evidence: CIEvidence, redact: Callable[[str], str]) -> CIEvidence:
    """Every text of the evidence passed through `redact` (the worker's secret scanner)."""
    jobs = tuple(
        replace(
            j,
            name=redact(j.name),
            summary=redact(j.summary),
            annotations=tuple(redact(a) for a in j.annotations),
            log=redact(j.log),
            error_lines=tuple(redact(x) for x in j.error_lines),
        )
        for j in evidence.jobs
    )
    return replace(evidence, jobs=jobs, note=redact(evidence.note))


@dataclass(frozen=True)
class EvidenceText:
    """The evidence as the prompt shows it."""

    title: str
    body: str
    extra: dict[str, Any] = field(default_factory=dict)


def render_evidence(evidence: CIEvidence, sha: str | None = None) -> EvidenceText:
    """Markdown for the prompt's feedback section."""
    names = ", ".join(j.name for j in evidence.jobs) or "CI"
    title = f"CI failed: {names}"[:200]
    parts = [f"CI ({evidence.source}) failed" + (f" on commit {sha[:12]}" if sha else "") + "."]
    if evidence.note:
        parts.append(evidence.note)
    for job in evidence.jobs:
        block = [f"#### {job.name} ({job.conclusion})"]
        if job.summary:
            block.append(job.summary)
        if job.annotations:
            block.append("Annotations:\n" + "\n".join(f"- {a}" for a in job.annotations))
        if job.log:
            block.append("Log:\n" + job.log)
        elif not job.summary and not job.annotations:
            block.append("(no log or output was available)")
        parts.append("\n\n".join(block))
    return EvidenceText(title, "\n\n".join(parts))
