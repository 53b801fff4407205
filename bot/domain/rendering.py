"""Every piece of text the bot posts: status comment, check runs, commits, PR body, log lines."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from bot.domain.pricing import fmt_cost
from bot.domain.states import ProtocolStatus, StepStatus
from bot.forge.base import CheckAction, CheckConclusion, CheckReport, CheckState

# GitHub rejects comment bodies over 65,536 characters (422) and check-run summary/text over
# 65,535. We measure in UTF-16 code units, which is never less than the code-point count, and
# keep some headroom, so whichever way the forge counts we stay under.
COMMENT_LIMIT = 65_536
_COMMENT_BUDGET = 65_000
_CHECK_BUDGET = 65_000
_DETAILS_CAP = 12_000  # one step's output block, so one huge step cannot crowd out the rest
_TITLE_CAP = 120

STATUS_EMOJI: dict[str, str] = {
    ProtocolStatus.PENDING: "⬜",
    ProtocolStatus.PLANNING: "🧭",
    ProtocolStatus.PLANNED: "📋",
    ProtocolStatus.RUNNING: "🔄",
    StepStatus.NEEDS_QA: "🔍",
    ProtocolStatus.PAUSED: "⏸️",
    ProtocolStatus.BLOCKED: "⛔",
    ProtocolStatus.FAILED: "❌",
    ProtocolStatus.CANCELLED: "🚫",
    ProtocolStatus.COMPLETED: "✅",
}
VERDICT_EMOJI = {"PASS": "✅", "FAIL": "❌"}

ACTION_RUN_NEXT = "run-next"
ACTION_RUN_QA = "run-qa"
ACTION_RETRY = "retry-step"


def text_size(text: str) -> int:
    """Length in UTF-16 code units (an upper bound for any way a forge counts characters)."""
    return len(text.encode("utf-16-le")) // 2


def truncate(text: str, limit: int, note: str = "\n… (truncated)") -> str:
    """`text` cut to at most `limit` UTF-16 units, ending with `note` when it was cut."""
    if text_size(text) <= limit:
        return text
    room = max(0, limit - text_size(note))
    cut = text[:room]
    while (over := text_size(cut) - room) > 0:
        cut = cut[: len(cut) - max(1, over // 2)]
    return (cut + note) if text_size(cut + note) <= limit else cut


def inline(text: str, limit: int = _TITLE_CAP) -> str:
    """Untrusted text for one markdown line: one line, no raw HTML (so no fake markers)."""
    one = " ".join(text.split()).replace("<", "&lt;").replace(">", "&gt;")
    return truncate(one, limit, "…")


def short_sha(sha: str) -> str:
    """The first 12 hex digits of a commit id (anything else is dropped)."""
    return re.sub(r"[^0-9a-fA-F]", "", sha)[:12]


def _fence(content: str, lang: str = "") -> str:
    # A fence longer than any backtick run inside, so output can never close it early; absurd
    # runs are shortened first so the fence itself stays small.
    content = re.sub(r"`{16,}", "`" * 15 + "…", content)
    longest = max((len(m) for m in re.findall(r"`+", content)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{content}\n{ticks}"


def fmt_tokens(n: int | None) -> str:
    """12345 → "12,345"."""
    return f"{n:,}" if n is not None else "—"


def fmt_duration(seconds: float | None) -> str:
    """Seconds as "45s", "2m 03s" or "1h 02m"."""
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600) // 60:02d}m"


@dataclass(frozen=True)
class StepView:
    """What the status comment shows about one step (plain values, loaded by the job)."""

    index: int
    title: str
    status: str
    slug: str = ""
    qa_policy: str | None = None
    qa_verdict: str | None = None  # "PASS" | "FAIL" | None
    tokens: int | None = None
    duration_seconds: float | None = None
    check_url: str | None = None
    commit_sha: str | None = None
    output: str | None = None  # the engine's last message, shown folded
    qa_report: str | None = None  # quality-report.md, shown folded
    error: str | None = None
    page_url: str | None = None  # the step's console page (transcript, diff, cost)
    cost_usd: float | None = None
    attempt: str | None = None  # "attempt 2/3: CI failed: …" once a step is being redone


@dataclass(frozen=True)
class ProtocolView:
    """What the status comment shows about a protocol run."""

    name: str
    status: str
    task: str = ""
    steps: Sequence[StepView] = field(default_factory=tuple)
    current_step: int | None = None
    branch: str | None = None
    branch_url: str | None = None
    pr_url: str | None = None
    pr_number: int | None = None
    tokens_used: int | None = None
    token_budget: int | None = None
    duration_seconds: float | None = None
    message: str | None = None  # why it is blocked/failed/paused
    updated_at: datetime | None = None
    command_prefix: str = "/"
    console_url: str | None = None  # the protocol's console page
    cost_usd: float | None = None
    graph: str | None = None  # a Mermaid flowchart of a plan that is a graph (bot/domain/graph.py)


def status_marker(protocol_name: str) -> str:
    """The hidden first line that lets the forge find and edit our one status comment."""
    return f"<!-- deksdenflow:status protocol={protocol_name} -->"


def _step_line(step: StepView, current: int | None) -> str:
    done = "x" if step.status == StepStatus.COMPLETED else " "
    parts = [f"**{step.index:02d}** {inline(step.title)}"]
    if step.attempt:
        parts.append(f"🔁 {inline(step.attempt, 200)}")
    if step.qa_verdict:
        parts.append(f"QA {VERDICT_EMOJI.get(step.qa_verdict, '❔')} {inline(step.qa_verdict, 10)}")
        if step.status == StepStatus.NEEDS_QA and step.qa_verdict == "PASS":
            parts.append("waiting for CI")  # the CI gate (bot/domain/ci_gate.py)
    elif step.status == StepStatus.NEEDS_QA:
        parts.append("QA pending")
    if step.tokens is not None:
        parts.append(f"{fmt_tokens(step.tokens)} tokens")
    if step.cost_usd:
        parts.append(fmt_cost(step.cost_usd))
    if step.duration_seconds is not None:
        parts.append(fmt_duration(step.duration_seconds))
    if step.commit_sha:
        parts.append(f"`{short_sha(step.commit_sha)}`")
    if step.check_url:
        parts.append(f"[check]({step.check_url})")
    if step.page_url:
        parts.append(f"[transcript & diff]({step.page_url})")
    emoji = STATUS_EMOJI.get(step.status, "❔")
    line = f"- [{done}] {emoji} " + " · ".join(parts)
    if step.index == current:
        line += " ← **current**"
    return line


def _details(summary: str, body: str, cap: int) -> str:
    head = f"<details><summary>{summary}</summary>\n\n"
    tail = "\n\n</details>"
    note = f"\n… ({len(body):,} characters in full; truncated)"
    room = cap - text_size(head) - text_size(tail) - 2 * 16 - 2  # worst-case fence lines
    return head + _fence(truncate(body, max(0, room), note)) + tail


def _header(view: ProtocolView) -> list[str]:
    emoji = STATUS_EMOJI.get(view.status, "❔")
    lines = [
        status_marker(view.name),
        f"### {emoji} DeksdenFlow · `{inline(view.name, 80)}` — {inline(view.status, 20)}",
        "",
    ]
    if view.task:
        lines.append(f"**Task:** {inline(view.task, 300)}")
    facts = []
    if view.branch:
        branch = f"`{inline(view.branch, 100)}`"
        facts.append(
            f"**Branch:** [{branch}]({view.branch_url})"
            if view.branch_url
            else f"**Branch:** {branch}"
        )
    if view.pr_url:
        label = f"#{view.pr_number}" if view.pr_number else "draft"
        facts.append(f"**PR:** [{label}]({view.pr_url})")
    if view.tokens_used is not None:
        budget = f" / {fmt_tokens(view.token_budget)}" if view.token_budget else ""
        facts.append(f"**Tokens:** {fmt_tokens(view.tokens_used)}{budget}")
    if view.cost_usd:
        facts.append(f"**Cost:** {fmt_cost(view.cost_usd)}")
    if view.duration_seconds is not None:
        facts.append(f"**Time:** {fmt_duration(view.duration_seconds)}")
    if view.console_url:
        facts.append(f"[**Console**]({view.console_url})")
    if facts:
        lines.append(" · ".join(facts))
    if view.current_step is not None:
        title = next((s.title for s in view.steps if s.index == view.current_step), "")
        lines.append(
            f"**Current step:** {view.current_step:02d}" + (f" — {inline(title)}" if title else "")
        )
    if view.message:
        lines += ["", f"> {emoji} {inline(view.message, 500)}"]
    return lines


def _footer(view: ProtocolView) -> str:
    p = view.command_prefix
    when = (
        f" · updated {view.updated_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
        if view.updated_at
        else ""
    )
    return (
        f"<sub>Commands: `{p}run-step next` · `{p}qa` · `{p}retry` · `{p}pause` · "
        f"`{p}help`{when}</sub>"
    )


def status_comment(view: ProtocolView) -> str:
    """The one status comment of a protocol; always under the forge's comment limit."""
    head = "\n".join(_header(view))
    footer = _footer(view)
    budget = _COMMENT_BUDGET - text_size(head) - text_size(footer) - 200
    # The checklist comes first; if even that is too long, the tail is summarised.
    checklist: list[str] = []
    steps = list(view.steps)
    used = 0
    for n, step in enumerate(steps):
        line = _step_line(step, view.current_step)
        if used + text_size(line) + 1 > budget * 3 // 4:
            checklist.append(f"- … and {len(steps) - n} more steps")
            break
        checklist.append(line)
        used += text_size(line) + 1
    body = "**Steps**\n" + "\n".join(checklist) if checklist else "_No steps planned yet._"
    if view.graph and text_size(view.graph) < budget // 4:  # GitHub and GitLab both draw it
        body = f"```mermaid\n{view.graph}\n```\n\n{body}"
    remaining = budget - text_size(body)

    # Folded outputs: errors and the current step first, then newest first; each gets at most
    # _DETAILS_CAP and the total never exceeds what is left.
    blocks: list[tuple[int, str, str]] = []
    for step in steps:
        for label, text in (
            ("error", step.error),
            ("output", step.output),
            ("QA report", step.qa_report),
        ):
            if text:
                blocks.append((step.index, f"Step {step.index:02d} {label}", text))

    def priority(block: tuple[int, str, str]) -> tuple[int, int]:
        index, summary, _ = block
        return (0 if index == view.current_step or summary.endswith("error") else 1, -index)

    chosen: dict[int, str] = {}
    for pos, block in sorted(enumerate(blocks), key=lambda pb: priority(pb[1])):
        cap = min(_DETAILS_CAP, remaining)
        if cap < 300:
            break
        rendered = _details(block[1], block[2], cap)
        chosen[pos] = rendered
        remaining -= text_size(rendered) + 2
    details = [chosen[pos] for pos in sorted(chosen)]
    if len(chosen) < len(blocks):
        details.append(
            f"_{len(blocks) - len(chosen)} more outputs omitted to stay under the comment limit._"
        )

    out = "\n\n".join([head, body, *details, footer])
    # Belt and braces: nothing above should get here, but the limit is a hard 422.
    return truncate(out, _COMMENT_BUDGET)


