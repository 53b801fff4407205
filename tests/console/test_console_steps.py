"""Console step pages, live streams, delivery details, redelivery, refused actions, `/`, 500s."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from bot.domain.states import ProtocolStatus, StepStatus
from bot.storage.models import WebhookDelivery
from bot.web.app import create_app
from bot.web.console_deliveries import safe_headers
from bot.web.console_steps import step_actions, valid_actions
from tests.api.seed import seed, sync_url
from tests.api.test_api_flow import bare_origin
from tests.conftest import make_settings

AUTH = {"Authorization": "Bearer api-test-token-0123456789"}


def wait(c: TestClient, run_id: int, ok: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        run: dict[str, Any] = c.get(f"/api/protocols/{run_id}", headers=AUTH).json()
        if ok(run):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.1)


def test_valid_actions_follow_the_state() -> None:
    step = {"status": StepStatus.PENDING}
    assert valid_actions({"status": ProtocolStatus.PENDING}, []) == ["start", "cancel"]
    planned = valid_actions({"status": ProtocolStatus.PLANNED, "approved": False}, [step])
    assert planned == ["approve", "run", "cancel", "open_pr"]
    running = {"status": ProtocolStatus.RUNNING, "approved": True, "pr_url": "u"}
    assert valid_actions(running, [{"status": StepStatus.RUNNING}, step]) == ["pause", "cancel"]
    assert valid_actions(running, [{"status": StepStatus.FAILED}]) == [
        "run",
        "rerun",
        "pause",
        "cancel",
    ]
    done = valid_actions(
        {"status": ProtocolStatus.COMPLETED, "pr_url": "u"}, [{"status": StepStatus.COMPLETED}]
    )
    assert done == []
    assert step_actions("completed", "completed") == []
    assert step_actions("running", "completed") == ["rerun", "run_qa"]
    assert step_actions("running", "needs_qa") == ["run_qa"]


def test_refused_rerun_changes_nothing(tmp_path: Path, sqlite_url: str) -> None:
    ids = seed(sqlite_url, runs=1, status=ProtocolStatus.COMPLETED)
    run = ids["runs"][0]
    with TestClient(create_app(make_settings(tmp_path, db_url=sqlite_url))) as c:
        before = c.get(f"/api/protocols/{run}", headers=AUTH).json()
        refused = c.post(f"/api/protocols/{run}/actions/rerun", headers=AUTH, json={"step": 1})
        assert refused.status_code == 409 and refused.json()["current"] == "completed"
        after = c.get(f"/api/protocols/{run}", headers=AUTH).json()
        assert [s["status"] for s in after["steps"]] == [s["status"] for s in before["steps"]]
        assert [s["retries"] for s in after["steps"]] == [s["retries"] for s in before["steps"]]
        c.post("/console/login", data={"token": "api-test-token-0123456789"})
        page = c.get(f"/console/protocols/{run}").text
        assert 'data-action="rerun" data-step' not in page  # no Rerun offered on a finished run


def test_step_page_shows_transcript_diff_and_cost(tmp_path: Path, sqlite_url: str) -> None:
    origin = bare_origin(tmp_path)
    with TestClient(create_app(make_settings(tmp_path, db_url=sqlite_url))) as c:
        project = c.post(
            "/api/projects",
            headers=AUTH,
            json={"name": "demo", "provider": "local", "git_url": str(origin)},
        ).json()
        run = c.post(
            "/api/protocols",
            headers=AUTH,
            json={"project_id": project["id"], "task": "Add a greeting"},
        ).json()
        wait(c, run["id"], lambda r: r["status"] == ProtocolStatus.PLANNED and r["pr_number"])
        assert (
            c.post(f"/api/protocols/{run['id']}/actions/approve", headers=AUTH).status_code == 202
        )
        assert c.post(f"/api/protocols/{run['id']}/actions/run", headers=AUTH).status_code == 202
        done = wait(c, run["id"], lambda r: r["steps"][0]["status"] == StepStatus.COMPLETED)
        assert done["cost_usd"] > 0 and done["steps"][0]["cost_usd"] > 0
        c.post("/console/login", data={"token": "api-test-token-0123456789"})
        page = c.get(f"/console/protocols/{run['id']}/steps/1")
        assert page.status_code == 200
        text = page.text
        for needle in ("$ git status --short", "exit 0", "add TASK.md", "Wrote TASK.md.",
                       'href="#file-1"', "TASK.md", "Quality report", "$0.00"):  # fmt: skip
            assert needle in text, needle
        assert 'class="add"' in text and "<span class=" in text  # coloured added lines
        # the stream of a finished step sends its items, its numbers, then ends
        stream = c.get(f"/console/protocols/{run['id']}/steps/1/stream?after=0")
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = stream.text
        assert body.count("event: item") >= 5 and "event: step" in body
        assert body.rstrip().endswith('data: {"status": "completed"}')
        step_id = done["steps"][0]["id"]
        api = c.get(f"/api/steps/{step_id}/transcript?limit=3", headers=AUTH).json()
        assert len(api["items"]) == 3 and api["items"][0]["kind"] == "turn"
        more = c.get(f"/api/steps/{step_id}/transcript?after={api['next_after']}", headers=AUTH)
        assert more.json()["items"][0]["id"] > api["next_after"]
        # the diff fragment the page loads when a running step completes
        assert "TASK.md" in c.get(f"/console/protocols/{run['id']}/steps/1/diff").text
        # the protocol page's stream: state with valid buttons and cost, then events
        assert c.get(f"/console/protocols/{run['id']}/steps/9").status_code == 404
        c.cookies.clear()
        assert c.get(f"/api/steps/{step_id}/transcript").status_code == 401
        assert c.get(f"/console/protocols/{run['id']}/stream").status_code == 401


def test_delivery_details_hide_secrets_and_redeliver(tmp_path: Path, sqlite_url: str) -> None:
    ids = seed(sqlite_url, runs=1)
    engine = create_engine(sync_url(sqlite_url))
    headers = {"x-github-event": "issue_comment", "x-hub-signature-256": "sha256=deadbeef",
               "x-gitlab-token": "glpat-secret", "user-agent": "GitHub-Hookshot/1"}  # fmt: skip
    with Session(engine) as session, session.begin():
        session.execute(update(WebhookDelivery).values(headers=headers))
    engine.dispose()
    assert safe_headers(headers) == {
        "user-agent": "GitHub-Hookshot/1",
        "x-github-event": "issue_comment",
    }
    app = create_app(make_settings(tmp_path, db_url=sqlite_url), embedded_worker=False)
    with TestClient(app) as c:
        c.post("/console/login", data={"token": "api-test-token-0123456789"})
        page = c.get(f"/console/deliveries/{ids['delivery']}").text
        assert "issue_comment" in page and "GitHub-Hookshot/1" in page and "Redeliver" in page
        assert "deadbeef" not in page and "glpat-secret" not in page and "2 hidden" in page
        assert f'href="/console/deliveries/{ids["delivery"]}"' in c.get("/console/deliveries").text
        # a cookie-authenticated POST needs the console header (CSRF), like the API's actions
        assert c.post(f"/api/deliveries/{ids['delivery']}/redeliver").status_code == 403
        again = c.post(f"/api/deliveries/{ids['delivery']}/redeliver",
                       headers={"x-deksdenflow-console": "1"})  # fmt: skip
        assert again.status_code == 202 and again.json()["status"] == StepStatus.PENDING
        one = c.get(f"/api/deliveries/{ids['delivery']}", headers=AUTH).json()
        assert one["status"] == StepStatus.PENDING
        assert c.post("/api/deliveries/424242/redeliver", headers=AUTH).status_code == 404


async def _boom(request: Request) -> Response:
    raise RuntimeError("a bug")


def test_root_favicon_and_a_styled_server_error(tmp_path: Path, sqlite_url: str) -> None:
    app = create_app(make_settings(tmp_path, db_url=sqlite_url))
    app.router.routes.append(Route("/console/boom", _boom))
    app.router.routes.append(Route("/api/boom", _boom))
    with TestClient(app, raise_server_exceptions=False) as c:
        root = c.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/console"
        icon = c.get("/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
        page = c.get("/console/boom")
        assert (
            page.status_code == 500 and "<h1>" in page.text and "Something went wrong" in page.text
        )
        assert "Traceback" not in page.text and "a bug" not in page.text
        assert c.get("/api/boom").json() == {"error": "internal server error"}


def test_huge_or_junk_ids_are_404_not_500(tmp_path: Path, sqlite_url: str) -> None:
    with TestClient(create_app(make_settings(tmp_path, db_url=sqlite_url))) as c:
        big = 10**15
        assert c.get(f"/api/steps/{big}/transcript", headers=AUTH).status_code == 404
        assert c.get("/api/steps/424242/transcript", headers=AUTH).status_code == 404
        assert c.post(f"/api/deliveries/{big}/redeliver", headers=AUTH).status_code == 404
        assert c.get(f"/console/protocols/{big}/stream", headers=AUTH).status_code == 404
        c.post("/console/login", data={"token": "api-test-token-0123456789"})
        assert c.get(f"/console/protocols/1/steps/{big}").status_code == 404
        assert c.get(f"/console/deliveries/{big}").status_code == 404
        assert c.get("/console/protocols/1/steps/1?before=x").status_code in (400, 404)
