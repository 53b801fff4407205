"""The worker under faults (issue 20, points 11-13), real Redis and both databases: a Redis of
the test's own killed and restarted under load, a worker SIGKILLed mid-batch, a new database
with an old Redis. Every stored delivery is processed, and exactly once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis as redis_sync

from bot.jobs.worker import build_worker, close_worker
from bot.storage.migrate import upgrade_head
from bot.web.app import create_app
from tests.conftest import LiveServer, _truncate_postgres, make_settings
from tests.faults.conftest import OwnRedis, WorkerProcess
from tests.intake.helpers import comment_body, github_headers, rows, sync_url


def post_deliveries(url: str, start: int, n: int) -> list[int]:
    """n distinct signed deliveries (no command in them: only the recorder acts), their ids."""
    ids: list[int] = []
    with httpx.Client(timeout=30) as http:
        for i in range(start, start + n):
            body = comment_body(f"note {i}")
            answer = http.post(url + "/webhooks/github", content=body, headers=github_headers(body))
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
    return ids


def statuses(db_url: str) -> dict[int, str]:
    return {int(r[0]): str(r[1]) for r in rows(db_url, "SELECT id, status FROM webhook_deliveries")}


def wait_processed(
    db_url: str, ids: list[int], timeout: float, worker: WorkerProcess | None = None
) -> float:
    """Seconds until every delivery in `ids` is processed; fails after `timeout`."""
    started = time.monotonic()
    while True:
        found = statuses(db_url)
        left = [i for i in ids if found.get(i) != "processed"]
        if not left:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            detail = Counter(found.get(i, "missing") for i in left)
            log = worker.output() if worker is not None else ""
            raise AssertionError(
                f"{len(left)} deliveries not processed after {timeout} s: {dict(detail)}\n{log}"
            )
        time.sleep(0.25)


def handled_once(db_url: str, ids: list[int], interrupted: frozenset[int] = frozenset()) -> None:
    """Each delivery's handlers ran once: one `delivery.received` event per delivery.

    A delivery whose worker was killed while handling it (`interrupted`) may have got as far as
    its handlers' own commits: at-least-once, so it may show twice, never more.
    """
    received = Counter(
        int(r[0])
        for r in rows(
            db_url, "SELECT delivery_id FROM events WHERE event_type = 'delivery.received'"
        )
    )
    expected = {i: (received[i] if i in interrupted and received[i] in (1, 2) else 1) for i in ids}
    assert {i: received[i] for i in ids} == expected


def test_worker_survives_a_redis_restart_under_load(
    tmp_path: Path, db_url: str, own_redis: OwnRedis, live_server: type[LiveServer]
) -> None:
    settings = make_settings(tmp_path, db_url=db_url, redis_url=own_redis.url)
    worker = WorkerProcess(tmp_path, db_url, own_redis.url)
    worker.start()
    try:
        with live_server(create_app(settings, embedded_worker=False)) as server:
            ids = post_deliveries(server.url, 0, 40)
            own_redis.kill()  # every queued job is gone with it (no persistence)
            ids += post_deliveries(server.url, 40, 30)  # stored, not enqueued: the outbox
            time.sleep(3)
            assert worker.alive(), worker.output()
            own_redis.start()
            ids += post_deliveries(server.url, 70, 30)
            wait_processed(db_url, ids, timeout=75, worker=worker)
        assert worker.alive(), worker.output()
        handled_once(db_url, ids)
    finally:
        worker.stop()


@pytest.mark.parametrize("redis_lost", [False, True], ids=["redis-kept", "redis-lost"])
def test_worker_sigkill_mid_batch_every_delivery_processed_within_60s(
    tmp_path: Path,
    db_url: str,
    own_redis: OwnRedis,
    live_server: type[LiveServer],
    redis_lost: bool,
) -> None:
    settings = make_settings(tmp_path, db_url=db_url, redis_url=own_redis.url)
    with live_server(create_app(settings, embedded_worker=False)) as server:
        ids = post_deliveries(server.url, 0, 150)
    worker = WorkerProcess(tmp_path, db_url, own_redis.url)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while "processed" not in statuses(db_url).values():  # kill it as soon as it is at work
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.05)
        worker.kill()
        at_kill = statuses(db_url)
        interrupted = frozenset(i for i, status in at_kill.items() if status == "processing")
        assert list(at_kill.values()).count("processed") < len(ids), (
            "the batch finished before the kill"
        )
        if redis_lost:  # the worker and an unpersisted Redis die together
            own_redis.kill()
            own_redis.start()
        worker = WorkerProcess(tmp_path, db_url, own_redis.url)
        restarted = time.monotonic()
        worker.start()
        wait_processed(db_url, ids, timeout=60 - (time.monotonic() - restarted), worker=worker)
        handled_once(db_url, ids, interrupted)
    finally:
        worker.stop()


def test_new_database_with_old_redis_processes_deliveries(
    tmp_path: Path, db_url: str, redis_url: str, live_server: type[LiveServer]
) -> None:
    async def drain(settings_db: str) -> None:
        worker = build_worker(
            make_settings(tmp_path, db_url=settings_db, redis_url=redis_url), ctx={}, burst=True
        )
        try:
            await worker.async_run()
        finally:
            await close_worker(worker)

    first = make_settings(tmp_path, db_url=db_url, redis_url=redis_url)
    with live_server(create_app(first, embedded_worker=False)) as server:
        old = post_deliveries(server.url, 0, 3)
    asyncio.run(drain(db_url))
    assert set(statuses(db_url).values()) == {"processed"}
    results = redis_sync.Redis.from_url(redis_url)
    assert len(list(results.scan_iter("arq:result:*"))) >= 3  # the old results stay in Redis
    results.close()

    # a re-created database: row ids start from 1 again, Redis still remembers the old jobs
    if db_url.startswith("sqlite"):
        new_url = f"sqlite:///{tmp_path / 'new.sqlite3'}"
        upgrade_head(new_url)
    else:
        _truncate_postgres(sync_url(db_url))
        new_url = db_url
    second = make_settings(tmp_path, db_url=new_url, redis_url=redis_url)
    with live_server(create_app(second, embedded_worker=False)) as server:
        new = post_deliveries(server.url, 100, 3)
    assert new == old  # the same row ids as before
    asyncio.run(drain(new_url))
    assert statuses(new_url) == {i: "processed" for i in new}
    handled_once(new_url, new)