def check_name(kind: Literal["step", "qa"], step_index: int) -> str:
    """`deksdenflow/step-01` or `deksdenflow/qa-01`."""
    return f"deksdenflow/{kind}-{step_index:02d}"


_CHECK_NAME_RE = re.compile(r"^deksdenflow/(step|qa)-([0-9]{2,})$")


def parse_check_name(name: str) -> tuple[Literal["step", "qa"], int] | None:
    """The inverse of `check_name` (for check_run.requested_action / rerequested)."""
    m = _CHECK_NAME_RE.match(name)
    if not m:
        return None
    kind: Literal["step", "qa"] = "step" if m.group(1) == "step" else "qa"
    return kind, int(m.group(2))


def _action(label: str, description: str, identifier: str) -> CheckAction:
    # GitHub's hard limits: label 20, description 40, identifier 20.
    return CheckAction(label=label[:20], description=description[:40], identifier=identifier[:20])


def _default_conclusion(kind: str, step: StepView, verdict: str | None) -> CheckConclusion:
    if kind == "qa":
        return "success" if verdict == "PASS" else "failure"
    return _STEP_CONCLUSION.get(step.status, "neutral")


# what a step check run concludes from the step's status; any other status is neutral
_STEP_CONCLUSION: dict[str, CheckConclusion] = {
    StepStatus.COMPLETED: "success",
    StepStatus.NEEDS_QA: "success",
    StepStatus.FAILED: "failure",
    StepStatus.BLOCKED: "action_required",
    StepStatus.CANCELLED: "cancelled",
}


