"""Durable intake: group-commit verified deliveries, answer, then enqueue (outbox relay as backstop)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bot.db import Database
from bot.handlers.sansio import IncomingDelivery
from bot.models import WebhookDelivery, utcnow

if TYPE_CHECKING:
    from arq.connections import ArqRedis

log = logging.getLogger(__name__)

StoreStatus = Literal["accepted", "duplicate"]


@dataclass
class _Pending:
    delivery: IncomingDelivery
    status: str
    future: asyncio.Future[tuple[StoreStatus, int]] = field(repr=False)


def split_batch(items: Sequence[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
    """First copy of each (provider, key) in the batch, and the later copies (duplicates)."""
    seen: set[tuple[str, str]] = set()
    firsts: list[_Pending] = []
    repeats: list[_Pending] = []
    for item in items:
        ident = (item.delivery.provider, item.delivery.key)
        (repeats if ident in seen else firsts).append(item)
        seen.add(ident)
    return firsts, repeats


class DeliveryStore:
    """Batches concurrent deliveries into one INSERT … ON CONFLICT DO NOTHING per commit.

    Each request awaits the commit that made its row durable, so `accepted` is only ever
    answered for a stored delivery. While one commit runs, new arrivals queue up and go in
    the next one: throughput grows with load instead of paying one fsync per request.
    """

    def __init__(
        self,
        db: Database,
        on_stored: Callable[[list[int]], Awaitable[None]],
        batch_max: int = 256,
    ) -> None:
        self.db = db
        self.on_stored = on_stored
        self.batch_max = batch_max
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._followups: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="delivery-store")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._followups:
            await asyncio.gather(*self._followups, return_exceptions=True)

    async def store(self, delivery: IncomingDelivery, status: str = "pending") -> tuple[StoreStatus, int]:
        """Make the delivery durable; `status="ignored"` stores it without enqueueing."""
        if self._task is None:
            raise RuntimeError("DeliveryStore.start() was not called")
        future: asyncio.Future[tuple[StoreStatus, int]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(delivery, status, future))
        return await future

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                new_ids = await self._commit(batch)
            except Exception as exc:  # the edge answers 503; the forge will show the failure
                log.exception("storing %d deliveries failed", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            if new_ids:
                task = asyncio.create_task(self._after_commit(new_ids))
                self._followups.add(task)
                task.add_done_callback(self._followups.discard)

    async def _after_commit(self, ids: list[int]) -> None:
        try:
            await self.on_stored(ids)
        except Exception as exc:  # the outbox relay picks these up later
            log.warning("enqueue of %d stored deliveries failed (%s); the relay will retry", len(ids), exc)

    async def _commit(self, batch: list[_Pending]) -> list[int]:
        firsts, repeats = split_batch(batch)
        rows = [
            {
                "provider": p.delivery.provider,
                "delivery_key": p.delivery.key,
                "event": p.delivery.event,
                "action": p.delivery.action,
                "status": p.status,
                "payload": p.delivery.body,
                "headers": p.delivery.headers,
                "outcome": {},
                "attempts": 0,
                "received_at": utcnow(),
            }
            for p in firsts
        ]
        insert_fn = sqlite_insert if self.db.is_sqlite else pg_insert
        stmt = (
            insert_fn(WebhookDelivery)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["provider", "delivery_key"])
            .returning(WebhookDelivery.id, WebhookDelivery.provider, WebhookDelivery.delivery_key)
        )
        async with self.db.engine.begin() as conn:
            inserted = {
                (r.provider, r.delivery_key): r.id for r in (await conn.execute(stmt)).all()
            }
            to_enqueue = [
                inserted[(p.delivery.provider, p.delivery.key)]
                for p in firsts
                if p.status == "pending" and (p.delivery.provider, p.delivery.key) in inserted
            ]
            missing = [
                (p.delivery.provider, p.delivery.key)
                for p in batch
                if (p.delivery.provider, p.delivery.key) not in inserted
            ]
            existing: dict[tuple[str, str], int] = {}
            if missing:
                keys = {key for _, key in missing}
                found = await conn.execute(
                    select(
                        WebhookDelivery.id, WebhookDelivery.provider, WebhookDelivery.delivery_key
                    ).where(WebhookDelivery.delivery_key.in_(keys))
                )
                existing = {(r.provider, r.delivery_key): r.id for r in found.all()}
        for item in firsts:
            ident = (item.delivery.provider, item.delivery.key)
            if ident in inserted:
                item.future.set_result(("accepted", inserted[ident]))
            else:
                item.future.set_result(("duplicate", existing.get(ident, 0)))
        for item in repeats:
            ident = (item.delivery.provider, item.delivery.key)
            item.future.set_result(("duplicate", inserted.get(ident) or existing.get(ident, 0)))
        return to_enqueue


async def pending_delivery_ids(
    db: Database, older_than_s: float = 0.0, after_id: int = 0, limit: int = 500
) -> list[int]:
    """Deliveries stored but not yet taken by a worker (the outbox), oldest first."""
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
    async with db.sessions() as session:
        result = await session.execute(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.received_at <= cutoff,
                WebhookDelivery.id > after_id,
            )
            .order_by(WebhookDelivery.id)
            .limit(limit)
        )
        return [row[0] for row in result.all()]


async def mark_enqueued(db: Database, ids: Sequence[int]) -> None:
    if not ids:
        return
    async with db.sessions.begin() as session:
        await session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(enqueued_at=utcnow())
        )


async def relay_outbox(db: Database, redis: ArqRedis, older_than_s: float = 0.0) -> int:
    """Enqueue stored-but-pending deliveries; arq job ids make a second relay a no-op."""
    from bot.queue import delivery_job, enqueue_many

    total = 0
    cursor = 0
    while True:
        ids = await pending_delivery_ids(db, older_than_s=older_than_s, after_id=cursor)
        if not ids:
            return total
        total += await enqueue_many(redis, [delivery_job(i) for i in ids])
        await mark_enqueued(db, ids)
        cursor = ids[-1]
