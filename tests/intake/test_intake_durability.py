"""Durable intake against real Redis and both databases: concurrent duplicates, queue outages."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
from arq.constants import default_queue_name

from bot.jobs.worker import build_worker, close_worker
from bot.storage.db import create_database
from bot.storage.queue import JobSpec, delivery_job_id
from bot.web.app import create_app
from tests.conftest import LiveServer, make_settings
from tests.intake.helpers import comment_body, github_headers, rows, sync_url


def queued_jobs(redis_url: str) -> list[str]:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        members: list[bytes] = client.zrange(default_queue_name, 0, -1)  # type: ignore[assignment]
        return [j.decode() for j in members]
    finally:
        client.close()


async def _post_many(
    url: str, body: bytes, headers: dict[str, str], n: int
) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(
            *[http.post(url, content=body, headers=headers) for _ in range(n)]
        )


def test_fifty_concurrent_copies_make_one_row_and_one_job(
    tmp_path: Path, db_url: str, redis_url: str, live_server: type[LiveServer]
) -> None:
    settings = make_settings(tmp_path, db_url=db_url, redis_url=redis_url)
    body = comment_body()
    headers = github_headers(body, delivery=f"storm-{uuid.uuid4()}")
    with live_server(create_app(settings, embedded_worker=False)) as server:
        responses = asyncio.run(_post_many(server.url + "/webhooks/github", body, headers, 50))
        statuses = sorted(r.json()["status"] for r in responses)
        assert statuses.count("accepted") == 1
        assert statuses.count("duplicate") == 49
        assert {r.status_code for r in responses if r.json()["status"] == "duplicate"} == {200}
        assert len({r.json()["id"] for r in responses}) == 1
        # the enqueue happens right after the commit; give it a moment
        for _ in range(100):
            if queued_jobs(redis_url):
                break
            asyncio.run(asyncio.sleep(0.02))
    assert len(rows(db_url, "SELECT id FROM webhook_deliveries")) == 1
    assert queued_jobs(redis_url) == [delivery_job_id("github", headers["X-GitHub-Delivery"])]


def test_distinct_deliveries_under_concurrency_each_get_one_job(
    tmp_path: Path, db_url: str, redis_url: str, live_server: type[LiveServer]
) -> None:
    settings = make_settings(tmp_path, db_url=db_url, redis_url=redis_url)

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            calls = []
            for i in range(40):
                body = comment_body(f"note {i}")
                # every delivery twice: 40 distinct, 80 requests in flight at once
                headers = github_headers(body, delivery=f"d-{i}")
                calls += [http.post(url, content=body, headers=headers) for _ in range(2)]
            return await asyncio.gather(*calls)

    with live_server(create_app(settings, embedded_worker=False)) as server:
        responses = asyncio.run(burst(server.url + "/webhooks/github"))
        for _ in range(100):
            if len(queued_jobs(redis_url)) >= 40:
                break
            asyncio.run(asyncio.sleep(0.02))
    assert sorted(r.json()["status"] for r in responses).count("accepted") == 40
    assert len(rows(db_url, "SELECT id FROM webhook_deliveries")) == 40
    assert len(queued_jobs(redis_url)) == 40


def test_queue_down_then_up_relays_each_delivery_exactly_once(
    tmp_path: Path, db_url: str, redis_url: str, live_server: type[LiveServer]
) -> None:
    down = make_settings(tmp_path, db_url=db_url, redis_url="redis://127.0.0.1:1/0")
    ids: list[int] = []
    keys: list[str] = []
    with (
        live_server(create_app(down, embedded_worker=False)) as server,
        httpx.Client(timeout=30) as http,
    ):
        for i in range(5):
            body = comment_body(f"note {i}")
            res = http.post(
                server.url + "/webhooks/github", content=body, headers=github_headers(body)
            )
            assert res.status_code == 202 and res.json()["status"] == "accepted"
            ids.append(res.json()["id"])
            keys.append(res.json()["delivery"])
    stored = rows(db_url, "SELECT id, status FROM webhook_deliveries ORDER BY id")
    assert [tuple(r) for r in stored] == [(i, "pending") for i in ids]
    assert queued_jobs(redis_url) == []

    # the queue is back: the server relays at start (twice here: a restart must not double)
    up = make_settings(tmp_path, db_url=db_url, redis_url=redis_url)
    for _ in range(2):
        with live_server(create_app(up, embedded_worker=False)):
            pass
    assert sorted(queued_jobs(redis_url)) == sorted(delivery_job_id("github", k) for k in keys)

    async def drain() -> None:
        worker = build_worker(up, ctx={}, burst=True)
        try:
            await worker.async_run()
        finally:
            await close_worker(worker)

    asyncio.run(drain())
    assert [
        tuple(r)
        for r in rows(db_url, "SELECT id, status, attempts FROM webhook_deliveries ORDER BY id")
    ] == [(i, "processed", 1) for i in ids]
    received = rows(db_url, "SELECT delivery_id FROM events WHERE event_type = 'delivery.received'")
    assert sorted(r[0] for r in received) == sorted(ids)


def test_worker_relays_pending_deliveries_and_rerun_is_idempotent(
    tmp_path: Path, sqlite_url: str, redis_url: str
) -> None:
    settings = make_settings(tmp_path, db_url=sqlite_url, redis_url=redis_url, relay_interval_s=1)

    async def scenario() -> None:
        from bot.handlers.sansio import IncomingDelivery
        from bot.jobs.deliveries import process_delivery
        from bot.storage.intake import DeliveryStore

        db = create_database(settings.async_database_url)

        async def unreachable(jobs: list[JobSpec]) -> None:
            raise ConnectionError("queue down")

        store = DeliveryStore(db, unreachable)
        store.start()
        payload = {"action": "created"}
        status, delivery_id = await store.store(
            IncomingDelivery("github", "k1", "issue_comment", "created", json.dumps(payload), {})
        )
        await store.stop()
        assert status == "accepted"
        worker = build_worker(settings, ctx={}, burst=True)
        try:
            from bot.jobs.deliveries import relay_pending

            ctx = {"db": db, "redis": worker.pool, "settings": settings}
            assert await relay_pending(ctx) == 0  # younger than the relay interval: left alone
            await asyncio.sleep(1.1)
            assert await relay_pending(ctx) == 1
            assert await relay_pending(ctx) == 0  # already queued: the job id dedupes it
            await worker.async_run()
            # a re-run of the same job (at-least-once delivery) does nothing the second time
            from bot.handlers.routes import build_router

            again = await process_delivery(
                {**ctx, "router": build_router()}, delivery_id=delivery_id
            )
            assert again == "already-processed"
        finally:
            await close_worker(worker)
            await db.dispose()

    asyncio.run(scenario())
    assert rows(sync_url(sqlite_url), "SELECT status, attempts FROM webhook_deliveries")[0] == (
        "processed",
        1,
    )


@pytest.mark.parametrize(
    "table", ["projects", "protocol_runs", "step_runs", "events", "webhook_deliveries"]
)
def test_migrations_build_every_table(db_url: str, table: str) -> None:
    assert rows(db_url, f"SELECT COUNT(*) FROM {table}") == [(0,)]


def test_old_finished_deliveries_are_pruned_and_the_rest_kept(tmp_path: Path, db_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from bot.jobs.deliveries import prune_old_deliveries
    from bot.storage.models import WebhookDelivery

    settings = make_settings(tmp_path, db_url=db_url, delivery_retention_days=30)

    async def scenario() -> tuple[int, int, int]:
        db = create_database(settings.async_database_url)
        try:
            async with db.sessions.begin() as session:
                for i, status in enumerate(
                    ["processed", "ignored", "failed", "pending", "processed"]
                ):
                    session.add(
                        WebhookDelivery(
                            provider="github", delivery_key=f"k{i}", event="issues", status=status,
                            payload="{}", headers={}, outcome={}, attempts=0,
                        )
                    )  # fmt: skip
            old = datetime.now(UTC) - timedelta(days=31)
            async with db.sessions.begin() as session:  # all but the last are past retention
                await session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.delivery_key != "k4")
                    .values(received_at=old)
                )
            ctx = {"db": db, "settings": settings}
            pruned = await prune_old_deliveries(ctx)
            again = await prune_old_deliveries(ctx)
            forever = settings.model_copy(update={"delivery_retention_days": 0})
            kept_all = await prune_old_deliveries({"db": db, "settings": forever})
            async with db.sessions.begin() as session:  # now the newest one is old too...
                await session.execute(update(WebhookDelivery).values(received_at=old))
            newest_kept = await prune_old_deliveries(ctx)  # ...but it stays: its id is never reused
            return pruned + newest_kept, again, kept_all
        finally:
            await db.dispose()

    assert asyncio.run(scenario()) == (2, 0, 0)
    left = sorted(r[0] for r in rows(db_url, "SELECT delivery_key FROM webhook_deliveries"))
    assert left == ["k2", "k3", "k4"]  # failed, pending, and the recent processed one
