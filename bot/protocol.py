"""ProtocolRun and StepRun statuses and their allowed transitions (pure; the DB does the CAS).

Protocol runs::

    from        to                                   why
    pending     planning | cancelled | failed        plan job starts; /cancel; could not start
    planning    planned | failed | cancelled         plan validated; engine/schema error; /cancel
    planned     running | planning | cancelled       /run-step or auto; /plan again; /cancel
    running     paused | blocked | failed |          /pause; QA/CI/budget needs a human;
                cancelled | completed                step execution error; /cancel; last step done
    paused      running | cancelled                  /resume; /cancel
    blocked     running | cancelled                  /resume, /retry, /approve; /cancel
    failed      planning | running | cancelled       /plan retry after a failed plan; /retry a
                                                     step; /cancel to close it for good
    completed   blocked                              CI turned red after completion (reopened)
    cancelled   (none)

Step runs::

    from        to                                   why
    pending     running | blocked | cancelled        job starts; budget exhausted; /cancel
    running     needs_qa | completed | failed |      executed (QA due); executed with QA skip;
                blocked | cancelled                  engine error; step budget; /cancel
    needs_qa    running | completed | failed |       QA (or re-execution) starts; PASS or
                blocked | cancelled | pending        /approve; QA could not run; FAIL with no
                                                     loop left; /cancel; loop resets it
    completed   pending | needs_qa | blocked         a later step's loop resets it; /qa N again;
                                                     CI turned red after completion (reopened)
    failed      pending                              /retry or a loop resets it
    blocked     pending | completed                  /retry or a loop; /approve
    cancelled   (none)

Same-status moves are not in the tables: whether a repeated job treats them as a no-op is the
caller's (idempotency) decision, not the state machine's.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import overload

from bot.errors import TransitionConflict


class ProtocolStatus(StrEnum):
    """Where a ProtocolRun is."""

    PENDING = "pending"
    PLANNING = "planning"
    PLANNED = "planned"
    RUNNING = "running"
    PAUSED = "paused"
    BLOCKED = "blocked"
    FAILED = "failed"
    CANCELLED = "cancelled"
    COMPLETED = "completed"


class StepStatus(StrEnum):
    """Where a StepRun is."""

    PENDING = "pending"
    RUNNING = "running"
    NEEDS_QA = "needs_qa"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"


_P = ProtocolStatus
_S = StepStatus

PROTOCOL_TRANSITIONS: Mapping[ProtocolStatus, frozenset[ProtocolStatus]] = {
    _P.PENDING: frozenset({_P.PLANNING, _P.CANCELLED, _P.FAILED}),
    _P.PLANNING: frozenset({_P.PLANNED, _P.FAILED, _P.CANCELLED}),
    _P.PLANNED: frozenset({_P.RUNNING, _P.PLANNING, _P.CANCELLED}),
    _P.RUNNING: frozenset({_P.PAUSED, _P.BLOCKED, _P.FAILED, _P.CANCELLED, _P.COMPLETED}),
    _P.PAUSED: frozenset({_P.RUNNING, _P.CANCELLED}),
    _P.BLOCKED: frozenset({_P.RUNNING, _P.CANCELLED}),
    _P.FAILED: frozenset({_P.PLANNING, _P.RUNNING, _P.CANCELLED}),
    # a red CI after completion reopens the protocol (never dropped): see bot/ci_gate.py
    _P.COMPLETED: frozenset({_P.BLOCKED}),
    _P.CANCELLED: frozenset(),
}

STEP_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    _S.PENDING: frozenset({_S.RUNNING, _S.BLOCKED, _S.CANCELLED}),
    _S.RUNNING: frozenset({_S.NEEDS_QA, _S.COMPLETED, _S.FAILED, _S.BLOCKED, _S.CANCELLED}),
    _S.NEEDS_QA: frozenset(
        {_S.RUNNING, _S.COMPLETED, _S.FAILED, _S.BLOCKED, _S.CANCELLED, _S.PENDING}
    ),
    _S.COMPLETED: frozenset({_S.PENDING, _S.NEEDS_QA, _S.BLOCKED}),
    _S.FAILED: frozenset({_S.PENDING}),
    _S.BLOCKED: frozenset({_S.PENDING, _S.COMPLETED}),
    _S.CANCELLED: frozenset(),
}

# "Terminal" = no job will touch it again on its own. FAILED can still be revived by an
# explicit human /retry (or /plan), and a completed step by a loop reset; CANCELLED protocols
# are final, COMPLETED ones too except that a red CI on their commits reopens them.
PROTOCOL_TERMINAL = frozenset({_P.COMPLETED, _P.FAILED, _P.CANCELLED})
STEP_TERMINAL = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})


def _invert(
    table: Mapping[ProtocolStatus, frozenset[ProtocolStatus]] | Mapping[StepStatus, frozenset[StepStatus]],
) -> dict[str, frozenset[str]]:
    sources: dict[str, set[str]] = {}
    for src, targets in table.items():
        for dst in targets:
            sources.setdefault(dst, set()).add(src)
    return {dst: frozenset(srcs) for dst, srcs in sources.items()}


_PROTOCOL_SOURCES = {
    ProtocolStatus(k): frozenset(ProtocolStatus(s) for s in v)
    for k, v in _invert(PROTOCOL_TRANSITIONS).items()
}
_STEP_SOURCES = {
    StepStatus(k): frozenset(StepStatus(s) for s in v) for k, v in _invert(STEP_TRANSITIONS).items()
}


def allowed_protocol_sources(wanted: ProtocolStatus | str) -> frozenset[ProtocolStatus]:
    """Statuses from which a ProtocolRun may move to `wanted` (for `UPDATE ... WHERE status IN`)."""
    return _PROTOCOL_SOURCES.get(ProtocolStatus(wanted), frozenset())


def allowed_step_sources(wanted: StepStatus | str) -> frozenset[StepStatus]:
    """Statuses from which a StepRun may move to `wanted`."""
    return _STEP_SOURCES.get(StepStatus(wanted), frozenset())


@overload
def allowed_sources(wanted: ProtocolStatus) -> frozenset[ProtocolStatus]: ...
@overload
def allowed_sources(wanted: StepStatus) -> frozenset[StepStatus]: ...
def allowed_sources(
    wanted: ProtocolStatus | StepStatus,
) -> frozenset[ProtocolStatus] | frozenset[StepStatus]:
    """Dispatch on the enum type; plain strings are ambiguous ("completed"), use the typed ones."""
    if isinstance(wanted, ProtocolStatus):
        return allowed_protocol_sources(wanted)
    if isinstance(wanted, StepStatus):
        return allowed_step_sources(wanted)
    raise TypeError(f"allowed_sources needs a ProtocolStatus or StepStatus, got {wanted!r}")


def can_transition_protocol(current: ProtocolStatus | str, wanted: ProtocolStatus | str) -> bool:
    """Whether the protocol table allows `current → wanted`."""
    return ProtocolStatus(wanted) in PROTOCOL_TRANSITIONS[ProtocolStatus(current)]


def can_transition_step(current: StepStatus | str, wanted: StepStatus | str) -> bool:
    """Whether the step table allows `current → wanted`."""
    return StepStatus(wanted) in STEP_TRANSITIONS[StepStatus(current)]


def check_protocol_transition(
    current: ProtocolStatus | str, wanted: ProtocolStatus | str, entity_id: int
) -> ProtocolStatus:
    """Return `wanted` as an enum, or raise TransitionConflict("protocol_run", ...)."""
    cur, want = ProtocolStatus(current), ProtocolStatus(wanted)
    if want not in PROTOCOL_TRANSITIONS[cur]:
        raise TransitionConflict("protocol_run", entity_id, cur.value, want.value)
    return want


def check_step_transition(
    current: StepStatus | str, wanted: StepStatus | str, entity_id: int
) -> StepStatus:
    """Return `wanted` as an enum, or raise TransitionConflict("step_run", ...)."""
    cur, want = StepStatus(current), StepStatus(wanted)
    if want not in STEP_TRANSITIONS[cur]:
        raise TransitionConflict("step_run", entity_id, cur.value, want.value)
    return want


def is_terminal(status: ProtocolStatus | StepStatus | str) -> bool:
    """Completed, failed or cancelled (the same names for both kinds)."""
    if isinstance(status, ProtocolStatus):
        return status in PROTOCOL_TERMINAL
    if isinstance(status, StepStatus):
        return status in STEP_TERMINAL
    return status in {"completed", "failed", "cancelled"}
