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
                blocked | cancelled | pending        engine error; step budget; /cancel;
                                                     /pause stopped the attempt (runs again)
    needs_qa    running | completed | failed |       QA (or re-execution) starts; PASS or
                blocked | cancelled | pending        /approve; QA could not run; FAIL with no
                                                     loop left; /cancel; loop resets it
    completed   pending | needs_qa | blocked         a later step's loop resets it; /qa N again;
                                                     CI turned red after completion (reopened)
    failed      pending | completed                  /retry or a loop resets it; /approve N
    blocked     pending | completed                  /retry or a loop; /approve
    cancelled   (none)

Same-status moves are not in the tables: whether a repeated job treats them as a no-op is the
caller's (idempotency) decision, not the state machine's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, overload

from bot.core.errors import TransitionConflict


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
    # a red CI after completion reopens the protocol (never dropped): see bot/domain/ci_gate.py
    _P.COMPLETED: frozenset({_P.BLOCKED}),
    _P.CANCELLED: frozenset(),
}

STEP_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    _S.PENDING: frozenset({_S.RUNNING, _S.BLOCKED, _S.CANCELLED}),
    _S.RUNNING: frozenset(
        {_S.NEEDS_QA, _S.COMPLETED, _S.FAILED, _S.BLOCKED, _S.CANCELLED, _S.PENDING}
    ),
    _S.NEEDS_QA: frozenset(
        {_S.RUNNING, _S.COMPLETED, _S.FAILED, _S.BLOCKED, _S.CANCELLED, _S.PENDING}
    ),
    _S.COMPLETED: frozenset({_S.PENDING, _S.NEEDS_QA, _S.BLOCKED}),
    _S.FAILED: frozenset({_S.PENDING, _S.COMPLETED}),
    _S.BLOCKED: frozenset({_S.PENDING, _S.COMPLETED}),
    _S.CANCELLED: frozenset(),
}

# "Terminal" = no job will touch it again on its own. FAILED can still be revived by an
# explicit human /retry (or /plan), and a completed step by a loop reset; CANCELLED protocols
# are final, COMPLETED ones too except that a red CI on their commits reopens them.
PROTOCOL_TERMINAL = frozenset({_P.COMPLETED, _P.FAILED, _P.CANCELLED})
STEP_TERMINAL = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})


