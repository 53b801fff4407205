"""process_delivery: load a stored delivery, run its handlers, record the outcome."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from arq import Retry

from bot.errors import ConfigError, NotFound
from bot.handlers.router import HandlerContext, Router
from bot.handlers.sansio import IncomingDelivery
from bot.intake import prune_deliveries, relay_outbox
from bot.jobs.common import count_job, retry_or_give_up
from bot.observability import log_context
from bot.store import claim_delivery, finish_delivery, load_delivery, record_event

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


async def process_delivery(ctx: dict[str, Any], *, delivery_id: int) -> str:
    """Idempotent: a delivery already processed (or ignored) is skipped on a re-run."""
    db = ctx["db"]
    router: Router = ctx["router"]
    with log_context(delivery_id=delivery_id, job_id=ctx.get("job_id"), job="process_delivery"):
        row = await load_delivery(db, delivery_id)
        if row is None:
            log.warning("delivery %s is not in the database", delivery_id)
            await count_job(ctx, "process_delivery", "missing")
            return "missing"
        if not await claim_delivery(db, delivery_id):
            await count_job(ctx, "process_delivery", "skipped")
            return "already-" + row.status
        delivery = to_incoming(row)
        handlers = router.handlers_for(delivery.provider, delivery.event, delivery.action)
        hctx = HandlerContext(delivery_id=delivery_id, delivery=delivery, services=ctx)
        try:
            for handler in handlers:
                await handler(hctx)
        except Retry:
            raise
        except Exception as exc:
            log.exception("handler failed for delivery %s", delivery_id)
            if not isinstance(exc, ConfigError | NotFound):  # retrying cannot fix these
                retry_or_give_up(ctx, exc)
            await finish_delivery(db, delivery_id, "failed", {"handled": hctx.outcomes}, error=repr(exc)[:2000])
            await record_event(
                db, "delivery.failed", f"handling failed: {type(exc).__name__}", delivery_id=delivery_id
            )
            await count_job(ctx, "process_delivery", "failed")
            return "failed"
        status = "processed" if handlers else "ignored"
        await finish_delivery(db, delivery_id, status, {"handled": hctx.outcomes})
        await count_job(ctx, "process_delivery", status)
        return status


async def prune_old_deliveries(ctx: dict[str, Any]) -> int:
    """Cron: drop finished deliveries older than DEKSDENFLOW_DELIVERY_RETENTION_DAYS (0 keeps all)."""
    days = ctx["settings"].delivery_retention_days
    if not days:
        return 0
    pruned = await prune_deliveries(ctx["db"], datetime.now(UTC) - timedelta(days=days))
    if pruned:
        log.info("pruned %d deliveries older than %g days", pruned, days)
    return pruned


async def relay_pending(ctx: dict[str, Any]) -> int:
    """Cron: enqueue deliveries that were stored while the queue was unreachable."""
    relayed = await relay_outbox(ctx["db"], ctx["redis"], older_than_s=ctx["settings"].relay_interval_s)
    if relayed:
        log.info("relayed %d pending deliveries", relayed)
    return relayed