def _check_title(
    kind: Literal["step", "qa"],
    step: StepView,
    status: CheckState,
    conclusion: CheckConclusion | None,
    verdict: str | None,
) -> str:
    """The check run's title: what, which step, how it went, and the attempt when retried."""
    idx = f"{step.index:02d}"
    what = "QA" if kind == "qa" else "Step"
    if status != "completed":
        state = "queued" if status == "queued" else "running"
        title = f"{what} {idx} {state}: {inline(step.title, 100)}"
    elif kind == "qa":
        title = f"QA {idx} {verdict or 'FAIL'}: {inline(step.title, 100)}"
    else:
        title = f"Step {idx} {conclusion}: {inline(step.title, 100)}"

    if step.attempt:
        title += f" ({inline(step.attempt.split(':', 1)[0], 30)})"
    return title


def _check_summary(
    protocol_name: str,
    step: StepView,
    *,
    message: str,
    verdict: str | None,
    tokens: int | None,
    cost_usd: float | None,
    details_url: str | None,
    changed_files: Sequence[str],
) -> str:
    """The check run's summary before any quality report: protocol, step, verdict, cost, files."""
    idx = f"{step.index:02d}"
    lines = [f"**Protocol** `{inline(protocol_name, 80)}` · **Step {idx}** — {inline(step.title)}"]
    if step.attempt:
        lines += ["", f"🔁 {inline(step.attempt, 500)}"]
    if message:
        lines += ["", inline(message, 1000)]
    if verdict:
        lines += ["", f"**Verdict:** {VERDICT_EMOJI.get(verdict, '❔')} {inline(verdict, 10)}"]
    if tokens is not None:
        cost = f" · **Cost:** {fmt_cost(cost_usd)}" if cost_usd else ""
        lines += ["", f"**Tokens:** {fmt_tokens(tokens)}{cost}"]
    if details_url:
        lines += ["", f"[Transcript, diff and cost]({details_url})"]
    if changed_files:
        shown = [f"- `{inline(f, 200)}`" for f in changed_files[:50]]
        if len(changed_files) > 50:
            shown.append(f"- … and {len(changed_files) - 50} more")
        lines += ["", "### What changed", *shown]
    return "\n".join(lines)


