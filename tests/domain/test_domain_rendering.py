"""Status comment, check runs, commit messages, PR body and log lines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from bot.domain.rendering import (
    COMMENT_LIMIT,
    ProtocolView,
    StepView,
    check_name,
    check_run_output,
    commit_message,
    draft_pr_body,
    fmt_duration,
    log_entry,
    parse_check_name,
    plan_commit_message,
    pr_title,
    status_comment,
    status_marker,
    text_size,
    truncate,
)
from bot.domain.states import ProtocolStatus, StepStatus
from bot.forge.base import CheckReport

STEPS = [
    StepView(
        1,
        "User model",
        StepStatus.COMPLETED,
        qa_verdict="PASS",
        tokens=12_345,
        duration_seconds=123,
        check_url="https://x/c/1",
        commit_sha="abc1234def",
    ),
    StepView(2, "Login view", StepStatus.NEEDS_QA, tokens=999, output="did things"),
    StepView(3, "Docs", StepStatus.PENDING),
]


def view(**kw: Any) -> ProtocolView:
    base: dict[str, Any] = dict(
        name="0001-login",
        status=ProtocolStatus.RUNNING,
        task="Add a login page",
        steps=STEPS,
        current_step=2,
        branch="0001-login",
        branch_url="https://x/tree/0001-login",
        pr_url="https://x/pull/5",
        pr_number=5,
        tokens_used=13_344,
        token_budget=100_000,
        updated_at=datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
    )
    base.update(kw)
    return ProtocolView(**base)


def test_status_comment_shape() -> None:
    body = status_comment(view())
    assert body.startswith("<!-- deksdenflow:status protocol=0001-login -->\n")
    assert status_marker("0001-login") in body
    assert (
        "- [x] ✅ **01** User model · QA ✅ PASS · 12,345 tokens · 2m 03s · `abc1234def` · [check](https://x/c/1)"
        in body
    )
    assert "- [ ] 🔍 **02** Login view · QA pending · 999 tokens ← **current**" in body
    assert "- [ ] ⬜ **03** Docs" in body
    assert "**Current step:** 02 — Login view" in body
    assert "**PR:** [#5](https://x/pull/5)" in body
    assert "**Tokens:** 13,344 / 100,000" in body
    assert "<details><summary>Step 02 output</summary>" in body
    assert "updated 2024-05-01 12:30 UTC" in body


def test_status_comment_without_steps() -> None:
    body = status_comment(ProtocolView(name="0002-x", status=ProtocolStatus.PLANNING))
    assert body.startswith(status_marker("0002-x"))
    assert "No steps planned yet" in body


def test_status_comment_blocked_message() -> None:
    body = status_comment(
        view(status=ProtocolStatus.BLOCKED, message="CI failed the same way twice")
    )
    assert "⛔" in body and "CI failed the same way twice" in body


def test_untrusted_titles_cannot_inject_markers_or_break_lines() -> None:
    evil = StepView(
        1, "x <!-- deksdenflow:status protocol=0009-other -->\n# heading", StepStatus.PENDING
    )
    body = status_comment(view(steps=[evil], current_step=None))
    assert body.count("<!--") == 1
    assert "0009-other" in body and "\n# heading" not in body


def test_output_cannot_escape_its_fence() -> None:
    out = "before\n```\n</details>\n<!-- x -->\n" + "`" * 40 + "\nafter"
    body = status_comment(view(steps=[StepView(1, "t", StepStatus.FAILED, output=out)]))
    section = body.split("<summary>Step 01 output</summary>", 1)[1]
    fence = section.split("\n")[2]
    assert set(fence) == {"`"} and len(fence) >= 4
    assert section.count("\n" + fence + "\n") == 2  # the opening and closing fence only


@pytest.mark.parametrize(
    "steps",
    [
        # a few steps with enormous outputs and reports
        [
            StepView(
                i,
                "t" * 500,
                StepStatus.FAILED,
                output="o" * 1_000_000,
                qa_report="r" * 500_000,
                error="e" * 200_000,
            )
            for i in range(1, 4)
        ],
        # many steps, each with a large output
        [
            StepView(i, f"step {i}", StepStatus.COMPLETED, output="x" * 20_000, qa_verdict="PASS")
            for i in range(1, 200)
        ],
        # so many steps that even the checklist would not fit
        [StepView(i, "long title " * 20, StepStatus.PENDING) for i in range(1, 5_000)],
        # astral characters count twice in UTF-16
        [StepView(1, "😀" * 1000, StepStatus.RUNNING, output="😀" * 200_000)],
        # backtick storms
        [StepView(1, "t", StepStatus.FAILED, output="`" * 300_000)],
    ],
)
def test_status_comment_always_fits(steps: list[StepView]) -> None:
    body = status_comment(
        view(steps=steps, current_step=steps[-1].index, task="T" * 100_000, message="m" * 100_000)
    )
    assert len(body) < COMMENT_LIMIT
    assert text_size(body) < COMMENT_LIMIT
    assert body.startswith(status_marker("0001-login"))
    assert body.rstrip().endswith("</sub>")


def test_status_comment_prioritises_current_step_output() -> None:
    steps = [
        StepView(i, f"s{i}", StepStatus.COMPLETED, output=f"out-{i}-" + "x" * 30_000)
        for i in range(1, 30)
    ]
    body = status_comment(view(steps=steps, current_step=7))
    assert "Step 07 output" in body
    assert "more outputs omitted" in body


@pytest.mark.parametrize(
    ("text", "limit"),
    [("a" * 100, 10), ("😀" * 100, 11), ("short", 100), ("x" * 100, 0), ("😀" * 10, 1)],
)
def test_truncate_respects_limit(text: str, limit: int) -> None:
    out = truncate(text, limit)
    assert text_size(out) <= limit
    if text_size(text) <= limit:
        assert out == text


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "—"),
        (0, "0s"),
        (59.4, "59s"),
        (60, "1m 00s"),
        (123, "2m 03s"),
        (3600, "1h 00m"),
        (3725, "1h 02m"),
    ],
)
def test_fmt_duration(seconds: float | None, shown: str) -> None:
    assert fmt_duration(seconds) == shown


def check(**kw: Any) -> CheckReport:
    base: dict[str, Any] = dict(
        kind="step", protocol_name="0001-login", step=STEPS[1], head_sha="f" * 40
    )
    base.update(kw)
    return check_run_output(**base)


def action_ids(report: CheckReport) -> list[str]:
    return [a.identifier for a in report.actions]


@pytest.mark.parametrize(
    ("kw", "name", "conclusion", "actions"),
    [
        ({}, "deksdenflow/step-02", "success", ["run-qa", "run-next"]),
        ({"has_next_step": False}, "deksdenflow/step-02", "success", ["run-qa"]),
        ({"step": STEPS[0]}, "deksdenflow/step-01", "success", ["run-next"]),
        (
            {"step": StepView(4, "t", StepStatus.FAILED)},
            "deksdenflow/step-04",
            "failure",
            ["retry-step"],
        ),
        (
            {"step": StepView(4, "t", StepStatus.BLOCKED)},
            "deksdenflow/step-04",
            "action_required",
            ["retry-step"],
        ),
        ({"kind": "qa", "verdict": "PASS"}, "deksdenflow/qa-02", "success", ["run-next"]),
        (
            {"kind": "qa", "verdict": "FAIL"},
            "deksdenflow/qa-02",
            "failure",
            ["retry-step", "run-qa"],
        ),
        ({"kind": "qa", "verdict": None}, "deksdenflow/qa-02", "failure", ["retry-step", "run-qa"]),
        ({"status": "in_progress"}, "deksdenflow/step-02", None, []),
        ({"status": "queued", "conclusion": "success"}, "deksdenflow/step-02", None, []),
        ({"conclusion": "neutral"}, "deksdenflow/step-02", "neutral", ["retry-step"]),
    ],
)
def test_check_run_output(
    kw: dict[str, Any], name: str, conclusion: str | None, actions: list[str]
) -> None:
    report = check(**kw)
    assert report.name == name
    assert report.conclusion == conclusion
    assert action_ids(report) == actions
    assert report.head_sha == "f" * 40
    assert "0001-login" in report.summary


def test_check_run_limits_with_huge_inputs() -> None:
    report = check(
        kind="qa",
        verdict="FAIL",
        step=StepView(99, "t" * 10_000, StepStatus.NEEDS_QA),
        changed_files=[f"src/file_{i}.py" for i in range(10_000)],
        quality_report="q" * 1_000_000,
        tokens=10**9,
        message="m" * 100_000,
    )
    assert text_size(report.summary) <= 65_535
    assert text_size(report.text) <= 65_535
    assert len(report.title) <= 200
    assert len(report.actions) <= 3
    for a in report.actions:
        assert len(a.label) <= 20 and len(a.description) <= 40 and len(a.identifier) <= 20
    assert "… and 9950 more" in report.summary
    assert "### Quality report (excerpt)" in report.summary


def test_check_summary_content() -> None:
    report = check(
        kind="qa", verdict="PASS", tokens=1234, changed_files=["a.py"], quality_report="All fine"
    )
    assert report.title.startswith("QA 02 PASS")
    assert "**Verdict:** ✅ PASS" in report.summary
    assert "**Tokens:** 1,234" in report.summary
    assert "- `a.py`" in report.summary
    assert "All fine" in report.text


@pytest.mark.parametrize(("kind", "index"), [("step", 1), ("qa", 12), ("step", 123)])
def test_check_name_round_trip(kind: Any, index: int) -> None:
    assert parse_check_name(check_name(kind, index)) == (kind, index)


@pytest.mark.parametrize(
    "name", ["ci/test", "deksdenflow/step-1", "deksdenflow/lint-01", "deksdenflow/qa-01x"]
)
def test_parse_foreign_check_names(name: str) -> None:
    assert parse_check_name(name) is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("feat", "auth", "add user model", 1, 1), "feat(auth): add user model [protocol-0001/01]"),
        (
            ("fix", None, "Handle empty input.", "0042", 3),
            "fix: Handle empty input [protocol-0042/03]",
        ),
        (("docs", "", "first line\nsecond line", 7, 12), "docs: first line [protocol-0007/12]"),
        (("chore", "x", "   ", 1, 2), "chore(x): update [protocol-0001/02]"),
    ],
)
def test_commit_message(args: Any, expected: str) -> None:
    assert commit_message(*args) == expected


def test_commit_message_long_subject_keeps_the_tag() -> None:
    msg = commit_message("refactor", "storage", "x" * 300, 12, 4)
    assert msg.endswith(" [protocol-0012/04]")
    assert len(msg) <= 72
    assert "\n" not in msg
    assert "…" in msg


def test_plan_commit_message() -> None:
    assert (
        plan_commit_message("Add a login page", 3)
        == "feat(protocol): add plan for Add a login page [protocol-0003/00]"
    )
    long = plan_commit_message("word " * 50, 3)
    assert long.endswith("[protocol-0003/00]") and len(long) <= 72


def test_pr_title() -> None:
    assert pr_title("0001-login", "Login\npage") == "[0001-login] Login page"
    assert len(pr_title("0001-login", "t" * 1000)) <= 250


def test_draft_pr_body() -> None:
    body = draft_pr_body(
        protocol_name="0001-login",
        task="Add login",
        issue_number=12,
        plan_files=[".protocols/0001-login/plan.md", ".protocols/0001-login/01-model.md"],
        file_url_base="https://github.com/o/r/blob/0001-login/",
        plan_excerpt="# Plan\n```\ncode\n```",
    )
    assert "Closes #12" in body
    assert (
        "[`.protocols/0001-login/plan.md`](https://github.com/o/r/blob/0001-login/.protocols/0001-login/plan.md)"
        in body
    )
    assert "/run-step next" in body
    assert "````markdown" in body


def test_draft_pr_body_without_issue_or_links() -> None:
    body = draft_pr_body(protocol_name="0001-x", task="t", issue_number=None, plan_files=["p.md"])
    assert "Closes" not in body
    assert "- `p.md`" in body
    huge = draft_pr_body(
        protocol_name="0001-x",
        task="t" * 10**6,
        issue_number=1,
        plan_files=["p"] * 100_000,
        plan_excerpt="x" * 10**6,
    )
    assert text_size(huge) < COMMENT_LIMIT


def test_log_entry() -> None:
    when = datetime(2024, 5, 1, 14, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    line = log_entry(
        when=when,
        event="executed",
        step_index=2,
        actor="alice",
        tokens=1500,
        commit_sha="abcdef1234567",
        message="done\nwell",
    )
    assert (
        line == "- 2024-05-01 12:00:05 UTC · step 02 · **executed** · @alice · 1,500 tokens · "
        "`abcdef123456` — done well\n"
    )
    naive = log_entry(when=datetime(2024, 1, 1), event="planned")
    assert naive == "- 2024-01-01 00:00:00 UTC · protocol · **planned**\n"


def test_a_qa_passed_step_waiting_for_ci_says_so() -> None:
    view = ProtocolView(
        name="0001-x",
        status=ProtocolStatus.RUNNING,
        steps=(StepView(index=1, title="One", status=StepStatus.NEEDS_QA, qa_verdict="PASS"),),
    )
    assert "PASS · waiting for CI" in status_comment(view)
