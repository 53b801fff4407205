"""What a CI result means for which step, and the QA/CI gate: table tests, no fakes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from bot.domain.ci_gate import (
    CIMeaning,
    StepCI,
    current_step,
    gate_after_qa,
    head_of,
    hold_for_ci,
    interpret_ci,
    step_ci,
    step_for_sha,
)
from bot.domain.policies import QADecision
from bot.domain.states import ProtocolStatus, StepStatus

A, QA_A, B, QA_B, PLAN, OLD = "a" * 40, "1" * 40, "b" * 40, "2" * 40, "c" * 40, "d" * 40


def green(sha: str, for_commit: str) -> dict[str, str]:
    return {"sha": sha, "result": "success", "for_commit": for_commit}


def red(sha: str, for_commit: str) -> dict[str, str]:
    return {"sha": sha, "result": "failure", "for_commit": for_commit}


S1 = StepCI(1, StepStatus.COMPLETED, A, QA_A, qa_passed_on=A, ci=green(A, A))
S2 = StepCI(2, StepStatus.NEEDS_QA, B)
S2_QA = replace(S2, qa_commit=QA_B, qa_passed_on=B)


def meaning(
    steps: list[StepCI],
    sha: str,
    result: str,
    status: str = ProtocolStatus.RUNNING,
    qa_queued: bool = True,
    auto_qa_on_ci: bool = True,
    merged: bool = False,
) -> tuple[str, int | None]:
    m: CIMeaning = interpret_ci(
        status,
        steps,
        sha,
        result,  # type: ignore[arg-type]
        qa_queued=qa_queued,
        auto_qa_on_ci=auto_qa_on_ci,
        merged=merged,
    )
    return m.action, m.step_index


@pytest.mark.parametrize(
    ("steps", "sha", "result", "kw", "expected"),
    [
        # attribution: CI is about the step whose commit it ran on, never "the current step"
        ([S1, S2], A, "failure", {}, ("reopen", 1)),
        ([S1, S2], B, "failure", {}, ("loop", 2)),
        ([S1, S2], QA_A, "failure", {}, ("reopen", 1)),  # the QA-report commit is the step's too
        ([S1, S2], PLAN, "success", {}, ("stale", None)),
        ([S1, S2], OLD, "failure", {}, ("stale", None)),
        # a step being redone: CI of its previous attempt is stale
        ([S1, replace(S2, status=StepStatus.RUNNING)], B, "failure", {}, ("stale", 2)),
        ([S1, replace(S2, status=StepStatus.PENDING)], B, "success", {}, ("stale", 2)),
        # green: QA queued → wait; QA passed → complete; no auto QA → run it, or complete
        ([S1, S2], B, "success", {}, ("record", 2)),
        ([S1, S2_QA], B, "success", {}, ("complete", 2)),
        ([S1, S2_QA], QA_B, "success", {}, ("complete", 2)),
        ([S1, S2], B, "success", {"qa_queued": False}, ("run_qa", 2)),
        ([S1, S2], B, "success", {"qa_queued": False, "auto_qa_on_ci": False}, ("complete", 2)),
        ([S1, replace(S2, qa_policy="skip")], B, "success", {}, ("complete", 2)),
        ([S1, S2], A, "success", {}, ("duplicate", 1)),
        ([S1, S2], QA_A, "success", {}, ("record", 1)),
        # one decision per run: the second webhook about the same sha and result is a duplicate
        (
            [S1, replace(S2, status=StepStatus.FAILED, ci=red(B, B))],
            B,
            "failure",
            {},
            ("duplicate", 2),
        ),
        (
            [S1, replace(S2_QA, status=StepStatus.FAILED, ci=red(B, B))],
            QA_B,
            "failure",
            {},
            ("record", 2),
        ),
        (
            [S1, replace(S2, status=StepStatus.BLOCKED, ci=red(B, B))],
            B,
            "success",
            {},
            ("record", 2),
        ),
        # a verdict on an earlier attempt (for_commit differs) does not make this one a duplicate
        ([S1, replace(S2, ci=red(B, OLD))], B, "failure", {}, ("loop", 2)),
        # after completion: reopened, unless the pull request was merged
        (
            [S1],
            A,
            "failure",
            {"status": ProtocolStatus.COMPLETED},
            ("reopen", 1),
        ),  # a re-run turned red
        ([replace(S1, ci=None)], A, "failure", {"status": ProtocolStatus.COMPLETED}, ("reopen", 1)),
        (
            [replace(S1, ci=None)],
            A,
            "failure",
            {"status": ProtocolStatus.COMPLETED, "merged": True},
            ("record", 1),
        ),
        ([S1, S2], B, "failure", {"status": ProtocolStatus.CANCELLED}, ("ignore", None)),
        ([S1, S2], B, "failure", {"status": ProtocolStatus.PLANNING}, ("ignore", None)),
    ],
)
def test_interpret_ci(
    steps: list[StepCI], sha: str, result: str, kw: dict[str, Any], expected: tuple[str, int | None]
) -> None:
    assert meaning(steps, sha, result, **kw) == expected


@pytest.mark.parametrize(
    ("step", "has_ci", "expected"),
    [
        (S2_QA, False, "completed"),  # without CI, QA alone gates
        (S2_QA, True, "waiting-ci"),
        (replace(S2_QA, ci=green(B, B)), True, "completed"),
        (replace(S2_QA, ci=green(QA_B, B)), True, "completed"),
        (replace(S2_QA, ci=green(B, OLD)), True, "waiting-ci"),  # green on an earlier attempt
        (replace(S2_QA, ci=red(B, B)), True, "ci-failed"),
        (replace(S2_QA, status=StepStatus.FAILED, ci=red(B, B)), True, "ci-failed"),
        (replace(S2_QA, status=StepStatus.COMPLETED), True, "already"),
        (replace(S2_QA, status=StepStatus.PENDING), True, "already"),
    ],
)
def test_gate_after_qa(step: StepCI, has_ci: bool, expected: str) -> None:
    assert gate_after_qa(step, has_ci) == expected


def test_qa_passed_belongs_to_the_attempt() -> None:
    assert S2_QA.qa_passed
    assert not replace(S2_QA, qa_passed_on=OLD).qa_passed  # QA passed on an earlier attempt
    assert replace(S2, qa_policy="skip").qa_passed


def test_hold_for_ci() -> None:
    skip = QADecision(StepStatus.COMPLETED, False, "skip", "QA policy is skip")
    assert hold_for_ci(skip, False) == skip
    held = hold_for_ci(skip, True)
    assert (held.status, held.run_qa) == (
        StepStatus.NEEDS_QA,
        False,
    ) and "waiting for CI" in held.reason
    qa = QADecision(StepStatus.NEEDS_QA, True, "full", "x")
    assert hold_for_ci(qa, True) == qa


def test_lookups() -> None:
    assert step_for_sha([S1, S2], QA_A) == S1
    assert step_for_sha([S1, S2], PLAN) is None
    assert current_step([S1, S2]) == S2
    assert current_step([S1]) == S1
    assert head_of(S1) == QA_A and head_of(S2) == B


class Row:
    def __init__(self) -> None:
        self.step_index = 3
        self.status = StepStatus.NEEDS_QA
        self.policy = {"qa": {"policy": "light"}}
        self.runtime_state = {
            "commit_sha": A,
            "qa_commit": "",
            "ci": green(A, A),
            "qa_passed_on": A,
        }


def test_step_ci_from_a_row() -> None:
    view = step_ci(Row())
    assert (view.index, view.commit_sha, view.qa_commit, view.qa_policy) == (3, A, None, "light")
    assert view.ci_result == "success" and view.qa_passed
    assert step_ci(Row(), "skip").qa_policy == "skip"


STATUSES = (
    StepStatus.PENDING,
    StepStatus.RUNNING,
    StepStatus.NEEDS_QA,
    StepStatus.COMPLETED,
    StepStatus.FAILED,
    StepStatus.BLOCKED,
)
VERDICTS = (None, green(B, B), red(B, B), green(QA_B, B), red(B, OLD))


def test_invariants_over_every_combination() -> None:
    """Exhaustively: a decision is about the step owning the sha, never another; only a step
    whose both gates are green (or whose QA is not wanted) completes; only a completed step is
    reopened; a repeat of the recorded verdict decides nothing."""
    import itertools

    count = 0
    for (
        status,
        verdict,
        qa_passed_on,
        policy,
        sha,
        result,
        queued,
        on_ci,
        proto,
    ) in itertools.product(
        STATUSES,
        VERDICTS,
        (None, B, OLD),
        ("full", "skip"),
        (A, B, QA_B, PLAN),
        ("success", "failure"),
        (True, False),
        (True, False),
        (ProtocolStatus.RUNNING, ProtocolStatus.COMPLETED, ProtocolStatus.BLOCKED),
    ):
        s2 = StepCI(2, status, B, QA_B, qa_passed_on=qa_passed_on, qa_policy=policy, ci=verdict)
        m = interpret_ci(proto, [S1, s2], sha, result, qa_queued=queued, auto_qa_on_ci=on_ci)  # type: ignore[arg-type]
        count += 1
        owner = 1 if sha == A else 2 if sha in (B, QA_B) else None
        assert m.step_index in (owner, None)
        if owner is None:
            assert m.action == "stale"
            continue
        assert m.step_index == owner, m
        if owner != 2:
            continue
        if m.action == "complete":
            assert status == StepStatus.NEEDS_QA and result == "success"
            assert s2.qa_passed or (not queued and not on_ci)
        if m.action == "reopen":
            assert status == StepStatus.COMPLETED and result == "failure"
        if m.action == "loop":
            assert status == StepStatus.NEEDS_QA and result == "failure"
        if m.action == "duplicate":
            assert verdict is not None and verdict["sha"] == sha and verdict["result"] == result
        if status in (StepStatus.PENDING, StepStatus.RUNNING):
            assert m.action == "stale"
    assert count == 6 * 5 * 3 * 2 * 4 * 2 * 2 * 2 * 3
