"""Console pages: server-rendered, sign-in by POST to a server-side session, and a click in headless
Chromium."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, update
from starlette.testclient import TestClient

from bot.domain.states import ProtocolStatus
from bot.storage.models import AuthSession
from bot.web.api.core import CONSOLE_COOKIE
from bot.web.app import create_app
from tests.api.seed import seed, sync_url
from tests.conftest import LiveServer, make_settings

TOKEN = "api-test-token-0123456789"
CHROMIUM = os.environ.get("DEKSDENFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_pages_render_and_need_login(tmp_path: Path, db_url: str) -> None:
    ids = seed(db_url)
    with TestClient(create_app(make_settings(tmp_path, db_url=db_url))) as c:
        assert c.get("/console").status_code == 401
        assert c.post("/console/login", data={"token": "wrong"}).status_code == 401
        assert c.get("/console?token=" + TOKEN).status_code == 400  # never a token in a URL
        assert c.get("/console").status_code == 401
        signed = c.post("/console/login", data={"token": TOKEN, "next": "/console"})
        assert signed.status_code == 200  # follows the 303, cookie set
        run = ids["runs"][0]
        pages = {
            "/console": ["acme/widgets", "0001-task-1"],
            f"/console/projects/{ids['project']}": ["gpt-5.5", "write-only"],
            "/console/protocols": ["0003-task-3"],
            "/console/protocols?status=running&offset=0": ["0002-task-2"],
            f"/console/protocols/{run}": ["step-1", "step-2", "Pause", "step 1 moved"],
            "/console/deliveries": ["issue_comment", "intents"],
            "/console/queue": ["Waiting"],
        }
        for path, needles in pages.items():
            page = c.get(path)
            assert page.status_code == 200, (path, page.text[:300])
            for needle in needles:
                assert needle in page.text, (path, needle)
        assert "s3cret-value" not in c.get(f"/console/projects/{ids['project']}").text
        assert c.get("/console/protocols/424242").status_code == 404
        assert c.get("/console/protocols/99999999999999").status_code == 404
        assert c.get("/console/protocols?status=zzz").status_code == 400
        assert c.get("/console/protocols?offset=-1").status_code == 400
        assert c.get("/console/deliveries?before=x").status_code == 400


def test_html_is_escaped(tmp_path: Path, sqlite_url: str) -> None:
    seed(sqlite_url, project="<script>alert(1)</script>")
    with TestClient(create_app(make_settings(tmp_path, db_url=sqlite_url, api_token=None))) as c:
        page = c.get("/console").text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;" in page


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_click_pause_in_headless_chromium(tmp_path: Path, sqlite_url: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    ids = seed(sqlite_url)
    run = ids["runs"][0]
    app = create_app(make_settings(tmp_path, db_url=sqlite_url))
    with LiveServer(app) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"{server.url}/console/protocols/{run}")
            page.fill("input[name=token]", TOKEN)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"{server.url}/console/protocols/{run}")
            assert "token=" not in page.url  # the token went in a POST body, never the address
            assert page.locator("#run-status").inner_text() == ProtocolStatus.RUNNING
            page.get_by_role("button", name="Pause").click()
            page.wait_for_function("document.getElementById('run-status').textContent === 'paused'")
            assert "pause" in page.locator("#flash").inner_text()
            # the live timeline picks the transition's event up by polling /api/events?after=
            page.wait_for_function(
                "document.getElementById('timeline').textContent.includes('paused by request')",
                timeout=10_000,
            )
            assert page.get_by_role("button", name="Resume").is_visible()
            shot = tmp_path / "console.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("DEKSDENFLOW_TEST_CONSOLE_PNG"):
                shutil.copy(shot, os.environ["DEKSDENFLOW_TEST_CONSOLE_PNG"])
            # a stale button answers 409 with the current status, shown to the operator
            pause = page.locator("div.actions button[data-action=pause]")
            pause.evaluate("b => { b.hidden = false; }")
            pause.click()
            page.wait_for_function("document.getElementById('flash').textContent.startsWith('409')")
            assert "now paused" in page.locator("#flash").inner_text()
        finally:
            browser.close()
        state: dict[str, Any] = httpx.get(
            f"{server.url}/api/protocols/{run}", headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()
    assert state["status"] == ProtocolStatus.PAUSED


def _sign_in(c: TestClient) -> str:
    signed = c.post("/console/login", data={"token": TOKEN}, follow_redirects=False)
    assert signed.status_code == 303
    cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=43200" in cookie
    assert TOKEN.lower() not in cookie
    value = c.cookies.get(CONSOLE_COOKIE)
    assert value
    return value


def test_session_expires(tmp_path: Path, db_url: str) -> None:
    with TestClient(create_app(make_settings(tmp_path, db_url=db_url))) as c:
        _sign_in(c)
        assert c.get("/console").status_code == 200
        engine = create_engine(sync_url(db_url))
        with engine.begin() as conn:
            conn.execute(
                update(AuthSession).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        engine.dispose()
        assert c.get("/console").status_code == 401
        assert c.get("/api/projects").status_code == 401


def test_sign_out_revokes_the_session(tmp_path: Path, db_url: str) -> None:
    with TestClient(create_app(make_settings(tmp_path, db_url=db_url))) as c:
        value = _sign_in(c)
        assert c.get("/api/projects").status_code == 200
        out = c.post("/console/logout", follow_redirects=False)
        assert out.status_code == 303 and CONSOLE_COOKIE in out.headers["set-cookie"]
        # a copy of the cookie kept elsewhere is worthless now: the session is gone server-side
        c.cookies.set(CONSOLE_COOKIE, value)
        assert c.get("/api/projects").status_code == 401
        assert c.get("/console").status_code == 401
        # the session value is random: a guessed or forged cookie never works
        c.cookies.set(CONSOLE_COOKIE, "x" * 43)
        assert c.get("/api/projects").status_code == 401


def test_console_cookie_is_secure_behind_https(tmp_path: Path, sqlite_url: str) -> None:
    app = create_app(make_settings(tmp_path, db_url=sqlite_url))
    with TestClient(app, base_url="https://bot.example") as c:
        signed = c.post("/console/login", data={"token": TOKEN}, follow_redirects=False)
        assert "secure" in signed.headers["set-cookie"].lower()
