"""process_delivery: load a stored delivery, run its handlers, record the outcome."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from arq import Retry

from bot.core.errors import ConfigError, NotFound
from bot.core.observability import log_context
from bot.handlers.router import HandlerContext, Router
from bot.handlers.sansio import IncomingDelivery
from bot.jobs.common import count_job, retry_or_give_up
from bot.storage.deliveries import claim_delivery, finish_delivery, load_delivery, renew_lease
from bot.storage.intake import prune_deliveries, relay_outbox
from bot.storage.runs import record_event

log = logging.getLogger(__name__)


def to_incoming(row: Any) -> IncomingDelivery:
    return IncomingDelivery(
        provider=row.provider,
        key=row.delivery_key,
        event=row.event,
        action=row.action,
        body=row.payload,
        headers=dict(row.headers or {}),
    )


async def _keep_lease(db: Any, delivery_id: int, holder: str, lease_s: float) -> None:
    """Renew the claim every third of its length while the handlers work."""
    while True:
        await asyncio.sleep(lease_s / 3)
        try:
            if not await renew_lease(db, delivery_id, holder, lease_s):
                log.warning("lost the lease on delivery %s", delivery_id)
                return
        except Exception as exc:  # the database is having a moment: try again next round
            log.warning("could not renew the lease on delivery %s: %s", delivery_id, exc)


async def _hold_for_retry(
    db: Any, delivery_id: int, holder: str, lease_s: float, retry: Retry
) -> None:
    """arq brings this same job back after the delay: the lease must outlast the wait."""
    defer_s = (getattr(retry, "defer_score", None) or 0) / 1000
    await renew_lease(db, delivery_id, holder, lease_s + defer_s)


async def process_delivery(
    ctx: dict[str, Any], *, delivery_id: int, delivery_key: str | None = None
) -> str:
    """Idempotent: a delivery already processed (or ignored), or leased to a live job, is skipped.

    `delivery_key` guards against a job from another database (an old Redis, a re-created
    database): the row with that id must be the delivery the job was made for.
    """
    db = ctx["db"]
    router: Router = ctx["router"]
    lease_s: float = ctx["settings"].delivery_lease_s if "settings" in ctx else 30.0
    holder = str(ctx.get("job_id") or f"direct:{uuid.uuid4()}")
    with log_context(delivery_id=delivery_id, job_id=ctx.get("job_id"), job="process_delivery"):
        row = await load_delivery(db, delivery_id)
        if row is None or (delivery_key is not None and row.delivery_key != delivery_key):
            log.warning("delivery %s is not in the database", delivery_id)
            await count_job(ctx, "process_delivery", "missing")
            return "missing"
        if not await claim_delivery(db, delivery_id, holder, lease_s):
            await count_job(ctx, "process_delivery", "skipped")
            return "already-" + row.status
        delivery = to_incoming(row)
        handlers = router.handlers_for(delivery.provider, delivery.event, delivery.action)
        hctx = HandlerContext(delivery_id=delivery_id, delivery=delivery, services=ctx)
        keeper = asyncio.create_task(_keep_lease(db, delivery_id, holder, lease_s))
        try:
            for handler in handlers:
                await handler(hctx)
        except Retry as retry:
            await _hold_for_retry(db, delivery_id, holder, lease_s, retry)
            raise
        except Exception as exc:
            log.exception("handler failed for delivery %s", delivery_id)
            if not isinstance(exc, ConfigError | NotFound):  # retrying cannot fix these
                try:
                    retry_or_give_up(ctx, exc)
                except Retry as retry:
                    await _hold_for_retry(db, delivery_id, holder, lease_s, retry)
                    raise
            await finish_delivery(
                db, delivery_id, "failed", {"handled": hctx.outcomes}, error=repr(exc)[:2000]
            )
            await record_event(
                db,
                "delivery.failed",
                f"handling failed: {type(exc).__name__}",
                delivery_id=delivery_id,
            )
            await count_job(ctx, "process_delivery", "failed")
            return "failed"
        finally:
            keeper.cancel()
        status = "processed" if handlers else "ignored"
        await finish_delivery(db, delivery_id, status, {"handled": hctx.outcomes})
        await count_job(ctx, "process_delivery", status)
        return status


async def prune_old_deliveries(ctx: dict[str, Any]) -> int:
    """Cron: drop finished deliveries older than DEKSDENFLOW_DELIVERY_RETENTION_DAYS (0 keeps
    all)."""
    days = ctx["settings"].delivery_retention_days
    if not days:
        return 0
    pruned = await prune_deliveries(ctx["db"], datetime.now(UTC) - timedelta(days=days))
    if pruned:
        log.info("pruned %d deliveries older than %g days", pruned, days)
    return pruned


async def relay_pending(ctx: dict[str, Any]) -> int:
    """Cron: enqueue deliveries that were stored while the queue was unreachable."""
    relayed = await relay_outbox(
        ctx["db"], ctx["redis"], older_than_s=ctx["settings"].relay_interval_s
    )
    if relayed:
        log.info("relayed %d pending deliveries", relayed)
    return relayed