def _check_actions(
    kind: Literal["step", "qa"],
    step: StepView,
    status: CheckState,
    conclusion: CheckConclusion | None,
    has_next_step: bool,
) -> list[CheckAction]:
    """The buttons a finished check run offers: what comes next after success, a retry else."""
    actions: list[CheckAction] = []
    if status == "completed":
        idx = f"{step.index:02d}"
        run_next = _action("Run next step", "Execute the next pending step", ACTION_RUN_NEXT)
        run_qa = _action("Run QA", f"Run the quality check on step {idx}", ACTION_RUN_QA)
        retry = _action("Retry step", f"Run step {idx} again", ACTION_RETRY)
        ok = conclusion == "success"
        if kind == "step" and ok:
            if step.status == StepStatus.NEEDS_QA:
                actions.append(run_qa)
            if has_next_step:
                actions.append(run_next)
        elif kind == "qa" and ok:
            if has_next_step:
                actions.append(run_next)
        else:
            actions += [retry, run_qa] if kind == "qa" else [retry]
    return actions


def check_run_output(
    *,
    kind: Literal["step", "qa"],
    protocol_name: str,
    step: StepView,
    head_sha: str,
    status: CheckState = "completed",
    conclusion: CheckConclusion | None = None,
    verdict: str | None = None,
    changed_files: Sequence[str] = (),
    tokens: int | None = None,
    quality_report: str | None = None,
    details_url: str | None = None,
    has_next_step: bool = True,
    message: str = "",
    cost_usd: float | None = None,
) -> CheckReport:
    """The check run for a step's execution or its QA, with up to three action buttons."""
    if status == "completed" and conclusion is None:
        conclusion = _default_conclusion(kind, step, verdict)
    if status != "completed":
        conclusion = None
    title = _check_title(kind, step, status, conclusion, verdict)
    summary = _check_summary(
        protocol_name,
        step,
        message=message,
        verdict=verdict,
        tokens=tokens,
        cost_usd=cost_usd,
        details_url=details_url,
        changed_files=changed_files,
    )
    text = ""
    if quality_report:
        excerpt = truncate(quality_report, 3_000, "\n…")
        summary += "\n\n### Quality report (excerpt)\n\n" + _fence(excerpt)
        text = _fence(truncate(quality_report, _CHECK_BUDGET - 20, "\n… (truncated)"))
    actions = _check_actions(kind, step, status, conclusion, has_next_step)
    return CheckReport(
        name=check_name(kind, step.index),
        head_sha=head_sha,
        status=status,
        conclusion=conclusion,
        title=truncate(title, 200, "…"),
        summary=truncate(summary, _CHECK_BUDGET),
        text=text,
        details_url=details_url,
        actions=tuple(actions[:3]),  # GitHub allows at most three
    )


