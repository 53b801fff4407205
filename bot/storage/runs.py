"""Protocol-run storage: projects, runs and steps, events, and the one guarded transition.

`transition` is the compare-and-set every status change goes through (the allowed sources come
from bot/domain/states.py); `set_protocol_status` and `set_step_status` are its two uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.errors import ConfigError, NotFound, TransitionConflict
from bot.domain.spec import ProtocolSpec, step_to_dict
from bot.domain.states import (
    ProtocolStatus,
    StepStatus,
    allowed_protocol_sources,
    allowed_step_sources,
)
from bot.storage.db import Database
from bot.storage.models import Event, Project, ProtocolRun, StepRun, utcnow

M = TypeVar("M", ProtocolRun, StepRun)


@dataclass(frozen=True)
class KnownRow:
    """What a caller holding a loaded row already knows: its status and the ids an event needs."""

    status: str
    run_id: int
    project_id: int


def new_event(
    event_type: str,
    message: str = "",
    *,
    project_id: int | None = None,
    protocol_run_id: int | None = None,
    step_run_id: int | None = None,
    delivery_id: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> Event:
    return Event(
        event_type=event_type,
        message=message,
        project_id=project_id,
        protocol_run_id=protocol_run_id,
        step_run_id=step_run_id,
        delivery_id=delivery_id,
        metadata_=metadata or {},
        created_at=utcnow(),
    )


async def record_event(db: Database, event_type: str, message: str = "", **kwargs: Any) -> int:
    async with db.sessions.begin() as session:
        event = new_event(event_type, message, **kwargs)
        session.add(event)
        await session.flush()
        return event.id


async def transition(
    session: AsyncSession,
    model: type[M],
    entity_id: int,
    wanted: str,
    allowed_from: Iterable[str],
    *,
    values: dict[str, Any] | None = None,
    event_message: str = "",
    event_metadata: dict[str, Any] | None = None,
    known: KnownRow | None = None,
) -> str:
    """Compare-and-set `status` to `wanted` when it is one of `allowed_from`; write an Event.

    Returns the previous status. Raises TransitionConflict with the current status when the
    row moved on (another worker, an operator) and NotFound when it does not exist. A caller
    that holds the row already passes `known` (its status and ids): the CAS is the same, the
    look-up of those is skipped.
    """
    allowed = sorted(set(allowed_from))
    if known is None:
        known = await _known_row(session, model, entity_id)
    if known is None:
        raise NotFound(f"{model.__tablename__} {entity_id} does not exist")
    current = known.status
    result = await session.execute(
        update(model)
        .where(model.id == entity_id, model.status.in_(allowed), model.status == current)
        .values(status=wanted, updated_at=utcnow(), **(values or {}))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        now = (await session.execute(select(model.status).where(model.id == entity_id))).scalar()
        if model is StepRun:  # people know steps by their number, not by a row id
            index = (
                await session.execute(select(StepRun.step_index).where(StepRun.id == entity_id))
            ).scalar()
            raise TransitionConflict("step", int(index or 0), str(now), wanted)
        raise TransitionConflict(model.__name__, entity_id, str(now), wanted)
    kind = "step" if model is StepRun else "protocol"
    ids = _event_ids(model, entity_id, known)
    session.add(
        new_event(
            f"{kind}.{wanted}",
            event_message or f"{kind} {current} → {wanted}",
            metadata={"from": current, "to": wanted, **(event_metadata or {})},
            **ids,
        )
    )
    return str(current)


async def _known_row(session: AsyncSession, model: type[M], entity_id: int) -> KnownRow | None:
    """The row's status with the ids its transition's event needs, in one round trip (None when
    there is no such row). Three look-ups before: the status, then the run, then the project."""
    if model is StepRun:
        query = (
            select(StepRun.status, StepRun.protocol_run_id, ProtocolRun.project_id)
            .join(ProtocolRun, ProtocolRun.id == StepRun.protocol_run_id)
            .where(StepRun.id == entity_id)
        )
    else:
        query = select(ProtocolRun.status, ProtocolRun.id, ProtocolRun.project_id).where(
            ProtocolRun.id == entity_id
        )
    row = (await session.execute(query)).one_or_none()
    if row is None:
        return None
    return KnownRow(status=row[0], run_id=row[1], project_id=row[2])


def _event_ids(model: type[M], entity_id: int, known: KnownRow) -> dict[str, Any]:
    """project, run (and step) ids for a transition's event."""
    if model is StepRun:
        return {
            "protocol_run_id": known.run_id,
            "step_run_id": entity_id,
            "project_id": known.project_id,
        }
    return {"protocol_run_id": entity_id, "project_id": known.project_id}


@dataclass
class RunState:
    """A protocol run with its project and steps, loaded together (detached plain rows)."""

    run: ProtocolRun
    project: Project
    steps: list[StepRun]

    def step(self, index: int) -> StepRun:
        for step in self.steps:
            if step.step_index == index:
                return step
        raise NotFound(f"protocol {self.run.protocol_name} has no step {index}")

    @property
    def number(self) -> int:
        return int(self.run.protocol_name.split("-", 1)[0])


