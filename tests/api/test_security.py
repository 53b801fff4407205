"""Issue #20 (security): loopback trust, project-token reach, git_url/base_branch at the door."""

from __future__ import annotations

import asyncio
import http.server
import json
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text
from starlette.testclient import TestClient

from bot.cli.main import main
from bot.core.errors import ConfigError
from bot.domain.security import git_url_problem, ref_name_problem, token_problem
from bot.forge.kinds import GITHUB, GITLAB, LOCAL
from bot.storage.secretbox import key_from, unseal
from bot.web.app import create_app
from bot.web.serving import uvicorn_options
from tests.api.seed import seed, sync_url
from tests.conftest import free_port, make_settings

TOKEN = "api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FORGED = [
    {"X-Forwarded-For": "127.0.0.1"},
    {"Forwarded": "for=127.0.0.1;proto=http"},
    {"X-Real-IP": "127.0.0.1"},
]


class TcpProxy:
    """A plain asyncio TCP relay on 127.0.0.1: every request reaches the server from loopback."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def __enter__(self) -> TcpProxy:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self.loop
        ).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Served:
    """The app under uvicorn with the options `deksdenflow serve` passes (trusted proxies too)."""

    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        config = uvicorn.Config(app, **options, lifespan="on", loop="asyncio", http="h11")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.mark.parametrize("trusted", ["", "127.0.0.1"])
def test_forged_forwarding_headers_through_a_local_proxy(
    tmp_path: Path, db_url: str, trusted: str
) -> None:
    settings = make_settings(tmp_path, db_url=db_url, api_token=None, trusted_proxies=trusted)
    port = free_port()
    options = uvicorn_options(settings, "127.0.0.1", port)
    with Served(create_app(settings, bind_host="127.0.0.1"), options), TcpProxy(port) as proxy:
        # a direct loopback caller is trusted without a token
        assert httpx.get(f"http://127.0.0.1:{port}/api/projects").status_code == 200
        for headers in FORGED:
            answer = httpx.post(
                f"http://127.0.0.1:{proxy.port}/api/projects",
                headers=headers,
                json={"name": "evil", "git_url": "/tmp/evil.git"},
            )
            assert answer.status_code == 401, (headers, answer.text)
        listed = httpx.get(f"http://127.0.0.1:{port}/api/projects").json()
        assert listed["items"] == []


def test_no_token_and_bound_beyond_loopback_closes_the_api(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, db_url=sqlite_url, api_token=None)
    with TestClient(create_app(settings, bind_host="0.0.0.0"), client=("127.0.0.1", 5000)) as c:
        assert c.get("/api/projects").status_code == 401
        assert c.get("/healthz").status_code == 200


def test_serve_options_trust_no_proxy_by_default(tmp_path: Path) -> None:
    options = uvicorn_options(make_settings(tmp_path), "0.0.0.0", 8000)
    assert options["proxy_headers"] is False and options["forwarded_allow_ips"] == ""
    trusted = uvicorn_options(make_settings(tmp_path, trusted_proxies="10.0.0.2"), "0.0.0.0", 8000)
    assert trusted["proxy_headers"] is True and trusted["forwarded_allow_ips"] == "10.0.0.2"


@pytest.fixture
def client(tmp_path: Path, db_url: str) -> Iterator[tuple[TestClient, dict[str, Any]]]:
    ids = seed(db_url)
    with TestClient(create_app(make_settings(tmp_path, db_url=db_url))) as c:
        yield c, ids


def test_project_token_cannot_change_what_belongs_to_the_operator(
    client: tuple[TestClient, dict[str, Any]],
) -> None:
    c, ids = client
    pid = ids["project"]
    token = c.post(f"/api/projects/{pid}/token", headers=AUTH).json()["token"]
    pt = {"X-Project-Token": token}
    before = c.get(f"/api/projects/{pid}", headers=AUTH).json()
    for change in (
        {"git_url": "/tmp/other.git"},
        {"secrets": {"token": "mine"}},
        {"secrets": {"token": None}},
        {"config": {"permissions": {"plan": "none"}}},
        {"config": {"allow_fork_commands": True}},
        {"base_branch": "attacker"},
        {"name": "renamed"},
        {"enabled": False},
    ):
        answer = c.patch(f"/api/projects/{pid}", headers=pt, json=change)
        assert answer.status_code == 403, (change, answer.text)
    assert c.get(f"/api/projects/{pid}", headers=AUTH).json() == before
    # what it may do: read its project, tune its models, drive its runs
    assert (
        c.patch(
            f"/api/projects/{pid}", headers=pt, json={"default_models": {"exec": "m2"}}
        ).status_code
        == 200
    )
    assert c.post(f"/api/protocols/{ids['runs'][0]}/actions/pause", headers=pt).status_code == 202
    # the operator may change them all
    assert (
        c.patch(
            f"/api/projects/{pid}",
            headers=AUTH,
            json={"config": {"permissions": {"plan": "write"}}},
        ).status_code
        == 200
    )


@pytest.fixture
def listener() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that records every request it gets."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_foreign_git_url_is_refused_without_a_request(
    client: tuple[TestClient, dict[str, Any]], listener: tuple[str, list[str]]
) -> None:
    c, ids = client
    host, seen = listener
    for provider, url in (
        ("github", f"http://{host}/o/r.git"),
        ("github", f"https://{host}/o/r.git"),
        ("github", "file:///srv/other.git"),
        ("github", "https://10.0.0.7/o/r.git"),
        ("github", "https://github.com.evil.example/o/r.git"),
        ("github", "https://x-access-token:t@github.com/o/r.git"),
        ("gitlab", f"http://{host}/g/r.git"),
        ("local", "file:///srv/other.git"),
        ("local", f"http://{host}/o/r.git"),
    ):
        made = c.post(
            "/api/projects",
            headers=AUTH,
            json={"name": f"p-{len(url)}-{provider}", "provider": provider, "git_url": url},
        )
        assert made.status_code == 422, (provider, url, made.text)
    patched = c.patch(
        f"/api/projects/{ids['project']}", headers=AUTH, json={"git_url": f"http://{host}/o/r.git"}
    )
    assert patched.status_code == 422
    time.sleep(0.2)
    assert seen == []
    # on the right host, but the forge cannot vouch for it (no App here): refused too
    unchecked = c.post(
        "/api/projects",
        headers=AUTH,
        json={"name": "o/r", "provider": "github", "git_url": "https://github.com/o/r.git"},
    )
    assert unchecked.status_code == 422 and "cannot be checked" in unchecked.text


def test_option_like_base_branch_and_ext_url_are_refused(
    client: tuple[TestClient, dict[str, Any]],
) -> None:
    c, ids = client
    bad_branch = c.post(
        "/api/projects",
        headers=AUTH,
        json={
            "name": "x",
            "git_url": "/tmp/x.git",
            "base_branch": "--upload-pack=touch /tmp/pwned",
        },
    )
    assert bad_branch.status_code == 422 and "base_branch" in bad_branch.text
    bad_url = c.post(
        "/api/projects", headers=AUTH, json={"name": "y", "git_url": "ext::sh -c touch% /tmp/pwned"}
    )
    assert bad_url.status_code == 422 and "git_url" in bad_url.text
    assert (
        c.patch(
            f"/api/projects/{ids['project']}", headers=AUTH, json={"base_branch": "a..b"}
        ).status_code
        == 422
    )
    assert (
        c.patch(
            f"/api/projects/{ids['project']}", headers=AUTH, json={"base_branch": "release/2.0"}
        ).status_code
        == 200
    )


def test_git_failure_answers_without_internals(client: tuple[TestClient, dict[str, Any]]) -> None:
    c, ids = client
    answer = c.post(
        "/api/protocols", headers=AUTH, json={"project_id": ids["project"], "task": "do it"}
    )
    assert answer.status_code == 502
    body = answer.json()
    assert set(body) == {"error", "error_id"} and "\n" not in body["error"]
    assert "/nonexistent" not in answer.text and "git" not in body["error"].split()[0:1]
    assert "fetch" not in answer.text and "/tmp" not in answer.text
    # every error answer carries an id to find its details in the log
    for wrong in (
        c.get("/api/protocols/424242", headers=AUTH),
        c.post("/api/projects", headers=AUTH, json={"name": "x"}),
        c.get("/api/events?after=1&before=2", headers=AUTH),
    ):
        assert wrong.status_code in (400, 404, 422) and len(wrong.json()["error_id"]) == 12


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("main", True),
        ("release/2.0", True),
        ("feat-x_1", True),
        ("-x", False),
        ("--upload-pack=x", False),
        ("a..b", False),
        ("a b", False),
        ("a~1", False),
        ("a^", False),
        ("a:b", False),
        ("a?", False),
        ("a*", False),
        ("a[", False),
        ("a\\b", False),
        ("a@{1}", False),
        ("@", False),
        ("HEAD", False),
        ("/a", False),
        ("a/", False),
        ("a//b", False),
        ("a.", False),
        (".a", False),
        ("a/.b", False),
        ("a.lock", False),
        ("a/b.lock/c", False),
        ("a\x7f", False),
        ("", False),
    ],
)
def test_ref_name_rules(name: str, ok: bool) -> None:
    assert (ref_name_problem(name) is None) is ok


def test_git_url_rules() -> None:
    gh, gl = "https://github.com", "https://gitlab.example/sub"
    github, gitlab, local = GITHUB.repo_url, GITLAB.repo_url, LOCAL.repo_url
    assert git_url_problem("https://github.com/o/r.git", github, gh) is None
    assert git_url_problem("https://github.com/o/r", github, gh) is None
    assert git_url_problem("https://github.com/o/r/x.git", github, gh) is not None
    assert git_url_problem("https://github.com:8443/o/r.git", github, gh) is not None
    assert git_url_problem("https://github.com/o/r.git?x=1", github, gh) is not None
    assert git_url_problem("https://gitlab.example/sub/g/s/r.git", gitlab, gl) is None
    assert git_url_problem("https://gitlab.example/g/r.git", gitlab, gl) is not None
    assert git_url_problem("/srv/repos/r.git", local, None) is None
    assert git_url_problem("host:path/r.git", local, None) is not None
    assert git_url_problem("-u", local, None) is not None
    assert git_url_problem("https://gitlab.example/sub/g/r.git", gitlab, None) == (
        "no gitlab host is configured"
    )


def test_short_tokens_only_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert token_problem("short-token", "127.0.0.1") is None
    assert token_problem("short-token", "localhost") is None
    assert token_problem("short-token", "0.0.0.0") is not None
    assert token_problem("x" * 32, "0.0.0.0") is None
    assert token_problem(None, "0.0.0.0") is None
    monkeypatch.setenv("DEKSDENFLOW_API_TOKEN", "five5")
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2  # refused before binding


def test_project_secrets_are_sealed_at_rest(tmp_path: Path, db_url: str) -> None:
    key = Fernet.generate_key()
    settings = make_settings(tmp_path, db_url=db_url, secret_key=key.decode())
    with TestClient(create_app(settings)) as c:
        made = c.post(
            "/api/projects",
            headers=AUTH,
            json={"name": "s/s", "git_url": "/tmp/s.git", "secrets": {"k": "v-123456"}},
        )
        assert made.status_code == 201
        pid = made.json()["id"]
        assert (
            c.patch(
                f"/api/projects/{pid}", headers=AUTH, json={"secrets": {"k2": "w-654321"}}
            ).status_code
            == 200
        )
    engine = create_engine(sync_url(db_url))
    with engine.connect() as conn:
        raw = conn.execute(text("SELECT secrets FROM projects WHERE id = :i"), {"i": pid}).scalar()
    engine.dispose()
    assert raw is not None
    stored: dict[str, str] = json.loads(raw) if isinstance(raw, str) else raw
    assert set(stored) == {"k", "k2"}
    assert "v-123456" not in json.dumps(stored) and "w-654321" not in json.dumps(stored)
    assert (
        unseal(Fernet(key), stored["k"]) == "v-123456"
        and unseal(Fernet(key), stored["k2"]) == "w-654321"
    )
    assert not (
        settings.data_dir / "secret.key"
    ).exists()  # the configured key is used, none generated


def test_generated_key_and_sqlite_file_are_private(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)  # SQLite in the data dir, no SECRET_KEY
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
    assert stat.S_IMODE(settings.sqlite_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.data_dir.stat().st_mode) == 0o700
    first = key_from(settings)
    assert stat.S_IMODE((settings.data_dir / "secret.key").stat().st_mode) == 0o600
    assert key_from(settings) == first  # made once, then read by every process
    with pytest.raises(ConfigError):
        key_from(make_settings(tmp_path, secret_key="not-a-fernet-key"))


def test_serve_without_token_says_so_and_keeps_its_files_private(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")}
    env.update(DEKSDENFLOW_DATA_DIR=str(data), DEKSDENFLOW_ENGINE="scripted")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/api/projects").status_code == 200
        forged = httpx.get(
            f"http://127.0.0.1:{port}/api/projects", headers={"X-Forwarded-For": "127.0.0.1"}
        )
        assert forged.status_code == 401
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "answer loopback callers only" in err
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "deksdenflow.sqlite3").stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "secret.key").stat().st_mode) == 0o600


def test_workers_read_the_app_the_api_stored(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Compose: the API and each worker have their own data dir but one database and one key."""
    from bot.jobs.services import build_services, close_services
    from bot.storage.app_credentials import store_credentials
    from bot.storage.db import database_from_settings

    key = Fernet.generate_key().decode()
    api = make_settings(tmp_path / "api", db_url=db_url, secret_key=key)
    worker = make_settings(tmp_path / "worker", db_url=db_url, secret_key=key)
    stranger = make_settings(
        tmp_path / "stranger", db_url=db_url, secret_key=Fernet.generate_key().decode()
    )

    async def run() -> list[Any]:
        db = database_from_settings(api)
        try:
            # a worker started before the App existed picks it up when it re-reads
            early: dict[str, Any] = {"settings": worker, "db": db, "engines": object()}
            await build_services(early)
            assert early["forges"].stored_app is None
            await store_credentials(
                api, db, {"id": 77, "slug": "df", "pem": "PEM", "webhook_secret": "w"}
            )
            await early["forges"].load_stored_app()
            seen = [early["forges"].stored_app]
            await close_services(early)
            for settings in (worker, stranger):
                ctx: dict[str, Any] = {"settings": settings, "db": db, "engines": object()}
                await build_services(ctx)
                seen.append(ctx["forges"].stored_app)
                await close_services(ctx)
            return seen
        finally:
            await db.dispose()

    with caplog.at_level("ERROR"):
        by_early, by_worker, by_stranger = asyncio.run(run())
    assert by_early == by_worker
    assert by_worker is not None and by_worker["id"] == 77 and by_worker["pem"] == "PEM"
    assert by_stranger is None and "DEKSDENFLOW_SECRET_KEY" in caplog.text


