"""Stored webhook deliveries: loading one, and the lease a worker holds while it processes it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, update

from bot.storage.db import Database
from bot.storage.models import WebhookDelivery, utcnow


async def load_delivery(db: Database, delivery_id: int) -> WebhookDelivery | None:
    async with db.sessions() as session:
        return await session.get(WebhookDelivery, delivery_id)


async def claim_delivery(db: Database, delivery_id: int, holder: str, lease_s: float) -> bool:
    """Lease a delivery to `holder` (a job id) for `lease_s` seconds; False if someone else holds
    it.

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
                status=status,
                outcome=outcome,
                error=error,
                processed_at=utcnow(),
                claimed_by=None,
                lease_until=None,
            )
        )
