"""A real browser watches a step: transcript lines arrive while it runs, the diff when it is done.

Chromium through Playwright against uvicorn; the scripted engine paces its events so the step
takes a few seconds. With DEKSDENFLOW_TEST_SCREENSHOTS=<dir> the protocol, step and deliveries
pages are saved there as PNGs (docs/ holds the ones committed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bot.domain.states import ProtocolStatus, StepStatus
from bot.web.app import create_app
from engines.scripted import DEFAULT_SCRIPT_PATH
from tests.api.test_api_flow import bare_origin
from tests.conftest import GITHUB_SECRET, LiveServer, make_settings
from tests.console.test_console import CHROMIUM, CHROMIUM_ARGS

TOKEN = "api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PACE_S = 0.6


def paced_script(path: Path) -> Path:
    """The default script, its execute turns paced so one step takes a few seconds."""
    script: dict[str, Any] = yaml.safe_load(DEFAULT_SCRIPT_PATH.read_text())
    script["execute"]["default"]["pace_s"] = PACE_S
    for step in script["execute"]["steps"].values():
        step["pace_s"] = PACE_S
    path.write_text(yaml.safe_dump(script))
    return path


def wait_for(fetch: Any, ok: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value):
            return value
        assert time.monotonic() < deadline, value
        time.sleep(0.1)


SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "github"


def deliver(url: str, case: str) -> None:
    """A recorded GitHub delivery (tests/samples), signed with the test secret."""
    body = (SAMPLES / case / "body").read_bytes()
    headers = json.loads((SAMPLES / case / "headers.json").read_text())
    headers["X-Hub-Signature-256"] = (
        "sha256=" + hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    )
    assert httpx.post(f"{url}/webhooks/github", content=body, headers=headers).status_code < 300


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_step_page_streams_the_transcript_then_shows_the_diff(
    tmp_path: Path, sqlite_url: str
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    origin = bare_origin(tmp_path)
    settings = make_settings(
        tmp_path,
        db_url=sqlite_url,
        scripted_script=paced_script(tmp_path / "paced.yml"),
        # the recorded deliveries name a repository no one installed: nothing may leave 127.0.0.1
        github_api_url="http://127.0.0.1:9",
    )
    shots = tmp_path / "shots"
    shots.mkdir()
    with LiveServer(create_app(settings)) as server, sync_api.sync_playwright() as pw:
        api = httpx.Client(base_url=server.url, headers=AUTH, timeout=30)
        project = api.post("/api/projects", json={"name": "acme/widgets", "provider": "local",
                                                  "git_url": str(origin)}).json()  # fmt: skip
        run = api.post("/api/protocols", json={"project_id": project["id"],
                                               "task": "Add a greeting module"}).json()  # fmt: skip
        run_id = run["id"]
        wait_for(lambda: api.get(f"/api/protocols/{run_id}").json(),
                 lambda r: r["status"] == ProtocolStatus.PLANNED and r["pr_number"])  # fmt: skip
        for case in ("issues_opened", "issue_comment_created", "pull_request_opened"):
            deliver(server.url, case)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            step_url = f"{server.url}/console/protocols/{run_id}/steps/2"
            page.goto(step_url)
            page.fill("input[name=token]", TOKEN)  # sign in by POST, never a token in the URL
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(step_url)
            assert page.locator("#step-status").inner_text() == StepStatus.PENDING
            page.evaluate("window.__sameDocument = true")  # survives only without a reload
            assert api.post(f"/api/protocols/{run_id}/actions/approve").status_code == 202
            ran = api.post(f"/api/protocols/{run_id}/actions/run", json={"step": 2})
            assert ran.status_code == 202, ran.text
            # transcript lines arrive while the step is still running
            page.wait_for_selector("#transcript li.kind-row-reasoning", timeout=20_000)
            assert page.locator("#step-status").inner_text() == StepStatus.RUNNING
            assert page.locator("#live-note").inner_text() == "live"
            assert page.locator(".file").count() == 0  # no diff before the commit
            page.wait_for_selector("#transcript li.kind-row-command .exit-ok", timeout=20_000)
            # then the commit: the diff appears, coloured, without a reload
            page.wait_for_selector("#diff .file table.diff span", timeout=30_000)
            assert page.evaluate("window.__sameDocument") is True
            files = page.locator("#diff .files").inner_text()
            assert "demo_greeting.py" in files and "test_demo_greeting.py" in files
            texts = page.locator("#transcript").inner_text()
            assert "Hello, world!" in texts and "Added demo_greeting.py" in texts
            page.wait_for_function(
                "document.getElementById('live-note').textContent === 'finished'", timeout=30_000
            )
            page.wait_for_selector("#qa-panel:not([hidden])", timeout=30_000)
            page.screenshot(path=str(shots / "console-step.png"), full_page=True)

            # the protocol page follows the run live: step 1 runs while we watch
            page.goto(f"{server.url}/console/protocols/{run_id}")
            page.evaluate("window.__sameDocument = true")
            assert (
                api.post(f"/api/protocols/{run_id}/actions/run", json={"step": 1}).status_code
                == 202
            )
            page.wait_for_function(
                "document.querySelector('#steps tr[data-step=\"1\"] .status').textContent"
                " === 'completed'",
                timeout=30_000,
            )
            assert page.evaluate("window.__sameDocument") is True
            # the run's status is its own update, a moment after the step's: waited for, still
            # without a reload
            page.wait_for_function(
                "document.getElementById('run-status').textContent.trim() === 'completed'",
                timeout=30_000,
            )
            assert page.evaluate("window.__sameDocument") is True
            assert not page.get_by_role("button", name="Pause").is_visible()
            assert page.locator("#steps button").count() == 0  # nothing to rerun on a finished run
            assert page.locator('[data-run="cost"]').inner_text().startswith("$")
            page.screenshot(path=str(shots / "console-protocol.png"), full_page=True)

            deliveries = api.get("/api/deliveries").json()["items"]
            page.set_viewport_size({"width": 1280, "height": 480})
            page.goto(f"{server.url}/console/deliveries")
            page.screenshot(path=str(shots / "console-deliveries.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 760})
            page.goto(f"{server.url}/console/deliveries/{deliveries[0]['id']}")
            assert "github" in page.locator("h1").inner_text()
            page.screenshot(path=str(shots / "console-delivery.png"), full_page=True)
        finally:
            browser.close()
            api.close()
    for shot in shots.iterdir():
        assert shot.stat().st_size > 10_000
    target = os.environ.get("DEKSDENFLOW_TEST_SCREENSHOTS")
    if target:
        for shot in shots.iterdir():
            shutil.copy(shot, Path(target) / shot.name)
