"""Table tests of the step runner's pure decisions (bot/domain/states.py): no fakes, no I/O."""

from __future__ import annotations

import pytest

from bot.domain.states import (
    ProtocolStatus,
    StepStatus,
    completes_protocol,
    failure_statuses,
    may_approve_step,
    may_start_step,
    resume_decision,
    step_gate,
    stopped_step_status,
)

START = [
    # protocol, approved, step → action, protocol to running, reset step
    ("running", True, "pending", "start", False, False),
    ("planned", True, "pending", "start", True, False),
    ("blocked", True, "failed", "start", True, True),
    ("failed", True, "blocked", "start", True, True),
    ("running", True, "running", "continue", False, False),
    ("blocked", True, "running", "continue", True, False),
    ("paused", True, "running", "stop", False, False),
    ("cancelled", True, "running", "stop", False, False),
    ("paused", True, "pending", "refuse", False, False),
    ("completed", True, "pending", "refuse", False, False),
    ("running", False, "pending", "wait_approval", False, False),
    ("running", True, "needs_qa", "skip", False, False),
    ("running", True, "completed", "skip", False, False),
    ("cancelled", True, "cancelled", "skip", False, False),
]


@pytest.mark.parametrize(("protocol", "approved", "step", "action", "to_running", "reset"), START)
def test_may_start_step(
    protocol: str, approved: bool, step: str, action: str, to_running: bool, reset: bool
) -> None:
    decision = may_start_step(protocol, approved, step)
    assert (decision.action, decision.protocol_to_running, decision.reset_step) == (
        action,
        to_running,
        reset,
    )


FAILURE = [
    # protocol, step → step becomes, protocol becomes
    ("running", "running", "failed", "blocked"),
    ("running", "needs_qa", "failed", "blocked"),
    ("running", "pending", "blocked", "blocked"),
    ("running", None, None, "blocked"),
    ("planning", None, None, "failed"),
    ("pending", None, None, "failed"),
    ("blocked", "failed", None, None),
    ("planned", "pending", None, None),
    ("paused", "running", "failed", None),
    ("cancelled", "cancelled", None, None),
]


@pytest.mark.parametrize(("protocol", "step", "step_to", "protocol_to"), FAILURE)
def test_failure_statuses(
    protocol: str, step: str | None, step_to: str | None, protocol_to: str | None
) -> None:
    wanted = failure_statuses(protocol, step)
    assert (wanted.step, wanted.protocol) == (step_to, protocol_to)


def test_no_failure_leaves_work_that_nobody_does() -> None:
    """The issue's rule: after a failure nothing stays running/planning with no job on it."""
    for protocol in (
        ProtocolStatus.PENDING,
        ProtocolStatus.PLANNING,
        ProtocolStatus.RUNNING,
        ProtocolStatus.PLANNED,
        ProtocolStatus.BLOCKED,
        ProtocolStatus.PAUSED,
        ProtocolStatus.CANCELLED,
    ):
        for step in (None, "pending", "running", "needs_qa"):
            wanted = failure_statuses(protocol, step)
            assert (wanted.protocol or protocol) not in (
                ProtocolStatus.PENDING,
                ProtocolStatus.PLANNING,
                ProtocolStatus.RUNNING,
            ), (
                protocol,
                step,
            )
            assert (wanted.step or step) != "running", (protocol, step)


@pytest.mark.parametrize(
    ("protocol", "step"),
    [("cancelled", "cancelled"), ("paused", "pending"), ("running", None), ("blocked", None)],
)
def test_stopped_step_status(protocol: str, step: str | None) -> None:
    assert stopped_step_status(protocol) == step


RESUME = [
    # steps, auto → action, step
    ([(1, "completed"), (2, "failed"), (3, "pending")], True, "run_step", 2),
    ([(1, "completed"), (2, "failed"), (3, "pending")], False, "run_step", 2),
    ([(1, "completed"), (2, "blocked")], False, "run_step", 2),
    ([(1, "completed"), (2, "running"), (3, "pending")], False, "run_step", 2),
    ([(1, "needs_qa"), (2, "pending")], True, "run_qa", 1),
    ([(1, "completed"), (2, "pending")], True, "run_step", 2),
    ([(1, "completed"), (2, "pending")], False, "nothing", None),
    ([(1, "completed")], True, "nothing", None),
]


@pytest.mark.parametrize(("steps", "auto", "action", "index"), RESUME)
def test_resume_reruns_the_step_that_stopped(
    steps: list[tuple[int, str]], auto: bool, action: str, index: int | None
) -> None:
    decision = resume_decision(steps, auto)
    assert (decision.action, decision.step_index) == (action, index)


@pytest.mark.parametrize(
    ("status", "ok"),
    [
        (StepStatus.FAILED, True),
        (StepStatus.BLOCKED, True),
        (StepStatus.NEEDS_QA, True),
        (StepStatus.PENDING, False),
        (StepStatus.RUNNING, False),
        (StepStatus.COMPLETED, False),
        (StepStatus.CANCELLED, False),
    ],
)
def test_may_approve_step(status: str, ok: bool) -> None:
    assert may_approve_step(status) is ok


@pytest.mark.parametrize(
    ("has_ci", "green", "gate"),
    [
        (False, None, "completed"),
        (True, True, "completed"),
        (True, None, "wait_ci"),
        (True, False, "wait_ci"),
    ],
)
def test_step_gate(has_ci: bool, green: bool | None, gate: str) -> None:
    assert step_gate(qa_passed=True, has_ci=has_ci, ci_green_on_head=green) == gate


def test_step_gate_needs_a_qa_pass() -> None:
    with pytest.raises(ValueError):
        step_gate(qa_passed=False, has_ci=False, ci_green_on_head=None)


@pytest.mark.parametrize(
    ("protocol", "others", "reopens", "expected"),
    [
        ("running", ["completed", "completed"], False, True),
        ("running", [], False, True),  # a one-step protocol
        ("running", ["completed", "needs_qa"], False, False),  # another step still waits
        ("running", ["completed", "pending"], False, False),
        ("running", ["completed"], True, False),  # a `pass` trigger sends a step back
        ("blocked", ["completed"], False, False),  # a human stopped it: no completion follows
        ("paused", ["completed"], False, False),
        ("completed", ["completed"], False, False),  # already completed: nothing follows
    ],
)
def test_completes_protocol(
    protocol: str, others: list[str], reopens: bool, expected: bool
) -> None:
    """When a step's outcome leaves the status comment to the protocol's completion."""
    assert completes_protocol(protocol, others, reopens) is expected
