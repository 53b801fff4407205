"""Storage operations shared by the intake, jobs and API: events, deliveries, guarded transitions."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.errors import NotFound, TransitionConflict
from bot.storage.db import Database
from bot.storage.models import Event, ProtocolRun, StepRun, WebhookDelivery, utcnow

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
    three look-ups are skipped.
    """
    allowed = sorted(set(allowed_from))
    if known is not None:
        current: Any = known.status
    else:
        current = (await session.execute(select(model.status).where(model.id == entity_id))).scalar()
    if current is None:
        raise NotFound(f"{model.__tablename__} {entity_id} does not exist")
    result = await session.execute(
        update(model)
        .where(model.id == entity_id, model.status.in_(allowed), model.status == current)
        .values(status=wanted, updated_at=utcnow(), **(values or {}))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        now = (await session.execute(select(model.status).where(model.id == entity_id))).scalar()
        if model is StepRun:  # people know steps by their number, not by a row id
            index = (await session.execute(select(StepRun.step_index).where(StepRun.id == entity_id))).scalar()
            raise TransitionConflict("step", int(index or 0), str(now), wanted)
        raise TransitionConflict(model.__name__, entity_id, str(now), wanted)
    kind = "step" if model is StepRun else "protocol"
    ids = await _event_ids(session, model, entity_id, known)
    session.add(
        new_event(
            f"{kind}.{wanted}",
            event_message or f"{kind} {current} → {wanted}",
            metadata={"from": current, "to": wanted, **(event_metadata or {})},
            **ids,
        )
    )
    return str(current)


async def _event_ids(session: AsyncSession, model: type[M], entity_id: int, known: KnownRow | None) -> dict[str, Any]:
    """project, run (and step) ids for a transition's event: known by the caller, or looked up."""
    if model is StepRun:
        run_id = known.run_id if known else (
            await session.execute(select(StepRun.protocol_run_id).where(StepRun.id == entity_id))
        ).scalar()
        ids: dict[str, Any] = {"protocol_run_id": run_id, "step_run_id": entity_id}
    else:
        run_id = entity_id
        ids = {"protocol_run_id": entity_id}
    ids["project_id"] = known.project_id if known else (
        await session.execute(select(ProtocolRun.project_id).where(ProtocolRun.id == run_id))
    ).scalar()
    return ids


async def load_delivery(db: Database, delivery_id: int) -> WebhookDelivery | None:
    async with db.sessions() as session:
        return await session.get(WebhookDelivery, delivery_id)


async def claim_delivery(db: Database, delivery_id: int, holder: str, lease_s: float) -> bool:
    """Lease a delivery to `holder` (a job id) for `lease_s` seconds; False if someone else holds it.

    A pending delivery can be claimed; a processing one only when its lease ran out (its worker
    died) or when the holder is the same job coming back (arq's retry of it). Finished ones never.
    """
    now = utcnow()
    async with db.sessions.begin() as session:
        result = await session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                or_(
                    WebhookDelivery.status == "pending",
                    and_(
                        WebhookDelivery.status == "processing",
                        or_(
                            WebhookDelivery.lease_until.is_(None),
                            WebhookDelivery.lease_until < now,
                            WebhookDelivery.claimed_by == holder,
                        ),
                    ),
                ),
            )
            .values(
                status="processing",
                attempts=WebhookDelivery.attempts + 1,
                claimed_by=holder,
                lease_until=now + timedelta(seconds=lease_s),
            )
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


async def renew_lease(db: Database, delivery_id: int, holder: str, lease_s: float) -> bool:
    """Extend `holder`'s lease; False when it is no longer the holder."""
    async with db.sessions.begin() as session:
        result = await session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == "processing",
                WebhookDelivery.claimed_by == holder,
            )
            .values(lease_until=utcnow() + timedelta(seconds=lease_s))
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


async def finish_delivery(
    db: Database, delivery_id: int, status: str, outcome: dict[str, Any], error: str | None = None
) -> None:
    async with db.sessions.begin() as session:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(
                status=status, outcome=outcome, error=error, processed_at=utcnow(), claimed_by=None, lease_until=None
            )
        )
