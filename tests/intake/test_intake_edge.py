"""The plain-ASGI webhook edge, the one-statement SQLite group commit and the Lua enqueue."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import MutableMapping
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.jobs import deserialize_job
from starlette.testclient import TestClient

from bot.core.errors import WebhookError
from bot.handlers.sansio import IncomingDelivery
from bot.storage.intake import SqliteWriter, _Pending
from bot.storage.queue import JobSpec, create_redis, delivery_job, enqueue_many
from bot.web.app import create_app
from bot.web.edge import read_body
from tests.conftest import GITHUB_SECRET, make_settings
from tests.intake.helpers import comment_body, github_headers, rows

# --- the edge over HTTP ------------------------------------------------------------------------


def test_other_methods_get_405_and_a_trailing_slash_still_works(client: TestClient) -> None:
    assert client.get("/webhooks/github").status_code == 405
    assert client.put("/webhooks/gitlab", content=b"{}").status_code == 405
    body = comment_body()
    res = client.post("/webhooks/github/", content=body, headers=github_headers(body))
    assert res.status_code == 202 and res.json()["status"] == "accepted"


@pytest.mark.parametrize(
    "body",
    [
        b'{"action": "created", "size": 1e400}',  # JSON allows it; msgspec refuses, stdlib decides
        b'{"action": "created", "id": 123456789012345678901234567890}',
        b'{"action": "first", "action": "created"}',  # duplicate keys: the last one wins
    ],
)
def test_json_the_fast_decoder_refuses_but_json_allows_is_accepted(
    client: TestClient, body: bytes
) -> None:
    res = client.post("/webhooks/github", content=body, headers=github_headers(body))
    assert res.status_code == 202, res.text
    db_url = client.db_url  # type: ignore[attr-defined]
    (action,) = rows(
        db_url, f"SELECT action FROM webhook_deliveries WHERE id = {res.json()['id']}"
    )[0]
    assert action == "created"


def test_a_bug_in_the_edge_answers_500_json_and_logs_without_the_secret(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    edge = client.app.edges["/webhooks/github"]  # type: ignore[attr-defined]

    def broken(headers: dict[str, str], body: bytes, secret: str) -> IncomingDelivery:
        raise RuntimeError(f"boom with {secret}")

    monkeypatch.setattr(edge, "parse", broken)
    body = comment_body()
    with caplog.at_level(logging.ERROR):
        res = client.post("/webhooks/github", content=body, headers=github_headers(body))
    assert res.status_code == 500
    assert "redeliver" in res.json()["error"]
    assert rows(client.db_url, "SELECT id FROM webhook_deliveries") == []  # type: ignore[attr-defined]
    assert GITHUB_SECRET not in caplog.text


async def test_a_client_that_hangs_up_mid_body_gets_no_answer_and_nothing_is_stored(
    tmp_path: Path, sqlite_url: str
) -> None:
    app = create_app(make_settings(tmp_path, db_url=sqlite_url), embedded_worker=False)
    body = comment_body()
    headers = {k.lower(): v for k, v in github_headers(body).items()}
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/webhooks/github",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    async with _lifespan(app):
        await app(scope, receive, send)
    assert sent == []
    assert rows(sqlite_url, "SELECT id FROM webhook_deliveries") == []


class _lifespan:
    """Run an ASGI app's lifespan around a block (what uvicorn does around serving)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __aenter__(self) -> None:
        self.task = asyncio.create_task(
            self.app({"type": "lifespan"}, self.inbox.get, self.outbox.put)
        )
        await self.inbox.put({"type": "lifespan.startup"})
        assert (await self.outbox.get())["type"] == "lifespan.startup.complete"

    async def __aexit__(self, *exc: object) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        assert (await self.outbox.get())["type"] == "lifespan.shutdown.complete"
        await self.task


async def test_read_body_joins_chunks_and_refuses_a_bad_content_length() -> None:
    parts = [b'{"a":', b" 1", b"}"]

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

    assert await read_body({"content-length": "8"}, receive, 100) == b'{"a": 1}'
    with pytest.raises(WebhookError) as err:
        await read_body({"content-length": "eight"}, receive, 100)
    assert err.value.status_code == 400


# --- the SQLite group commit -------------------------------------------------------------------


def _pending(key: str, loop: asyncio.AbstractEventLoop, provider: str = "github") -> _Pending:
    body = json.dumps({"action": "created", "key": key})
    delivery = IncomingDelivery(
        provider, key, "issue_comment", "created", body, {"x-github-event": "issue_comment"}
    )
    return _Pending(delivery, "pending", loop.create_future())


