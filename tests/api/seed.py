"""Rows for API, console and report tests, written with a plain synchronous session."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from bot.domain.states import ProtocolStatus, StepStatus
from bot.storage.models import Event, Project, ProtocolRun, StepRun, WebhookDelivery


def sync_url(url: str) -> str:
    if url.startswith("postgresql://"):
        return url.replace("postgresql://", "postgresql+psycopg://", 1)
    return url


def seed(
    url: str, *, project: str = "acme/widgets", runs: int = 3, status: str = ProtocolStatus.RUNNING
) -> dict[str, Any]:
    """One project with `runs` protocol runs of two steps each, events and a delivery."""
    engine = create_engine(sync_url(url))
    t0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    ids: dict[str, Any] = {"runs": [], "steps": []}
    with Session(engine) as session, session.begin():
        p = Project(
            name=project,
            provider="local",
            git_url="/nonexistent/origin.git",
            base_branch="main",
            default_models={"exec": "gpt-5.5"},
            secrets={"token": "s3cret-value"},
            config={},
        )
        session.add(p)
        session.flush()
        ids["project"] = p.id
        for n in range(1, runs + 1):
            run = ProtocolRun(
                project_id=p.id,
                protocol_name=f"{n:04d}-task-{n}",
                status=status,
                base_branch="main",
                description=f"task {n}",
                template_config={},
                runtime_state={"ci_attempts": n},
                tokens_used=1000 * n,
                approved=True,
                created_at=t0 + timedelta(days=n),
                updated_at=t0 + timedelta(days=n, minutes=30),
            )
            session.add(run)
            session.flush()
            ids["runs"].append(run.id)
            for index in (1, 2):
                step = StepRun(
                    protocol_run_id=run.id,
                    step_index=index,
                    step_name=f"step-{index}",
                    status=StepStatus.COMPLETED if index == 1 else StepStatus.PENDING,
                    runtime_state={"qa_verdict": "PASS" if (n + index) % 2 == 0 else "FAIL"},
                    tokens_used=400 * n,
                    engine_id="scripted",
                    started_at=t0 + timedelta(days=n, minutes=index),
                    finished_at=t0 + timedelta(days=n, minutes=index + 5),
                )
                session.add(step)
                session.flush()
                ids["steps"].append(step.id)
                session.add(
                    Event(
                        project_id=p.id,
                        protocol_run_id=run.id,
                        step_run_id=step.id,
                        event_type="step.status",
                        message=f"step {index} moved",
                        metadata_={},
                    )
                )
            session.add(
                Event(
                    project_id=p.id,
                    protocol_run_id=run.id,
                    event_type="protocol.created",
                    message="created",
                    metadata_={},
                )
            )
        d = WebhookDelivery(
            provider="github",
            delivery_key=f"d-{project}",
            event="issue_comment",
            action="created",
            status="processed",
            attempts=1,
            payload="{}",
            headers={},
            outcome={"intents": ["plan"]},
        )
        session.add(d)
        session.flush()
        ids["delivery"] = d.id
    engine.dispose()
    return ids
