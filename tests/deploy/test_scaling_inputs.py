"""What the autoscaler and the rollout rely on: the queue-demand gauge and concurrent `migrate`."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import create_engine, text
from starlette.testclient import TestClient

from bot.storage.migrate import upgrade_head
from bot.storage.queue import queue_stats
from bot.web.app import create_app
from tests.conftest import PG_ADMIN_URL, make_settings


async def _pool(url: str) -> ArqRedis:
    return await create_pool(RedisSettings.from_dsn(url))


@pytest.mark.redis
async def test_demand_counts_due_and_running_jobs_not_deferred(redis_url: str) -> None:
    redis = await _pool(redis_url)
    try:
        await redis.enqueue_job("execute_step", _job_id="due-1")
        await redis.enqueue_job("execute_step", _job_id="due-2")
        await redis.enqueue_job("execute_step", _job_id="later", _defer_by=600)
        await redis.set("arq:in-progress:running-1", b"1", px=60_000)
        stats = await queue_stats(redis)
    finally:
        await redis.aclose()
    assert (stats.depth, stats.ready, stats.in_progress) == (3, 2, 1)
    # a deferred retry does not wake a worker before its time; a running job keeps its worker
    assert stats.demand == 3


@pytest.mark.redis
def test_metrics_exports_the_demand_gauge(tmp_path: Path, sqlite_url: str, redis_url: str) -> None:
    settings = make_settings(tmp_path, db_url=sqlite_url, redis_url=redis_url)
    with TestClient(create_app(settings, embedded_worker=False)) as client:
        client.portal.call(_enqueue_two, redis_url)  # type: ignore[union-attr]
        text_ = client.get("/metrics").text
    assert "deksdenflow_queue_demand 2.0" in text_


async def _enqueue_two(url: str) -> None:
    redis = await _pool(url)
    try:
        await redis.enqueue_job("execute_step", _job_id="m-1")
        await redis.enqueue_job("execute_step", _job_id="m-2")
    finally:
        await redis.aclose()


@pytest.mark.postgres
def test_pods_migrating_at_once_take_turns() -> None:
    """Every pod's init step runs `migrate`: concurrent runs must all succeed, once each."""
    name = f"df_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            upgrade_head(url)
        except BaseException as exc:
            errors.append(exc)

    try:
        # daemon: without the lock the upgrades deadlock, and the test must fail, not hang
        threads = [threading.Thread(target=migrate, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "concurrent migrations did not finish"
        assert not errors, errors
        engine = create_engine(url)
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
            # the lock is free again: a later pod does not wait
            free = conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"))
            assert free.scalar_one() == 0
        engine.dispose()
        assert len(versions) == 1
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
