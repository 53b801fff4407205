"""Protocol/step state machine: allowed moves, conflicts, CAS source sets."""

from __future__ import annotations

import itertools

import pytest

from bot.core.errors import TransitionConflict
from bot.domain.states import (
    PROTOCOL_TRANSITIONS,
    STEP_TRANSITIONS,
    ProtocolStatus,
    StepStatus,
    allowed_protocol_sources,
    allowed_sources,
    allowed_step_sources,
    can_transition_protocol,
    can_transition_step,
    check_protocol_transition,
    check_step_transition,
    is_terminal,
)

P = ProtocolStatus
S = StepStatus

PROTOCOL_ALLOWED = [
    ("pending", "planning"),
    ("pending", "cancelled"),
    ("planning", "planned"),
    ("planning", "failed"),
    ("planning", "cancelled"),
    ("planned", "running"),
    ("planned", "cancelled"),
    ("planned", "planning"),
    ("running", "paused"),
    ("running", "blocked"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("running", "completed"),
    ("paused", "running"),
    ("paused", "cancelled"),
    ("blocked", "running"),
    ("blocked", "cancelled"),
    ("failed", "planning"),
    ("failed", "running"),
    ("completed", "blocked"),  # red CI after completion reopens
]

PROTOCOL_REFUSED = [
    ("pending", "running"),
    ("pending", "completed"),
    ("planning", "running"),
    ("planned", "completed"),
    ("paused", "completed"),
    ("blocked", "completed"),
    ("completed", "running"),
    ("completed", "planning"),
    ("cancelled", "running"),
    ("cancelled", "planning"),
    ("running", "running"),
    ("running", "planning"),
]

STEP_ALLOWED = [
    ("pending", "running"),
    ("pending", "cancelled"),
    ("pending", "blocked"),
    ("running", "needs_qa"),
    ("running", "completed"),
    ("running", "failed"),
    ("running", "blocked"),
    ("running", "cancelled"),
    ("needs_qa", "running"),
    ("needs_qa", "completed"),
    ("needs_qa", "failed"),
    ("needs_qa", "blocked"),
    ("needs_qa", "pending"),
    ("failed", "pending"),
    ("failed", "completed"),  # /approve N accepts a failed step
    ("running", "pending"),  # /pause stopped the attempt; it runs again on /resume
    ("blocked", "pending"),
    ("blocked", "completed"),
    ("completed", "pending"),
    ("completed", "needs_qa"),
    ("completed", "blocked"),  # red CI after completion reopens
]

STEP_REFUSED = [
    ("pending", "completed"),
    ("pending", "needs_qa"),
    ("failed", "running"),
    ("cancelled", "pending"),
    ("cancelled", "running"),
    ("completed", "running"),
    ("running", "running"),
]


@pytest.mark.parametrize(("current", "wanted"), PROTOCOL_ALLOWED)
def test_protocol_allowed(current: str, wanted: str) -> None:
    assert check_protocol_transition(current, wanted, 7) == P(wanted)
    assert can_transition_protocol(P(current), P(wanted))
    assert P(current) in allowed_protocol_sources(wanted)


@pytest.mark.parametrize(("current", "wanted"), PROTOCOL_REFUSED)
def test_protocol_conflict(current: str, wanted: str) -> None:
    with pytest.raises(TransitionConflict) as info:
        check_protocol_transition(current, wanted, 7)
    err = info.value
    assert (err.kind, err.entity_id, err.current, err.wanted) == (
        "protocol_run",
        7,
        current,
        wanted,
    )
    assert not can_transition_protocol(current, wanted)
    assert P(current) not in allowed_protocol_sources(wanted)


@pytest.mark.parametrize(("current", "wanted"), STEP_ALLOWED)
def test_step_allowed(current: str, wanted: str) -> None:
    assert check_step_transition(S(current), S(wanted), 3) == S(wanted)
    assert can_transition_step(current, wanted)
    assert S(current) in allowed_step_sources(wanted)


@pytest.mark.parametrize(("current", "wanted"), STEP_REFUSED)
def test_step_conflict(current: str, wanted: str) -> None:
    with pytest.raises(TransitionConflict) as info:
        check_step_transition(current, wanted, 3)
    assert (info.value.kind, info.value.entity_id) == ("step_run", 3)
    assert "step_run 3 is" in str(info.value)


def test_tables_cover_every_status() -> None:
    assert set(PROTOCOL_TRANSITIONS) == set(P)
    assert set(STEP_TRANSITIONS) == set(S)


def test_sources_are_the_inverse_of_the_tables() -> None:
    for src, dst in itertools.product(P, P):
        assert (src in allowed_sources(dst)) == (dst in PROTOCOL_TRANSITIONS[src])
    for src2, dst2 in itertools.product(S, S):
        assert (src2 in allowed_sources(dst2)) == (dst2 in STEP_TRANSITIONS[src2])


def test_sources_examples() -> None:
    assert allowed_sources(P.RUNNING) == {P.PLANNED, P.PAUSED, P.BLOCKED, P.FAILED}
    assert allowed_sources(P.PENDING) == frozenset()
    assert allowed_sources(S.PENDING) == {S.RUNNING, S.NEEDS_QA, S.FAILED, S.BLOCKED, S.COMPLETED}
    # StrEnum members compare equal to their values, which is what a SQL IN (...) gets.
    assert P.PLANNED in allowed_sources(P.RUNNING)


def test_allowed_sources_needs_an_enum() -> None:
    with pytest.raises(TypeError):
        allowed_sources("running")  # type: ignore[call-overload]


def test_unknown_status_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        check_protocol_transition("sleeping", "running", 1)


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (P.COMPLETED, True),
        (P.CANCELLED, True),
        (P.FAILED, True),
        (P.RUNNING, False),
        (P.BLOCKED, False),
        (P.PAUSED, False),
        (S.COMPLETED, True),
        (S.NEEDS_QA, False),
        (S.BLOCKED, False),
        ("cancelled", True),
        ("pending", False),
    ],
)
def test_is_terminal(status: ProtocolStatus | StepStatus | str, terminal: bool) -> None:
    assert is_terminal(status) is terminal


def test_final_states_have_no_exit() -> None:
    # completed is final but for one door: a red CI after completion reopens it to blocked
    assert PROTOCOL_TRANSITIONS[P.COMPLETED] == frozenset({P.BLOCKED})
    assert PROTOCOL_TRANSITIONS[P.CANCELLED] == frozenset()
    assert STEP_TRANSITIONS[S.CANCELLED] == frozenset()


def test_conflict_message_reads_the_same_for_enum_members() -> None:
    """Callers pass enum members or stored strings; the 409 text must not show the enum's repr."""
    for current, wanted in ((P.BLOCKED, P.RUNNING), ("blocked", "running")):
        err = TransitionConflict("protocol_run", 7, current, wanted)
        assert str(err) == "protocol_run 7 is 'blocked'; cannot move to 'running'"
