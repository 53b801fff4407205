"""Protocol-run storage: projects, runs and steps, guarded transitions, events."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from bot.core.errors import NotFound
from bot.domain.spec import ProtocolSpec, step_to_dict
from bot.domain.states import (
    ProtocolStatus,
    StepStatus,
    allowed_protocol_sources,
    allowed_step_sources,
)
from bot.storage.db import Database
from bot.storage.models import Project, ProtocolRun, StepRun, utcnow
from bot.storage.store import new_event, transition


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
    async with db.sessions() as session:
        run = await session.get(ProtocolRun, run_id)
        if run is None:
            raise NotFound(f"protocol run {run_id} does not exist")
        project = await session.get(Project, run.project_id)
        assert project is not None
        steps = list(
            (
                await session.execute(
                    select(StepRun).where(StepRun.protocol_run_id == run_id).order_by(StepRun.step_index)
                )
            ).scalars()
        )
        return RunState(run, project, steps)


async def run_names(db: Database, project_id: int) -> list[str]:
    async with db.sessions() as session:
        rows = await session.execute(select(ProtocolRun.protocol_name).where(ProtocolRun.project_id == project_id))
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
            project = Project(name=name, provider=provider, git_url=git_url, base_branch=base_branch, **values)
            session.add(project)
            await session.flush()
            session.add(new_event("project.created", f"project {name} registered", project_id=project.id))
            return project
    except IntegrityError:  # created concurrently: take the winner's row
        async with db.sessions() as session:
            found = (await session.execute(select(Project).where(Project.name == name))).scalar()
            assert found is not None
            return found


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
            session, ProtocolRun, run_id, wanted, allowed_protocol_sources(wanted), values=values, event_message=message
        )


async def set_step_status(db: Database, step_id: int, wanted: str, message: str = "", **values: Any) -> str:
    async with db.sessions.begin() as session:
        return await transition(
            session, StepRun, step_id, wanted, allowed_step_sources(wanted), values=values, event_message=message
        )


def run_branch(run: ProtocolRun) -> str:
    """The branch a protocol commits to: its own (named after it), or the PR's it was planned on."""
    branch = (run.runtime_state or {}).get("branch")
    return branch if isinstance(branch, str) and branch else run.protocol_name


async def update_run(db: Database, run_id: int, **values: Any) -> None:
    async with db.sessions.begin() as session:
        await session.execute(update(ProtocolRun).where(ProtocolRun.id == run_id).values(updated_at=utcnow(), **values))


async def update_step(db: Database, step_id: int, **values: Any) -> None:
    async with db.sessions.begin() as session:
        await session.execute(update(StepRun).where(StepRun.id == step_id).values(updated_at=utcnow(), **values))


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
                .values(tokens_used=StepRun.tokens_used + tokens, cost_usd=StepRun.cost_usd + cost_usd)
            )


async def emit(
    db: Database, state: RunState, event_type: str, message: str, step: StepRun | None = None, **metadata: Any
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
            for s in (await session.execute(select(StepRun).where(StepRun.protocol_run_id == run_id))).scalars()
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


async def protocol_status(db: Database, run_id: int) -> str:
    """Just the run's status: one cheap query, polled while an engine runs."""
    async with db.sessions() as session:
        status = (await session.execute(select(ProtocolRun.status).where(ProtocolRun.id == run_id))).scalar()
    if status is None:
        raise NotFound(f"protocol run {run_id} does not exist")
    return str(status)