async def load_run(db: Database, run_id: int) -> RunState:
    """The run, its project and its steps in one round trip (a job loads it several times)."""
    query = (
        select(ProtocolRun, Project, StepRun)
        .join(Project, Project.id == ProtocolRun.project_id)
        .outerjoin(StepRun, StepRun.protocol_run_id == ProtocolRun.id)
        .where(ProtocolRun.id == run_id)
        .order_by(StepRun.step_index)
    )
    async with db.single() as session:  # one statement: no transaction round trips
        rows = (await session.execute(query)).all()
    if not rows:
        raise NotFound(f"protocol run {run_id} does not exist")
    run, project = rows[0][0], rows[0][1]
    # a run without steps yet (pending, planning) comes back as one row with no step
    return RunState(run, project, [row[2] for row in rows if row[2] is not None])


async def run_names(db: Database, project_id: int) -> list[str]:
    async with db.sessions() as session:
        rows = await session.execute(
            select(ProtocolRun.protocol_name).where(ProtocolRun.project_id == project_id)
        )
        return [r[0] for r in rows.all()]


async def get_or_create_project(
    db: Database, *, name: str, provider: str, git_url: str, base_branch: str, **values: Any
) -> Project:
    async with db.sessions() as session:
        found = (await session.execute(select(Project).where(Project.name == name))).scalar()
        if found is not None:
            return found
    try:
        async with db.sessions.begin() as session:
            project = Project(
                name=name, provider=provider, git_url=git_url, base_branch=base_branch, **values
            )
            session.add(project)
            await session.flush()
            session.add(
                new_event("project.created", f"project {name} registered", project_id=project.id)
            )
            return project
    except IntegrityError:  # created concurrently: take the winner's row
        async with db.sessions() as session:
            found = (await session.execute(select(Project).where(Project.name == name))).scalar()
            assert found is not None
            return found


async def register_project(db: Database, *, name: str, provider: str, **values: Any) -> Project:
    """Create project `name` on `provider`, or re-enable it and refresh `values` when it is
    already registered there (what the forge says may have changed: default branch, CI file).

    ConfigError when `name` belongs to a project of another provider: the update is guarded by
    the provider, so that project is left as it was.
    """
    project = await get_or_create_project(db, name=name, provider=provider, **values)
    async with db.sessions.begin() as session:
        result = await session.execute(
            update(Project)
            .filter_by(id=project.id, provider=provider)
            .values(enabled=True, **values)
        )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise ConfigError(f"a {project.provider} project named {name} is already registered")
    return project


def local_project_name(repo: Path) -> str:
    return f"local:{repo.resolve()}"


async def create_run(
    db: Database,
    *,
    project: Project,
    protocol_name: str,
    description: str,
    base_branch: str,
    issue_number: int | None = None,
    auto_mode: bool = False,
    approved: bool = False,
    template_source: str = "planning",
) -> ProtocolRun:
    """Insert a pending run; raises IntegrityError if the name is taken (caller picks another)."""
    async with db.sessions.begin() as session:
        run = ProtocolRun(
            project_id=project.id,
            protocol_name=protocol_name,
            status=ProtocolStatus.PENDING,
            base_branch=base_branch,
            description=description,
            issue_number=issue_number,
            auto_mode=auto_mode,
            approved=approved,
            template_source=template_source,
            template_config={},
            runtime_state={},
            protocol_root=f".protocols/{protocol_name}",
        )
        session.add(run)
        await session.flush()
        session.add(
            new_event(
                "protocol.created",
                f"protocol {protocol_name} created",
                project_id=project.id,
                protocol_run_id=run.id,
                metadata={"issue": issue_number, "auto": auto_mode},
            )
        )
        return run


async def set_protocol_status(
    db: Database, run_id: int, wanted: str, message: str = "", **values: Any
) -> str:
    async with db.sessions.begin() as session:
        return await transition(
            session,
            ProtocolRun,
            run_id,
            wanted,
            allowed_protocol_sources(wanted),
            values=values,
            event_message=message,
        )


async def set_step_status(
    db: Database, step_id: int, wanted: str, message: str = "", **values: Any
) -> str:
    async with db.sessions.begin() as session:
        return await transition(
            session,
            StepRun,
            step_id,
            wanted,
            allowed_step_sources(wanted),
            values=values,
            event_message=message,
        )


def run_branch(run: ProtocolRun) -> str:
    """The branch a protocol commits to: its own (named after it), or the PR's it was planned on."""
    branch = (run.runtime_state or {}).get("branch")
    return branch if isinstance(branch, str) and branch else run.protocol_name


async def update_run(db: Database, run_id: int, **values: Any) -> None:
    async with db.sessions.begin() as session:
        await session.execute(
            update(ProtocolRun)
            .where(ProtocolRun.id == run_id)
            .values(updated_at=utcnow(), **values)
        )


