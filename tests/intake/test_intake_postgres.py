"""The Postgres group commit (issue 19): one prepared INSERT … SELECT FROM unnest per batch on a
held connection; exact ids and flags, durable commits, and a fresh connection after a failure."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from bot.handlers.sansio import IncomingDelivery
from bot.storage.db import create_database, postgres_connector
from bot.storage.intake import DeliveryStore, _Pending
from bot.storage.intake_pg import PostgresWriter, resolve
from bot.storage.queue import JobSpec
from tests.conftest import _truncate_postgres
from tests.intake.helpers import rows


def _pending(
    key: str, loop: asyncio.AbstractEventLoop, provider: str = "github", semantic: str | None = None
) -> _Pending:
    body = json.dumps({"action": "created", "key": key, "text": 'quote " backslash \\ brace { } ü'})
    delivery = IncomingDelivery(
        provider,
        key,
        "issue_comment",
        "created",
        body,
        {"x-github-event": "issue_comment"},
        semantic,
    )
    return _Pending(delivery, "pending", loop.create_future())


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    _truncate_postgres(postgres_url)
    return postgres_url


@pytest.fixture
async def writer(pg_url: str) -> AsyncIterator[PostgresWriter]:
    w = PostgresWriter(postgres_connector(pg_url, 2.5))
    try:
        yield w
    finally:
        await w.close()


async def _hold_key(other: Any, key: str) -> None:
    """Insert a delivery under `key` in another, open transaction: its key stays locked (a
    batch meeting it waits for that commit) until `other` commits or rolls back."""
    await other.execute(
        "INSERT INTO webhook_deliveries (provider, delivery_key, event, status, payload,"
        " headers, outcome, attempts, received_at)"
        " VALUES ('github', %s, 'issue_comment', 'pending', '{}', '{}', '{}', 0, now())",
        (key,),
    )


@contextlib.asynccontextmanager
async def _started_store(pg_url: str, **attrs: float) -> AsyncIterator[DeliveryStore]:
    """A running DeliveryStore on the test database (its class knobs set per test), stopped and
    disposed after; what it stores is not enqueued anywhere."""

    async def on_stored(jobs: list[JobSpec]) -> None:
        pass

    db = create_database(_plain(pg_url).replace("postgresql://", "postgresql+psycopg://"))
    store = DeliveryStore(db, on_stored)
    for name, value in attrs.items():
        setattr(store, name, value)
    store.start()
    try:
        yield store
    finally:
        await store.stop()
        await db.dispose()


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


async def test_ids_and_flags_for_new_mixed_and_old_batches(
    pg_url: str, writer: PostgresWriter
) -> None:
    loop = asyncio.get_running_loop()
    first = await writer.write([_pending(k, loop) for k in ("a", "b", "c")])
    assert [inserted for _, inserted in first] == [True, True, True]
    mixed = await writer.write(
        [
            _pending("b", loop),
            _pending("d", loop),
            _pending("a", loop),
            _pending("a", loop, "gitlab"),
        ]
    )
    again = await writer.write([_pending(k, loop) for k in ("c", "d")])
    stored = {
        (provider, key): row_id
        for row_id, provider, key in rows(
            pg_url, "SELECT id, provider, delivery_key FROM webhook_deliveries"
        )
    }
    assert len(stored) == 5
    assert first == [(stored[("github", k)], True) for k in ("a", "b", "c")]
    assert mixed == [
        (stored[("github", "b")], False),
        (stored[("github", "d")], True),
        (stored[("github", "a")], False),
        (stored[("gitlab", "a")], True),
    ]
    assert again == [(stored[("github", "c")], False), (stored[("github", "d")], False)]
    payload, headers, outcome, status, attempts = rows(
        pg_url,
        "SELECT payload, headers, outcome, status, attempts FROM webhook_deliveries"
        " WHERE delivery_key = 'a'",
    )[0]
    # the body is stored verbatim (quotes, backslashes and non-ASCII through the binary arrays)
    assert payload == _pending("a", loop).delivery.body
    assert headers == {"x-github-event": "issue_comment"}
    assert outcome == {} and status == "pending" and attempts == 0


async def test_a_replay_under_a_new_key_shares_the_row_of_its_semantic_key(
    pg_url: str, writer: PostgresWriter
) -> None:
    loop = asyncio.get_running_loop()
    [(original, inserted)] = await writer.write(
        [_pending("k1", loop, semantic="issue_comment:created:1:t")]
    )
    assert inserted
    replay = await writer.write(
        [
            _pending("k2", loop, semantic="issue_comment:created:1:t"),
            _pending("k3", loop, semantic="other"),
        ]
    )
    assert replay[0] == (original, False)
    assert replay[1][1] is True
    assert len(rows(pg_url, "SELECT id FROM webhook_deliveries")) == 2


async def test_commits_are_synchronous_even_when_the_database_default_is_off(pg_url: str) -> None:
    name = pg_url.rsplit("/", 1)[1]
    async with await psycopg.AsyncConnection.connect(_plain(pg_url), autocommit=True) as admin:
        await admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    writer = PostgresWriter(postgres_connector(pg_url, 2.5))
    try:
        await writer.write([_pending("a", asyncio.get_running_loop())])
        assert writer._conn is not None
        cur = await writer._conn.execute("SHOW synchronous_commit")
        assert await cur.fetchone() == ("on",)
        assert writer._conn.autocommit  # each batch is its own committed transaction
    finally:
        await writer.close()
        async with await psycopg.AsyncConnection.connect(_plain(pg_url), autocommit=True) as admin:
            await admin.execute(f'ALTER DATABASE "{name}" RESET synchronous_commit')


async def test_a_killed_connection_fails_its_batch_and_the_next_batch_reconnects(
    pg_url: str, writer: PostgresWriter
) -> None:
    loop = asyncio.get_running_loop()
    await writer.write([_pending("a", loop)])
    assert writer._conn is not None
    pid = writer._conn.info.backend_pid
    async with await psycopg.AsyncConnection.connect(_plain(pg_url), autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        await writer.write([_pending("b", loop)])
    assert writer._conn is None
    [(row_id, inserted)] = await writer.write([_pending("b", loop)])
    assert inserted
    assert writer._conn is not None and writer._conn.info.backend_pid != pid
    assert {k for (k,) in rows(pg_url, "SELECT delivery_key FROM webhook_deliveries")} == {"a", "b"}
    assert row_id > 0


async def test_an_all_new_batch_is_one_plain_insert_and_a_stored_key_sends_it_again(
    pg_url: str, writer: PostgresWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual batch skips ON CONFLICT's speculative insertion; one that meets a stored key
    fails whole, goes again with ON CONFLICT DO NOTHING, and the connection's prepared
    statements keep working for the batches after it."""
    from bot.storage.intake_pg import INSERT_BATCH, INSERT_NEW

    sent: list[str] = []
    execute = psycopg.AsyncConnection.execute

    async def spy(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append("new" if query == INSERT_NEW else "batch" if query == INSERT_BATCH else "other")
        return await execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "execute", spy)
    loop = asyncio.get_running_loop()
    first = await writer.write([_pending(k, loop) for k in ("a", "b")])
    assert sent[-1:] == ["new"] and [flag for _, flag in first] == [True, True]
    sent.clear()
    mixed = await writer.write([_pending("c", loop), _pending("a", loop)])
    assert sent == ["new", "batch", "other"]  # failed, again, then the stored key's id looked up
    assert mixed[1] == (first[0][0], False) and mixed[0][1] is True
    sent.clear()
    after = await writer.write([_pending("d", loop), _pending("e", loop, semantic="s")])
    assert sent == ["new"] and [flag for _, flag in after] == [True, True]
    keys = {k for (k,) in rows(pg_url, "SELECT delivery_key FROM webhook_deliveries")}
    assert keys == {"a", "b", "c", "d", "e"}