async def test_sqlite_writer_ids_and_flags_for_new_mixed_and_old_batches(sqlite_url: str) -> None:
    loop = asyncio.get_running_loop()
    writer = SqliteWriter(sqlite_url.removeprefix("sqlite:///"))
    try:
        first = await writer.write([_pending(k, loop) for k in ("a", "b", "c")])
        assert [inserted for _, inserted in first] == [True, True, True]
        # a batch mixing stored and new keys, and the same key under another provider
        mixed = await writer.write(
            [
                _pending("b", loop),
                _pending("d", loop),
                _pending("a", loop),
                _pending("a", loop, "gitlab"),
            ]
        )
        again = await writer.write([_pending(k, loop) for k in ("c", "d")])
    finally:
        writer.close()
    stored = {
        (provider, key): row_id
        for row_id, provider, key in rows(
            sqlite_url, "SELECT id, provider, delivery_key FROM webhook_deliveries"
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
    headers, outcome, status = rows(
        sqlite_url, "SELECT headers, outcome, status FROM webhook_deliveries LIMIT 1"
    )[0]
    assert json.loads(headers) == {"x-github-event": "issue_comment"}
    assert json.loads(outcome) == {} and status == "pending"


def _in_database_file(path: str) -> int:
    """Rows in the database file itself, leaving the WAL aside: what checkpoints copied."""
    for _ in range(20):
        try:
            with closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as conn:
                return int(conn.execute("SELECT count(*) FROM webhook_deliveries").fetchone()[0])
        except sqlite3.DatabaseError:  # read while a checkpoint was writing the pages: again
            time.sleep(0.01)
    raise AssertionError("the database file could not be read")


async def test_a_bursts_last_writes_are_checkpointed_without_a_further_write(
    sqlite_url: str,
) -> None:
    """The WAL a burst leaves is copied into the database file while no delivery comes, not
    by the first one after the pause (whose commit would wait for that copy's disk writes)."""
    loop = asyncio.get_running_loop()
    path = sqlite_url.removeprefix("sqlite:///")
    writer = SqliteWriter(path)
    writer.CHECKPOINT_EVERY_S = 0.2
    try:
        await writer.write([_pending(f"k{i}", loop) for i in range(3)])
        await asyncio.sleep(0.3)  # the first write's checkpoint (due at once) has run
        for i in range(3, 40):
            await writer.write([_pending(f"k{i}", loop)])
        assert _in_database_file(path) < 40  # the burst is in the WAL, within the interval
        for _ in range(50):  # then the quiet: a checkpoint comes on its own
            if _in_database_file(path) == 40:
                break
            await asyncio.sleep(0.05)
        assert _in_database_file(path) == 40
    finally:
        writer.close()


# --- the Lua enqueue ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_enqueue_many_keeps_arqs_semantics(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue("redis_url") if backend == "redis" else "memory://"
    redis: ArqRedis = create_redis(make_settings(tmp_path, redis_url=url))
    try:

        def job(i: int) -> JobSpec:
            return delivery_job(i, "github", f"key-{i}")

        jobs = [job(i) for i in (1, 2, 3)]
        assert await enqueue_many(redis, jobs) == 3
        assert await enqueue_many(redis, jobs) == 0  # a relay of the same ids adds nothing
        await redis.set(f"arq:result:{job(4).job_id}", b"done")  # finished earlier: never re-run
        assert await enqueue_many(redis, [job(4), job(5)]) == 1
        assert await enqueue_many(redis, []) == 0
        queued = [m.decode() for m in await redis.zrange("arq:queue", 0, -1)]
        assert sorted(queued) == sorted(job(i).job_id for i in (1, 2, 3, 5))
        raw = await redis.get(f"arq:job:{job(2).job_id}")
        assert raw is not None
        found = deserialize_job(raw)
        assert (found.function, found.args, found.kwargs) == (
            "process_delivery",
            (),
            {"delivery_id": 2, "delivery_key": "key-2"},
        )
        assert 0 < await redis.pttl(f"arq:job:{job(2).job_id}") <= 24 * 3600 * 1000
        other = JobSpec("project_onboard", f"onboard:{uuid.uuid4()}", {"project_id": 7})
        assert await enqueue_many(redis, [other], queue="arq:other") == 1
        assert await redis.zcard("arq:other") == 1
    finally:
        await redis.aclose(close_connection_pool=True)


# --- the listening socket ----------------------------------------------------------------------


async def test_serves_socket_gives_connections_tcp_nodelay_on_asyncio() -> None:
    """Without TCP_NODELAY an answer's second write (the body after the headers) waits for the
    forge's delayed ACK, up to 40 ms; asyncio sets it only when the socket names IPPROTO_TCP."""
    import socket

    from bot.web.serving import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    nodelay: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted = transport.get_extra_info("socket")
            nodelay.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(nodelay, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_reuse_port_sockets_share_a_port_and_plain_ones_do_not() -> None:
    """bench/intake.py's `--workers N` gives each server process its own listening socket on
    one port (SO_REUSEPORT) so that the kernel spreads connections over them; without the
    option a second bind on a port in use still fails (serve's clear "port in use" line)."""
    import errno

    from bot.web.serving import bind_socket

    first = bind_socket("127.0.0.1", 0, reuse_port=True)
    port = first.getsockname()[1]
    try:
        second = bind_socket("127.0.0.1", port, reuse_port=True)
        assert second.getsockname()[1] == port
        second.close()
        with pytest.raises(OSError) as refused:
            bind_socket("127.0.0.1", port).close()
        assert refused.value.errno == errno.EADDRINUSE
    finally:
        first.close()
