"""Database faults (issue 20, point 14): a Postgres that hangs behind a TCP proxy, a SQLite file
locked by another process. Webhooks, the API, the console and the CI hook answer 503 with one
line within 5 s; /healthz stays 200; /readyz says the database cannot take writes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import make_url

from bot.web.app import create_app
from tests.conftest import LiveServer, _truncate_postgres, free_port, make_settings
from tests.intake.helpers import comment_body, github_headers

API_TOKEN = "api-test-token-0123456789"
CI_TOKEN = "ci-hook-token-0123456789"


class HangingProxy:
    """A TCP proxy to Postgres on 127.0.0.1 that can stop forwarding (the server "hangs")."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.flowing = asyncio.Event()  # cleared: the proxy holds every byte it reads
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.writers: list[asyncio.StreamWriter] = []

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()  # when hanging, neither side hears anything
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.append(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def hang(self, on: bool) -> None:
        self.loop.call_soon_threadsafe(self.flowing.clear if on else self.flowing.set)

    def __enter__(self) -> HangingProxy:
        self.flowing.set()
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", self.port), self.loop
        ).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.hang(False)

        def close_all() -> None:
            self.server.close()
            for w in self.writers:
                w.close()

        self.loop.call_soon_threadsafe(close_all)
        time.sleep(0.2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def everywhere(url: str) -> dict[str, httpx.Response | float]:
    """Each DB-backed entry point once, concurrently; answers plus the slowest time."""

    async def go() -> dict[str, httpx.Response | float]:
        body = comment_body("hello")
        ci = json.dumps({"status": "success", "branch": "0001-x"}).encode()
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            started = time.monotonic()

            async def timed(name: str, coro: object) -> tuple[str, httpx.Response, float]:
                answer = await coro  # type: ignore[misc]
                return name, answer, time.monotonic() - started

            console = httpx.AsyncClient(base_url=url, timeout=20, follow_redirects=True)
            try:
                results = await asyncio.gather(
                    timed(
                        "webhook",
                        http.post("/webhooks/github", content=body, headers=github_headers(body)),
                    ),
                    timed(
                        "api",
                        http.get("/api/projects", headers={"Authorization": f"Bearer {API_TOKEN}"}),
                    ),
                    timed("console", console.post("/console/login", data={"token": API_TOKEN})),
                    timed(
                        "ci",
                        http.post(
                            "/webhooks/ci", content=ci, headers={"X-DeksdenFlow-Token": CI_TOKEN}
                        ),
                    ),
                    timed("healthz", http.get("/healthz")),
                )
            finally:
                await console.aclose()
        out: dict[str, httpx.Response | float] = {name: answer for name, answer, _ in results}
        out["slowest"] = max(t for _, _, t in results)
        return out

    return asyncio.run(go())


def assert_503_one_line(answers: dict[str, httpx.Response | float]) -> None:
    for name in ("webhook", "api", "console", "ci"):
        answer = answers[name]
        assert isinstance(answer, httpx.Response)
        assert answer.status_code == 503, (name, answer.status_code, answer.text[:300])
        assert "\n" not in answer.text.strip(), (name, answer.text)
    healthz = answers["healthz"]
    assert isinstance(healthz, httpx.Response) and healthz.status_code == 200
    slowest = answers["slowest"]
    assert isinstance(slowest, float) and slowest < 5.0, slowest


@pytest.fixture
def proxied_postgres(postgres_url: str) -> Iterator[tuple[str, HangingProxy]]:
    _truncate_postgres(postgres_url)
    url = make_url(postgres_url)
    with HangingProxy(url.port or 5432) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        yield proxied.replace("postgresql+psycopg://", "postgresql://"), proxy


def test_hanging_postgres_gives_503_within_5s_everywhere(
    tmp_path: Path, proxied_postgres: tuple[str, HangingProxy], live_server: type[LiveServer]
) -> None:
    db_url, proxy = proxied_postgres
    settings = make_settings(tmp_path, db_url=db_url, webhook_token=CI_TOKEN)
    with live_server(create_app(settings)) as server:
        before = everywhere(server.url)
        assert isinstance(before["api"], httpx.Response) and before["api"].status_code == 200
        proxy.hang(True)
        assert_503_one_line(everywhere(server.url))
        assert_503_one_line(
            everywhere(server.url)
        )  # and again, with the pool's connections gone bad
        ready = httpx.get(server.url + "/readyz", timeout=20)
        assert ready.status_code == 503 and "database" in ready.json()["failing"]
        proxy.hang(False)
        time.sleep(0.5)
        after = everywhere(server.url)
        assert isinstance(after["api"], httpx.Response) and after["api"].status_code == 200


def test_locked_sqlite_gives_503_within_5s_and_readyz_says_so(
    tmp_path: Path, sqlite_url: str, live_server: type[LiveServer]
) -> None:
    settings = make_settings(tmp_path, db_url=sqlite_url, webhook_token=CI_TOKEN)
    with live_server(create_app(settings)) as server:
        assert httpx.get(server.url + "/readyz").status_code == 200
        # another process holds the write lock (WAL: readers still read, writers must wait)
        locker = sqlite3.connect(make_url(sqlite_url).database or "", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            body = comment_body("locked")
            project = json.dumps({"name": "acme/locked", "git_url": str(tmp_path / "locked-repo")})
            started = time.monotonic()
            webhook = httpx.post(
                server.url + "/webhooks/github",
                content=body,
                headers=github_headers(body),
                timeout=20,
            )
            webhook_s = time.monotonic() - started
            started = time.monotonic()
            api = httpx.post(
                server.url + "/api/projects",
                content=project,
                headers={
                    "Authorization": f"Bearer {API_TOKEN}",
                    "Content-Type": "application/json",
                },
                timeout=20,
            )
            api_s = time.monotonic() - started
            assert (webhook.status_code, api.status_code) == (503, 503), (webhook.text, api.text)
            assert webhook_s < 5 and api_s < 5, (webhook_s, api_s)
            assert "\n" not in api.text.strip() and "\n" not in webhook.text.strip()
            assert httpx.get(server.url + "/healthz").status_code == 200
            assert (
                httpx.get(
                    server.url + "/api/projects", headers={"Authorization": f"Bearer {API_TOKEN}"}
                ).status_code
                == 200
            )
            ready = httpx.get(server.url + "/readyz", timeout=20)
            assert ready.status_code == 503 and "locked" in ready.json()["failing"]["database"]
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert httpx.get(server.url + "/readyz").status_code == 200


def test_readyz_reports_a_full_disk(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.testclient import TestClient

    from bot.storage import health

    settings = make_settings(tmp_path, db_url=sqlite_url)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        monkeypatch.setattr(
            health, "free_bytes", lambda path: 1024
        )  # the file system, not our code
        ready = client.get("/readyz")
    assert ready.status_code == 503 and "disk" in ready.json()["failing"]