def test_resolve_prefers_the_delivery_key_then_the_semantic_key() -> None:
    loop = asyncio.new_event_loop()
    try:
        items = [
            _pending("new", loop),
            _pending("old", loop),
            _pending("replay", loop, semantic="s"),
            _pending("gone", loop),
        ]
    finally:
        loop.close()
    stored: list[tuple[int, str, str, Any]] = [
        (7, "github", "old", None),
        (9, "github", "first", "s"),
    ]
    assert resolve(items, {("github", "new"): 11}, stored) == [
        (11, True),
        (7, False),
        (9, False),
        (0, False),
    ]


def test_the_payload_column_is_compressed_with_lz4(pg_url: str) -> None:
    """Migration 0012: lz4 costs the server less CPU per 4 KB body than the default pglz."""
    [(method,)] = rows(
        pg_url,
        "SELECT attcompression FROM pg_attribute"
        " WHERE attrelid = 'webhook_deliveries'::regclass AND attname = 'payload'",
    )
    assert method == "l"


async def test_a_second_batch_commits_while_the_first_waits_and_a_racing_key_is_a_duplicate(
    pg_url: str,
) -> None:
    """Two commits in flight: one blocked on a key another transaction holds does not hold up
    the next batch, and once that transaction commits, the blocked delivery is its duplicate."""

    enqueued: list[JobSpec] = []

    async def on_stored(jobs: list[JobSpec]) -> None:
        enqueued.extend(jobs)

    db = create_database(_plain(pg_url).replace("postgresql://", "postgresql+psycopg://"))
    store = DeliveryStore(db, on_stored)
    store.start()
    loop = asyncio.get_running_loop()
    racing = _pending("racing", loop).delivery
    try:
        async with await psycopg.AsyncConnection.connect(_plain(pg_url)) as other:
            cur = await other.execute(
                "INSERT INTO webhook_deliveries (provider, delivery_key, event, status, payload,"
                " headers, outcome, attempts, received_at)"
                " VALUES ('github', 'racing', 'issue_comment', 'pending', '{}', '{}', '{}',"
                " 0, now()) RETURNING id"
            )
            row = await cur.fetchone()
            assert row is not None
            blocked = asyncio.ensure_future(store.store(racing))
            await asyncio.sleep(0.3)
            assert not blocked.done()  # waiting for the other transaction's key
            outcome, _ = await asyncio.wait_for(store.store(_pending("free", loop).delivery), 5)
            assert outcome == "accepted" and not blocked.done()
            await other.commit()
        assert await asyncio.wait_for(blocked, 5) == ("duplicate", row[0])
        await asyncio.sleep(0.1)
        assert [job.kwargs["delivery_key"] for job in enqueued] == ["free"]
    finally:
        await store.stop()
        await db.dispose()


