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
    (ProtocolStatus.RUNNING, True, StepStatus.PENDING, "start", False, False),
    (ProtocolStatus.PLANNED, True, StepStatus.PENDING, "start", True, False),
    (ProtocolStatus.BLOCKED, True, StepStatus.FAILED, "start", True, True),
    (ProtocolStatus.FAILED, True, StepStatus.BLOCKED, "start", True, True),
    (ProtocolStatus.RUNNING, True, StepStatus.RUNNING, "continue", False, False),
    (ProtocolStatus.BLOCKED, True, StepStatus.RUNNING, "continue", True, False),
    (ProtocolStatus.PAUSED, True, StepStatus.RUNNING, "stop", False, False),
    (ProtocolStatus.CANCELLED, True, StepStatus.RUNNING, "stop", False, False),
    (ProtocolStatus.PAUSED, True, StepStatus.PENDING, "refuse", False, False),
    (ProtocolStatus.COMPLETED, True, StepStatus.PENDING, "refuse", False, False),
    (ProtocolStatus.RUNNING, False, StepStatus.PENDING, "wait_approval", False, False),
    (ProtocolStatus.RUNNING, True, StepStatus.NEEDS_QA, "skip", False, False),
    (ProtocolStatus.RUNNING, True, StepStatus.COMPLETED, "skip", False, False),
    (ProtocolStatus.CANCELLED, True, StepStatus.CANCELLED, "skip", False, False),
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
    (ProtocolStatus.RUNNING, StepStatus.RUNNING, StepStatus.FAILED, ProtocolStatus.BLOCKED),
    (ProtocolStatus.RUNNING, StepStatus.NEEDS_QA, StepStatus.FAILED, ProtocolStatus.BLOCKED),
    (ProtocolStatus.RUNNING, StepStatus.PENDING, StepStatus.BLOCKED, ProtocolStatus.BLOCKED),
    (ProtocolStatus.RUNNING, None, None, ProtocolStatus.BLOCKED),
    (ProtocolStatus.PLANNING, None, None, ProtocolStatus.FAILED),
    (ProtocolStatus.PENDING, None, None, ProtocolStatus.FAILED),
    (ProtocolStatus.BLOCKED, StepStatus.FAILED, None, None),
    (ProtocolStatus.PLANNED, StepStatus.PENDING, None, None),
    (ProtocolStatus.PAUSED, StepStatus.RUNNING, StepStatus.FAILED, None),
    (ProtocolStatus.CANCELLED, StepStatus.CANCELLED, None, None),
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
        for step in (None, StepStatus.PENDING, StepStatus.RUNNING, StepStatus.NEEDS_QA):
            wanted = failure_statuses(protocol, step)
            assert (wanted.protocol or protocol) not in (
                ProtocolStatus.PENDING,
                ProtocolStatus.PLANNING,
                ProtocolStatus.RUNNING,
            ), (
                protocol,
                step,
            )
            assert (wanted.step or step) != StepStatus.RUNNING, (protocol, step)


@pytest.mark.parametrize(
    ("protocol", "step"),
    [
        (ProtocolStatus.CANCELLED, StepStatus.CANCELLED),
        (ProtocolStatus.PAUSED, StepStatus.PENDING),
        (ProtocolStatus.RUNNING, None),
        (ProtocolStatus.BLOCKED, None),
    ],
)
def test_stopped_step_status(protocol: str, step: str | None) -> None:
    assert stopped_step_status(protocol) == step


RESUME = [
    # steps, auto → action, step
    (
        [(1, StepStatus.COMPLETED), (2, StepStatus.FAILED), (3, StepStatus.PENDING)],
        True,
        "run_step",
        2,
    ),
    (
        [(1, StepStatus.COMPLETED), (2, StepStatus.FAILED), (3, StepStatus.PENDING)],
        False,
        "run_step",
        2,
    ),
    ([(1, StepStatus.COMPLETED), (2, StepStatus.BLOCKED)], False, "run_step", 2),
    (
        [(1, StepStatus.COMPLETED), (2, StepStatus.RUNNING), (3, StepStatus.PENDING)],
        False,
        "run_step",
        2,
    ),
    ([(1, StepStatus.NEEDS_QA), (2, StepStatus.PENDING)], True, "run_qa", 1),
    ([(1, StepStatus.COMPLETED), (2, StepStatus.PENDING)], True, "run_step", 2),
    ([(1, StepStatus.COMPLETED), (2, StepStatus.PENDING)], False, "nothing", None),
    ([(1, StepStatus.COMPLETED)], True, "nothing", None),
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
        (ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.COMPLETED], False, True),
        (ProtocolStatus.RUNNING, [], False, True),  # a one-step protocol
        (
            ProtocolStatus.RUNNING,
            [StepStatus.COMPLETED, StepStatus.NEEDS_QA],
            False,
            False,
        ),  # another step still waits
        (ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.PENDING], False, False),
        (
            ProtocolStatus.RUNNING,
            [StepStatus.COMPLETED],
            True,
            False,
        ),  # a `pass` trigger sends a step back
        (
            ProtocolStatus.BLOCKED,
            [StepStatus.COMPLETED],
            False,
            False,
        ),  # a human stopped it: no completion follows
        (ProtocolStatus.PAUSED, [StepStatus.COMPLETED], False, False),
        (
            ProtocolStatus.COMPLETED,
            [StepStatus.COMPLETED],
            False,
            False,
        ),  # already completed: nothing follows
    ],
)
def test_completes_protocol(
    protocol: str, others: list[str], reopens: bool, expected: bool
) -> None:
    """When a step's outcome leaves the status comment to the protocol's completion."""
    assert completes_protocol(protocol, others, reopens) is expected