async def update_step(db: Database, step_id: int, **values: Any) -> None:
    async with db.sessions.begin() as session:
        await session.execute(
            update(StepRun).where(StepRun.id == step_id).values(updated_at=utcnow(), **values)
        )


def _usage_updates(run_id: int, step_id: int | None, tokens: int, cost_usd: float) -> list[Any]:
    """The UPDATEs that add a turn's tokens and cost to the run and its step (none: nothing)."""
    if tokens <= 0 and cost_usd <= 0:
        return []
    runs, steps = cast(Table, ProtocolRun.__table__), cast(Table, StepRun.__table__)
    run, step = runs.c, steps.c
    now = utcnow()
    updates = [
        update(runs)
        .where(run.id == run_id)
        .values(tokens_used=run.tokens_used + tokens, cost_usd=run.cost_usd + cost_usd)
        .values(updated_at=now)
    ]
    if step_id is not None:
        updates.append(
            update(steps)
            .where(step.id == step_id)
            .values(tokens_used=step.tokens_used + tokens, cost_usd=step.cost_usd + cost_usd)
            .values(updated_at=now)
        )
    return updates


async def record_usage(
    db: Database,
    run_id: int,
    step_id: int | None,
    tokens: int,
    cost_usd: float,
    event: Event,
) -> None:
    """Add an engine turn's tokens and cost to the run (and step) and store its event: all or
    nothing.

    On Postgres one statement, its own transaction in autocommit: the UPDATEs are data-modifying
    CTEs of the event's INSERT (Postgres runs them whether or not the INSERT reads them), where
    a transaction of three statements cost five round trips with its BEGIN and COMMIT. Every
    step runs this once.
    """
    updates = _usage_updates(run_id, step_id, tokens, cost_usd)
    if db.is_sqlite:
        async with db.sessions.begin() as session:
            for statement in updates:
                await session.execute(statement)
            session.add(event)
        return
    events = cast(Table, Event.__table__)
    c = events.c
    insert_event = insert(events).values(
        {
            c.event_type: event.event_type,
            c.message: event.message,
            c.project_id: event.project_id,
            c.protocol_run_id: event.protocol_run_id,
            c.step_run_id: event.step_run_id,
            c.delivery_id: event.delivery_id,
            c.metadata: event.metadata_,
            c.created_at: event.created_at,
        }
    )
    for n, statement in enumerate(updates):
        insert_event = insert_event.add_cte(statement.cte(f"usage_{n}"))
    async with db.one_statement() as conn:
        await conn.execute(insert_event)


async def add_tokens(
    db: Database, run_id: int, step_id: int | None, tokens: int, cost_usd: float = 0.0
) -> None:
    if tokens <= 0 and cost_usd <= 0:
        return
    async with db.sessions.begin() as session:
        await session.execute(
            update(ProtocolRun)
            .where(ProtocolRun.id == run_id)
            .values(
                tokens_used=ProtocolRun.tokens_used + tokens,
                cost_usd=ProtocolRun.cost_usd + cost_usd,
            )
        )
        if step_id is not None:
            await session.execute(
                update(StepRun)
                .where(StepRun.id == step_id)
                .values(
                    tokens_used=StepRun.tokens_used + tokens, cost_usd=StepRun.cost_usd + cost_usd
                )
            )


async def emit(
    db: Database,
    state: RunState,
    event_type: str,
    message: str,
    step: StepRun | None = None,
    **metadata: Any,
) -> None:
    async with db.sessions.begin() as session:
        session.add(
            new_event(
                event_type,
                message,
                project_id=state.project.id,
                protocol_run_id=state.run.id,
                step_run_id=step.id if step else None,
                metadata=metadata,
            )
        )


async def sync_steps(db: Database, run_id: int, spec: ProtocolSpec) -> None:
    """Create a StepRun per StepSpec (idempotent: existing rows keep their status)."""
    async with db.sessions.begin() as session:
        existing = {
            s.step_index: s
            for s in (
                await session.execute(select(StepRun).where(StepRun.protocol_run_id == run_id))
            ).scalars()
        }
        for step in spec.steps:
            row = existing.get(step.index)
            policy = step_to_dict(step)
            if row is None:
                session.add(
                    StepRun(
                        protocol_run_id=run_id,
                        step_index=step.index,
                        step_name=step.file.removesuffix(".md"),
                        step_type=step.step_type,
                        status=StepStatus.PENDING,
                        engine_id=step.engine or spec.engine,
                        model=step.model,
                        policy=policy,
                        runtime_state={},
                        summary=step.title,
                    )
                )
            else:
                row.policy = policy
                row.step_name = step.file.removesuffix(".md")


# built once: a plain read polled every few seconds (bound parameter, no ORM session)
_STATUS = select(ProtocolRun.status).where(ProtocolRun.id == bindparam("run_id"))


async def protocol_status(db: Database, run_id: int) -> str:
    """Just the run's status: one cheap query, polled while an engine runs."""
    async with db.one_read() as conn:
        status = await conn.scalar(_STATUS, {"run_id": run_id})
    if status is None:
        raise NotFound(f"protocol run {run_id} does not exist")
    return str(status)