async def test_a_few_deliveries_wait_for_the_commit_under_way_and_go_in_one_batch(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer than PG_SECOND_BATCH_MIN deliveries wait for the commit under way (one commit for
    them, not one each); that many start a second commit at once."""

    sizes: list[int] = []
    write = PostgresWriter.write

    async def spy(self: PostgresWriter, items: Any) -> Any:
        sizes.append(len(items))
        return await write(self, items)

    monkeypatch.setattr(PostgresWriter, "write", spy)

    async def on_stored(jobs: list[JobSpec]) -> None:
        pass

    db = create_database(_plain(pg_url).replace("postgresql://", "postgresql+psycopg://"))
    store = DeliveryStore(db, on_stored)
    store.PG_SECOND_BATCH_WAIT_S = 30.0  # the wait ends with the commit, not with its limit
    store.start()
    loop = asyncio.get_running_loop()

    def submit(*keys: str) -> list[asyncio.Future[Any]]:
        return [asyncio.ensure_future(store.store(_pending(k, loop).delivery)) for k in keys]

    try:
        async with await psycopg.AsyncConnection.connect(_plain(pg_url)) as other:
            await _hold_key(other, "held")
            [held] = submit("held")
            await asyncio.sleep(0.2)  # its commit waits for the other transaction's key
            few = submit("few-1", "few-2", "few-3")
            await asyncio.sleep(0.3)
            assert not any(f.done() for f in [held, *few])
            many = submit(*(f"many-{i}" for i in range(DeliveryStore.PG_SECOND_BATCH_MIN)))
            for outcome, _ in await asyncio.wait_for(asyncio.gather(*many), 5):
                assert outcome == "accepted"
            assert not held.done()
            await other.rollback()
        results = await asyncio.wait_for(asyncio.gather(held, *few), 5)
        assert [outcome for outcome, _ in results] == ["accepted"] * 4
        # the waiting few went with the many, in the second commit
        assert sizes == [1, 3 + DeliveryStore.PG_SECOND_BATCH_MIN]
    finally:
        await store.stop()
        await db.dispose()


async def test_a_few_deliveries_behind_a_stuck_commit_go_when_the_wait_ends(
    pg_url: str,
) -> None:
    """Arrivals that find the hold armed do not wake the batching loop (store() skips it); the
    hold's timer does, so a few deliveries behind a commit stuck on a lock still commit once
    PG_SECOND_BATCH_WAIT_S has passed, in one batch, while that commit is still stuck."""
    loop = asyncio.get_running_loop()
    async with _started_store(pg_url, PG_SECOND_BATCH_WAIT_S=0.3) as store:
        async with await psycopg.AsyncConnection.connect(_plain(pg_url)) as other:
            await _hold_key(other, "held")
            held = asyncio.ensure_future(store.store(_pending("held", loop).delivery))
            await asyncio.sleep(0.05)  # its commit is under way, waiting for the key
            started = loop.time()
            few = [
                asyncio.ensure_future(store.store(_pending(f"few-{i}", loop).delivery))
                for i in range(3)
            ]
            results = await asyncio.wait_for(asyncio.gather(*few), 5)
            assert [outcome for outcome, _ in results] == ["accepted"] * 3
            assert loop.time() - started < 2.0
            assert not held.done()
            await other.rollback()
        outcome, _ = await asyncio.wait_for(held, 5)
        assert outcome == "accepted"


async def test_a_commit_past_the_deadline_answers_timeout_and_later_requests_still_commit(
    pg_url: str,
) -> None:
    """One timer for every waiter: a delivery whose commit is stuck past `deadline_s` fails with
    TimeoutError (the edge's 503) at its deadline, and the deliveries after it are unaffected."""
    loop = asyncio.get_running_loop()
    async with _started_store(pg_url, deadline_s=0.5) as store:
        async with await psycopg.AsyncConnection.connect(_plain(pg_url)) as other:
            await _hold_key(other, "stuck")
            started = loop.time()
            stuck = asyncio.ensure_future(store.store(_pending("stuck", loop).delivery))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(stuck, 5)
            assert 0.4 < loop.time() - started < 1.5
            for key in ("after-1", "after-2"):
                outcome, _ = await asyncio.wait_for(store.store(_pending(key, loop).delivery), 5)
                assert outcome == "accepted"
            await other.rollback()


async def test_the_text_array_dumper_round_trips_nulls_non_ascii_and_empty_arrays(
    pg_url: str,
) -> None:
    from bot.storage.intake_pg import TextArray, TextArrayDumper

    async with await psycopg.AsyncConnection.connect(_plain(pg_url)) as conn:
        conn.adapters.register_dumper(TextArray, TextArrayDumper)
        for values in ([], ["a"], ['ü " \\ { } ,', None, "", "x" * 5000], [None]):
            cur = await conn.execute(
                "SELECT %b::text[], cardinality(%b::text[])", (TextArray(values), TextArray(values))
            )
            assert await cur.fetchone() == (values, len(values))