def test_setup_callback_needs_the_pages_one_time_state(tmp_path: Path, db_url: str) -> None:
    import respx

    settings = make_settings(tmp_path, db_url=db_url)
    conversion = {"id": 9, "slug": "df", "pem": "PEM", "webhook_secret": "new-secret-0123456789"}
    with (
        respx.mock(base_url="https://api.github.com", assert_all_called=False) as gh,
        TestClient(create_app(settings)) as c,
    ):
        route = gh.post("/app-manifests/abc/conversions").respond(201, json=conversion)
        for query in ("?code=abc", "?code=abc&state=made-up", "?code=abc&state="):
            assert c.get("/github/setup/callback" + query).status_code == 403
        assert route.call_count == 0
        assert c.get("/github/setup").status_code == 401  # the page needs the operator
        page = c.get("/github/setup", headers=AUTH)
        assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
        state = page.text.split("?state=", 1)[1].split('"', 1)[0]
        assert c.get(f"/github/setup/callback?code=abc&state={state}").status_code == 200
        assert c.get(f"/github/setup/callback?code=abc&state={state}").status_code == 403  # spent
        assert route.call_count == 1
    engine = create_engine(sync_url(db_url))
    with engine.connect() as conn:
        rows = list(conn.execute(text("SELECT name, value FROM stored_secrets")))
    engine.dispose()
    assert [r[0] for r in rows] == ["github_app"] and "new-secret" not in rows[0][1]
