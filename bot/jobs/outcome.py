"""The outcome writer: one place that applies what a job concluded about a step.

It works from the state the job already loaded: the status transitions and the event go to the
database in one transaction, the loaded rows are updated in place, and the check run, the
status comment and the reaction are rendered from them without reloading the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.core.errors import TransitionConflict
from bot.domain.states import can_transition_protocol, can_transition_step, failure_statuses
from bot.forge.base import CheckConclusion, CheckState
from bot.jobs.env import JobEnv
from bot.jobs.feedback import publish_state, react_state, report_state_check
from bot.storage.models import ProtocolRun, StepRun, utcnow
from bot.storage.runs import KnownRow, RunState, load_run, new_event, transition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """The check run / commit status that goes with an outcome."""

    kind: Literal["step", "qa"]
    head_sha: str
    conclusion: CheckConclusion | None = None
    status: CheckState = "completed"
    verdict: str | None = None
    changed_files: tuple[str, ...] = ()
    quality_report: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What happened to a step, in the terms the writer applies.

    `message` is one line a human reads on the status comment and the check run. A status of
    None leaves that row alone; a transition the row no longer allows (a /cancel won the race)
    is skipped, not raised.
    """

    message: str
    step_to: str | None = None
    protocol_to: str | None = None
    event: str | None = None
    check: Check | None = None
    step_state: dict[str, Any] = field(default_factory=dict)
    run_state: dict[str, Any] | None = None
    step_values: dict[str, Any] = field(default_factory=dict)
    run_values: dict[str, Any] = field(default_factory=dict)
    event_message: str | None = None
    event_metadata: dict[str, Any] = field(default_factory=dict)
    show_message: bool = True
    ok: bool | None = None  # for the reaction on the comment that asked; None: no reaction
    # False when the protocol's completion, written right after, re-renders the status comment
    publish: bool = True


async def write_outcome(
    env: JobEnv,
    state: RunState,
    step_index: int | None,
    outcome: Outcome,
    reply_to: dict[str, Any] | None = None,
) -> None:
    """Apply `outcome` to the database, then tell people; never reloads the run."""
    step = state.step(step_index) if step_index is not None else None
    try:
        await _store(env, state, step, outcome)
    except TransitionConflict:
        # a row moved under us (a /cancel, /pause): apply what still applies to the fresh rows
        fresh = await load_run(env.db, state.run.id)
        state.run, state.steps = fresh.run, fresh.steps
        step = state.step(step_index) if step_index is not None else None
        await _store(env, state, step, outcome)
    if outcome.check is not None and step is not None:
        c = outcome.check
        await report_state_check(
            env.ctx,
            state,
            step.step_index,
            c.kind,
            c.head_sha,
            status=c.status,
            conclusion=c.conclusion,
            verdict=c.verdict,
            changed_files=c.changed_files,
            tokens=step.tokens_used or None,
            quality_report=c.quality_report,
            message=outcome.message if c.conclusion not in (None, "success") else "",
        )
    if outcome.publish:
        await publish_state(env.ctx, state, outcome.message if outcome.show_message else None)
    if outcome.ok is not None:
        await react_state(env.ctx, state, reply_to, outcome.ok)


async def _store(env: JobEnv, state: RunState, step: StepRun | None, outcome: Outcome) -> None:
    run = state.run
    async with env.db.sessions.begin() as session:
        # the outcome's own event (a verdict, an error) reads before the transitions it causes
        if outcome.event:
            session.add(
                new_event(
                    outcome.event,
                    outcome.event_message or outcome.message,
                    project_id=state.project.id,
                    protocol_run_id=run.id,
                    step_run_id=step.id if step else None,
                    metadata=outcome.event_metadata,
                )
            )
        if step is not None:
            step_values = dict(outcome.step_values)
            if outcome.step_state:
                step.runtime_state = {**(step.runtime_state or {}), **outcome.step_state}
                step_values["runtime_state"] = step.runtime_state
            if outcome.step_to and can_transition_step(step.status, outcome.step_to):
                await transition(
                    session,
                    StepRun,
                    step.id,
                    outcome.step_to,
                    [step.status],
                    values=step_values,
                    event_message=outcome.message,
                    known=known(state, step.status),
                )
                step.status = outcome.step_to
            elif step_values:
                await _update(session, StepRun, step.id, step_values)
            for key, value in step_values.items():
                setattr(step, key, value)
        run_values: dict[str, Any] = dict(outcome.run_values)
        for key, value in run_values.items():
            setattr(run, key, value)
        if outcome.run_state is not None:
            run.runtime_state = {**outcome.run_state, "message": outcome.message}
            run_values["runtime_state"] = run.runtime_state
        if outcome.protocol_to and can_transition_protocol(run.status, outcome.protocol_to):
            await transition(
                session,
                ProtocolRun,
                run.id,
                outcome.protocol_to,
                [run.status],
                values=run_values,
                event_message=outcome.message,
                known=known(state, run.status),
            )
            run.status = outcome.protocol_to
        elif run_values:
            await _update(session, ProtocolRun, run.id, run_values)


async def _update(session: Any, model: Any, row_id: int, values: dict[str, Any]) -> None:
    from sqlalchemy import update

    await session.execute(
        update(model).where(model.id == row_id).values(updated_at=utcnow(), **values)
    )


def known(state: RunState, status: str) -> KnownRow:
    """The row facts a transition's event needs, from the state the job holds."""
    return KnownRow(status=status, run_id=state.run.id, project_id=state.project.id)


def failure(
    state: RunState, step_index: int | None, message: str, head_sha: str | None = None
) -> Outcome:
    """The outcome of an error a job could not recover from (see
    bot.domain.states.failure_statuses)."""
    step = state.step(step_index) if step_index is not None else None
    wanted = failure_statuses(state.run.status, step.status if step else None)
    check = Check("step", head_sha, conclusion="failure") if head_sha and step else None
    return Outcome(
        message=message,
        step_to=wanted.step,
        protocol_to=wanted.protocol,
        event="step.error" if step else "protocol.error",
        check=check,
        step_state={"error": message} if step else {},
        step_values={"finished_at": utcnow()} if wanted.step else {},
        run_state=dict(state.run.runtime_state or {}),
        ok=False,
    )


async def write_failure(
    env: JobEnv,
    state: RunState,
    step_index: int | None,
    message: str,
    head_sha: str | None = None,
    reply_to: dict[str, Any] | None = None,
) -> None:
    """Fail the step and block the protocol (or fail its planning) with a one-line reason."""
    await write_outcome(
        env, state, step_index, failure(state, step_index, message, head_sha), reply_to
    )