_SUBJECT_LIMIT = 72


def _one_line(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return " ".join(first.split()).rstrip(".")


def _protocol_tag(protocol_number: int | str, step_index: int) -> str:
    return f"[protocol-{int(protocol_number):04d}/{step_index:02d}]"


def commit_message(
    commit_type: str, scope: str | None, subject: str, protocol_number: int | str, step_index: int
) -> str:
    """`type(scope): subject [protocol-NNNN/XX]`, one line, subject cut to keep ≤ 72 chars.

    The tag is never cut: tooling finds a protocol's commits by it.
    """
    head = f"{commit_type}({scope}): " if scope else f"{commit_type}: "
    tag = " " + _protocol_tag(protocol_number, step_index)
    room = max(20, _SUBJECT_LIMIT - len(head) - len(tag))
    text = _one_line(subject) or "update"
    if len(text) > room:
        text = text[: room - 1].rstrip() + "…"
    return f"{head}{text}{tag}"


def plan_commit_message(task: str, number: int | str) -> str:
    """`feat(protocol): add plan for <task> [protocol-NNNN/00]`."""
    return commit_message("feat", "protocol", f"add plan for {_one_line(task)}", number, 0)


def pr_title(protocol_name: str, title: str) -> str:
    """The draft PR/MR title (GitLab's `Draft:` prefix is the forge's business)."""
    return truncate(f"[{protocol_name}] {inline(title, 200)}", 250, "…")


def draft_pr_body(
    *,
    protocol_name: str,
    task: str,
    issue_number: int | None,
    plan_files: Sequence[str],
    file_url_base: str | None = None,
    plan_excerpt: str | None = None,
    command_prefix: str = "/",
) -> str:
    """The draft PR/MR description: which issue it closes, where the plan lives, how to drive it.

    `file_url_base` (e.g. `https://github.com/o/r/blob/<branch>`) turns plan files into links.
    """
    p = command_prefix
    lines = [
        f"<!-- deksdenflow:pr protocol={protocol_name} -->",
        f"## 🤖 DeksdenFlow protocol `{inline(protocol_name, 80)}`",
        "",
        f"**Task:** {inline(task, 500)}",
    ]
    if issue_number is not None:
        lines += ["", f"Closes #{issue_number}"]
    if plan_files:
        lines += ["", "### Plan"]
        for path in plan_files:
            shown = f"`{inline(path, 200)}`"
            lines.append(
                f"- [{shown}]({file_url_base.rstrip('/')}/{path})"
                if file_url_base
                else f"- {shown}"
            )
    if plan_excerpt:
        lines += [
            "",
            "<details><summary>plan.md</summary>",
            "",
            _fence(truncate(plan_excerpt, 20_000), "markdown"),
            "",
            "</details>",
        ]
    lines += [
        "",
        "### Driving it",
        f"Comment `{p}run-step next` to execute the next step, `{p}qa N` to check step N, "
        f"`{p}retry N`, `{p}approve N`, `{p}pause`, `{p}resume`, `{p}cancel`. "
        "Progress is in the status comment and the `deksdenflow/*` checks.",
    ]
    return truncate("\n".join(lines), _COMMENT_BUDGET)


def log_entry(
    *,
    when: datetime,
    event: str,
    message: str = "",
    step_index: int | None = None,
    actor: str | None = None,
    tokens: int | None = None,
    commit_sha: str | None = None,
) -> str:
    """One line for a protocol's log.md (ends with a newline; the caller appends it)."""
    stamp = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    parts = [f"{stamp:%Y-%m-%d %H:%M:%S} UTC"]
    parts.append(f"step {step_index:02d}" if step_index is not None else "protocol")
    parts.append(f"**{inline(event, 60)}**")
    if actor:
        parts.append(f"@{inline(actor, 60)}")
    if tokens is not None:
        parts.append(f"{fmt_tokens(tokens)} tokens")
    if commit_sha:
        parts.append(f"`{short_sha(commit_sha)}`")
    line = "- " + " · ".join(parts)
    if message:
        line += " — " + inline(message, 500)
    return line + "\n"