def _invert(
    table: Mapping[ProtocolStatus, frozenset[ProtocolStatus]]
    | Mapping[StepStatus, frozenset[StepStatus]],
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
    # a plain string: the terminal names are the same for both kinds
    return status in PROTOCOL_TERMINAL


# -- runner decisions (pure; the step runner in bot/jobs/ acts on them) ----------------------

StartAction = Literal["start", "continue", "skip", "refuse", "wait_approval", "stop"]


@dataclass(frozen=True)
class StartDecision:
    """May an execute job start this step, and does the protocol have to move to running first?"""

    action: StartAction
    reason: str
    protocol_to_running: bool = False
    reset_step: bool = False


def may_start_step(protocol_status: str, approved: bool, step_status: str) -> StartDecision:
    """The gate in front of every execute job, including a duplicate or a taken-back one.

    A `running` step is continued rather than refused: only a job holding the protocol's lease
    gets here, so a running step means a previous attempt died and this job takes it back.
    """
    if step_status in (_S.NEEDS_QA, _S.COMPLETED, _S.CANCELLED):
        return StartDecision("skip", f"step is {step_status}")
    if not approved:
        return StartDecision("wait_approval", "the plan is not approved yet")
    to_running = protocol_status in (_P.PLANNED, _P.BLOCKED, _P.FAILED)
    if step_status == _S.RUNNING and protocol_status in (_P.PAUSED, _P.CANCELLED):
        # a dead worker's step, stopped by a human meanwhile: finish the stop, run nothing
        return StartDecision("stop", f"protocol is {protocol_status}")
    if not to_running and protocol_status != _P.RUNNING:
        return StartDecision("refuse", f"protocol is {protocol_status}")
    if step_status == _S.RUNNING:
        return StartDecision("continue", "taking back an interrupted attempt", to_running)
    return StartDecision("start", "step starts", to_running, reset_step=step_status != _S.PENDING)


@dataclass(frozen=True)
class FailureStatuses:
    """Where a failed job leaves its step and protocol (None: leave as it is)."""

    step: StepStatus | None
    protocol: ProtocolStatus | None


def failure_statuses(protocol_status: str, step_status: str | None) -> FailureStatuses:
    """After an error a job could not recover from: visible, and recoverable by a command.

    A step that was being worked on fails (so /retry and /approve N apply); a running protocol
    blocks (so /retry, /run-step and /resume apply); a protocol still planning fails (so /retry
    and the API's start re-plan it). Paused and cancelled protocols keep their status: a human
    put them there.
    """
    step: StepStatus | None = _S.FAILED if step_status in (_S.RUNNING, _S.NEEDS_QA) else None
    if step_status == _S.PENDING and protocol_status == _P.RUNNING:
        step = _S.BLOCKED
    # planned, blocked, failed: already waiting for a command
    protocol: dict[str, ProtocolStatus] = {
        _P.RUNNING: _P.BLOCKED,
        _P.PLANNING: _P.FAILED,
        _P.PENDING: _P.FAILED,
    }
    return FailureStatuses(step, protocol.get(protocol_status))


def stopped_step_status(protocol_status: str) -> StepStatus | None:
    """What a running step becomes when a human stopped the protocol under it."""
    stopped: dict[str, StepStatus] = {_P.CANCELLED: _S.CANCELLED, _P.PAUSED: _S.PENDING}
    return stopped.get(protocol_status)


ResumeAction = Literal["run_step", "run_qa", "nothing"]


@dataclass(frozen=True)
class ResumeDecision:
    """What /resume does after moving the protocol back to running."""

    action: ResumeAction
    step_index: int | None
    reason: str


def resume_decision(steps: list[tuple[int, str]], auto_mode: bool) -> ResumeDecision:
    """/resume re-runs the step that stopped the protocol, not the next one.

    `steps` are (index, status) pairs in order. The stopping step is the first one failed,
    blocked or interrupted (pending after a pause, ahead of completed ones); a step waiting for
    QA gets its QA. Without such a step an auto protocol goes on with the next pending step.
    """
    for index, status in steps:
        if status in (_S.FAILED, _S.BLOCKED, _S.RUNNING):
            return ResumeDecision("run_step", index, f"re-running step {index:02d}")
        if status == _S.NEEDS_QA:
            return ResumeDecision("run_qa", index, f"running QA of step {index:02d}")
        if status == _S.PENDING:
            if auto_mode:
                return ResumeDecision("run_step", index, f"running step {index:02d}")
            return ResumeDecision("nothing", None, "waiting for /run-step")
    return ResumeDecision("nothing", None, "no step left to run")


def may_approve_step(step_status: str) -> bool:
    """/approve N accepts a failed, blocked or QA-waiting step as completed."""
    return step_status in (_S.FAILED, _S.BLOCKED, _S.NEEDS_QA)


def completes_protocol(protocol_status: str, other_steps: list[str], reopens_a_step: bool) -> bool:
    """A step just completed: is the protocol completed with it (and nothing else in between)?

    Yes when the protocol is running, every other step is completed and no `pass` trigger of
    the step sends one back. The step's outcome then leaves the status comment to the
    completion that follows at once, so the comment is edited once, not twice in a row.
    """
    return (
        protocol_status == _P.RUNNING
        and not reopens_a_step
        and all(s == _S.COMPLETED for s in other_steps)
    )


GateResult = Literal["completed", "wait_ci"]


def step_gate(qa_passed: bool, has_ci: bool, ci_green_on_head: bool | None) -> GateResult:
    """A step whose QA passed is completed unless the repository has CI that has not yet been
    green on the step's head commit. The CI side (knowing `has_ci`, recording verdicts) lives
    with the CI code; today's callers pass `has_ci=False`, and QA alone gates.
    """
    if not qa_passed:
        raise ValueError("step_gate is only asked about a step whose QA passed")
    if has_ci and ci_green_on_head is not True:
        return "wait_ci"
    return "completed"
