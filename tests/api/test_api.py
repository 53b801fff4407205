"""REST API: auth, project tokens, CRUD, filters, cursors, actions, queues, OpenAPI, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from bot.domain.states import ProtocolStatus
from bot.jobs.common import JOB_METRICS_KEY
from bot.web.api.table import OPERATIONS, api_routes, build_openapi
from bot.web.app import create_app
from tests.api.seed import seed
from tests.conftest import make_settings

TOKEN = "api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path: Path, db_url: str) -> Iterator[tuple[TestClient, dict[str, Any]]]:
    ids = seed(db_url)
    with TestClient(create_app(make_settings(tmp_path, db_url=db_url))) as c:
        yield c, ids


def test_openapi_describes_every_route() -> None:
    routes = {
        (method.lower(), str(getattr(route, "path", "")).replace(":int", ""))
        for route in api_routes()
        for method in (getattr(route, "methods", None) or ["GET"])
        if method != "HEAD"
    }
    doc = build_openapi()
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes - {("get", "/api/openapi.json")} == described
    assert {(op.method, op.path) for op in OPERATIONS} == described


def test_openapi_served_without_token(tmp_path: Path, sqlite_url: str) -> None:
    with TestClient(create_app(make_settings(tmp_path, db_url=sqlite_url))) as c:
        doc = c.get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "ProjectCreate" in doc["components"]["schemas"]
    assert "post" in doc["paths"]["/api/protocols/{run_id}/actions/{action}"]


def test_token_required(client: tuple[TestClient, dict[str, Any]]) -> None:
    c, _ = client
    assert c.get("/api/projects").status_code == 401
    assert c.get("/api/projects", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/api/projects", headers=AUTH).status_code == 200


def test_no_token_means_loopback_only(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, db_url=sqlite_url, api_token=None)
    with TestClient(create_app(settings)) as c:
        assert c.get("/api/projects").status_code == 200
    with TestClient(create_app(settings), client=("203.0.113.9", 5000)) as c:
        assert c.get("/api/projects").status_code == 401


def test_projects_crud_and_write_only_secrets(client: tuple[TestClient, dict[str, Any]]) -> None:
    c, _ = client
    made = c.post(
        "/api/projects",
        headers=AUTH,
        json={
            "name": "new/one",
            "git_url": "/tmp/x.git",
            "default_models": {"exec": "m1"},
            "secrets": {"k": "v-123"},
        },
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["default_models"] == {"exec": "m1"}
    assert body["secret_names"] == ["k"]
    assert "v-123" not in made.text
    pid = body["id"]
    got = c.get(f"/api/projects/{pid}", headers=AUTH)
    assert got.status_code == 200 and "v-123" not in got.text
    patched = c.patch(
        f"/api/projects/{pid}",
        headers=AUTH,
        json={"base_branch": "dev", "secrets": {"k": None, "k2": "zz-9"}},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["base_branch"] == "dev"
    assert patched.json()["secret_names"] == ["k2"]
    assert "zz-9" not in c.get("/api/projects", headers=AUTH).text
    disabled = c.post(f"/api/projects/{pid}/disable", headers=AUTH)
    assert disabled.json()["enabled"] is False
    # a disabled project starts no run
    started = c.post("/api/protocols", headers=AUTH, json={"project_id": pid, "task": "x"})
    assert started.status_code == 409 and started.json()["current"] == "disabled"
    dup = c.post("/api/projects", headers=AUTH, json={"name": "new/one", "git_url": "/x"})
    assert dup.status_code == 409


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/api/projects", None, 400),
        ("post", "/api/projects", "{not json", 400),
        ("post", "/api/projects", [1, 2], 422),
        ("post", "/api/projects", {"name": ""}, 422),
        ("post", "/api/projects", {"name": "x", "git_url": "/x", "provider": "svn"}, 422),
        ("post", "/api/projects", {"name": "x", "git_url": "/x", "bogus": 1}, 422),
        ("post", "/api/projects", {"name": "x", "git_url": "/x", "secrets": {"a": 1}}, 422),
        ("patch", "/api/projects/{project}", {"enabled": "maybe"}, 422),
        ("patch", "/api/projects/{project}", {"name": None}, 400),
        ("patch", "/api/projects/999999", {"base_branch": "x"}, 404),
        ("patch", "/api/projects/99999999999999", {"base_branch": "x"}, 404),
        ("get", "/api/projects/99999999999999999999", None, 404),
        ("post", "/api/projects/424242/disable", None, 404),
        ("post", "/api/projects/424242/token", None, 404),
        ("post", "/api/protocols", {"project_id": "one", "task": "t"}, 422),
        ("post", "/api/protocols", {"project_id": 1}, 422),
        ("post", "/api/protocols", {"project_id": 424242, "task": "t"}, 404),
        ("post", "/api/protocols", {"project_id": 2**40, "task": "t"}, 422),
        ("get", "/api/protocols?limit=-1", None, 400),
        ("get", "/api/protocols?offset=abc", None, 400),
        ("get", "/api/protocols?status=weird", None, 400),
        ("get", "/api/protocols?project_id=99999999999999999999999", None, 400),
        ("get", "/api/protocols/424242", None, 404),
        ("get", "/api/protocols/424242/steps", None, 404),
        ("get", "/api/steps/424242", None, 404),
        ("get", "/api/steps/abc", None, 404),
        ("post", "/api/protocols/424242/actions/pause", None, 404),
        ("post", "/api/protocols/{run}/actions/explode", None, 404),
        ("post", "/api/protocols/{run}/actions/run", {"step": "x"}, 422),
        ("post", "/api/protocols/{run}/actions/run", "[]", 422),
        ("post", "/api/protocols/{run}/actions/run?step=-2", None, 400),
        ("post", "/api/protocols/{run}/actions/rerun", {"step": 77}, 404),
        ("get", "/api/events?after=x", None, 400),
        ("get", "/api/events?after=1&before=5", None, 400),
        ("get", "/api/events?protocol_run_id=1.5", None, 400),
        ("get", "/api/events?type=" + "x" * 65, None, 400),
        ("get", "/api/events?step_run_id=99999999999999999999", None, 400),
        ("get", "/api/deliveries?status=nope", None, 400),
        ("get", "/api/deliveries?provider=svn", None, 400),
        ("get", "/api/deliveries?before=%00", None, 400),
        ("get", "/api/deliveries/99999999999", None, 404),
        ("put", "/api/projects", {}, 405),
        ("delete", "/api/protocols/1", None, 405),
    ],
)
def test_bad_input_is_4xx_with_a_reason(
    client: tuple[TestClient, dict[str, Any]], method: str, path: str, body: Any, status: int
) -> None:
    c, ids = client
    path = path.format(project=ids["project"], run=ids["runs"][0])
    kwargs: dict[str, Any] = {"headers": {**AUTH, "Content-Type": "application/json"}}
    if isinstance(body, str):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body
    resp = c.request(method.upper(), path, **kwargs)
    assert resp.status_code == status, resp.text
    if status in (400, 409, 422) or "explode" in path:
        assert resp.json()["error"]
    if status == 422:
        assert resp.json()["detail"][0]["msg"]


def test_protocols_list_filters_and_pages(client: tuple[TestClient, dict[str, Any]]) -> None:
    c, ids = client
    other = seed(
        str(c.app.state.df.settings.db_url),  # type: ignore[attr-defined]
        project="other/repo",
        runs=2,
        status=ProtocolStatus.PAUSED,
    )
    page = c.get("/api/protocols?limit=2", headers=AUTH).json()
    assert page["total"] == 5 and len(page["items"]) == 2
    assert page["items"][0]["id"] > page["items"][1]["id"]
    rest = c.get("/api/protocols?limit=2&offset=4", headers=AUTH).json()
    assert len(rest["items"]) == 1
    mine = c.get(f"/api/protocols?project_id={ids['project']}", headers=AUTH).json()
    assert {r["id"] for r in mine["items"]} == set(ids["runs"])
    paused = c.get("/api/protocols?status=paused", headers=AUTH).json()
    assert {r["id"] for r in paused["items"]} == set(other["runs"])
    one = c.get(f"/api/protocols/{ids['runs'][0]}", headers=AUTH).json()
    assert [s["step_index"] for s in one["steps"]] == [1, 2]
    assert one["ci_attempts"] == 1
    steps = c.get(f"/api/protocols/{ids['runs'][0]}/steps", headers=AUTH).json()["items"]
    step = c.get(f"/api/steps/{steps[0]['id']}", headers=AUTH).json()
    assert step["project_id"] == ids["project"] and step["qa_verdict"] in ("PASS", "FAIL")


def test_events_cursor_and_filters(client: tuple[TestClient, dict[str, Any]]) -> None:
    c, ids = client
    newest = c.get("/api/events?limit=2", headers=AUTH).json()
    assert len(newest["items"]) == 2 and newest["next_before"] is not None
    older = c.get(f"/api/events?limit=2&before={newest['next_before']}", headers=AUTH).json()
    assert max(e["id"] for e in older["items"]) < newest["next_before"]
    run = ids["runs"][1]
    tail = c.get(f"/api/events?protocol_run_id={run}&after=0", headers=AUTH).json()
    assert {e["protocol_run_id"] for e in tail["items"]} == {run}
    assert [e["id"] for e in tail["items"]] == sorted(e["id"] for e in tail["items"])
    again = c.get(
        f"/api/events?protocol_run_id={run}&after={tail['next_after']}", headers=AUTH
    ).json()
    assert again["items"] == [] and again["next_after"] == tail["next_after"]
    typed = c.get("/api/events?type=protocol.created", headers=AUTH).json()["items"]
    assert typed and {e["event_type"] for e in typed} == {"protocol.created"}
    by_step = c.get(f"/api/events?step_run_id={ids['steps'][0]}", headers=AUTH).json()["items"]
    assert [e["step_run_id"] for e in by_step] == [ids["steps"][0]]
    by_project = c.get(f"/api/events?project_id={ids['project']}&limit=500", headers=AUTH).json()[
        "items"
    ]
    assert len(by_project) == 9


def test_deliveries_with_outcome(client: tuple[TestClient, dict[str, Any]]) -> None:
    c, ids = client
    items = c.get("/api/deliveries?status=processed&provider=github", headers=AUTH).json()["items"]
    assert items[0]["outcome"] == {"intents": ["plan"]}
    one = c.get(f"/api/deliveries/{ids['delivery']}", headers=AUTH).json()
    assert one["payload_bytes"] == 2 and "payload" not in one


@pytest.fixture
def client_without_worker(
    tmp_path: Path, db_url: str
) -> Iterator[tuple[TestClient, dict[str, Any]]]:
    """No embedded worker: jobs an action enqueues stay queued, so statuses change only by
    request."""
    ids = seed(db_url)
    with TestClient(create_app(make_settings(tmp_path, db_url=db_url), embedded_worker=False)) as c:
        yield c, ids


def test_actions_are_guarded_transitions(
    client_without_worker: tuple[TestClient, dict[str, Any]],
) -> None:
    # with a worker, the step job `run` enqueues could finish the protocol before `cancel`
    c, ids = client_without_worker
    run = ids["runs"][0]
    paused = c.post(f"/api/protocols/{run}/actions/pause", headers=AUTH)
    assert paused.status_code == 202, paused.text
    assert paused.json()["status"] == ProtocolStatus.PAUSED
    again = c.post(f"/api/protocols/{run}/actions/pause", headers=AUTH)
    assert again.status_code == 409
    assert again.json()["current"] == ProtocolStatus.PAUSED
    assert (
        c.post(f"/api/protocols/{run}/actions/start", headers=AUTH).json()["current"]
        == ProtocolStatus.PAUSED
    )
    assert c.post(f"/api/protocols/{run}/actions/open_pr", headers=AUTH).status_code == 409
    resumed = c.post(f"/api/protocols/{run}/actions/resume", headers=AUTH)
    assert resumed.json()["status"] == ProtocolStatus.RUNNING
    ran = c.post(f"/api/protocols/{run}/actions/run", headers=AUTH, json={"step": 2})
    assert ran.status_code == 202 and ran.json()["result"] == 2
    cancelled = c.post(f"/api/protocols/{run}/actions/cancel", headers=AUTH)
    assert cancelled.json()["status"] == ProtocolStatus.CANCELLED
    late = c.post(f"/api/protocols/{run}/actions/resume", headers=AUTH)
    assert late.status_code == 409 and late.json()["current"] == ProtocolStatus.CANCELLED


def test_project_token_reaches_only_its_project(client: tuple[TestClient, dict[str, Any]]) -> None:
    c, ids = client
    other = seed(str(c.app.state.df.settings.db_url), project="other/repo", runs=1)  # type: ignore[attr-defined]
    issued = c.post(f"/api/projects/{ids['project']}/token", headers=AUTH)
    assert issued.status_code == 201
    token = issued.json()["token"]
    assert token not in c.get(f"/api/projects/{ids['project']}", headers=AUTH).text
    pt = {"X-Project-Token": token}
    assert [p["id"] for p in c.get("/api/projects", headers=pt).json()["items"]] == [ids["project"]]
    assert c.get(f"/api/projects/{other['project']}", headers=pt).status_code == 404
    listed = c.get("/api/protocols", headers=pt).json()
    assert {r["id"] for r in listed["items"]} == set(ids["runs"])
    assert c.get(f"/api/protocols?project_id={other['project']}", headers=pt).status_code == 404
    assert c.get(f"/api/protocols/{other['runs'][0]}", headers=pt).status_code == 404
    assert c.post(f"/api/protocols/{other['runs'][0]}/actions/pause", headers=pt).status_code == 404
    assert c.post(f"/api/protocols/{ids['runs'][0]}/actions/pause", headers=pt).status_code == 202
    events = c.get("/api/events?limit=500", headers=pt).json()["items"]
    assert events and {e["project_id"] for e in events} == {ids["project"]}
    for path in ("/api/deliveries", "/api/queues"):
        assert c.get(path, headers=pt).status_code == 403
    assert (
        c.post("/api/projects", headers=pt, json={"name": "n", "git_url": "/x"}).status_code == 403
    )
    assert c.post(f"/api/projects/{ids['project']}/disable", headers=pt).status_code == 403
    assert c.get("/api/projects", headers={"X-Project-Token": token + "x"}).status_code == 401
    assert (
        c.get(
            "/api/projects", headers={"X-Project-Token": f"dfp_{other['project']}_abc"}
        ).status_code
        == 401
    )
    # the hash cannot be planted through config
    forged = c.patch(
        f"/api/projects/{other['project']}",
        headers=AUTH,
        json={"config": {"api_token_sha256": "0" * 64}},
    )
    assert forged.status_code == 200 and forged.json()["has_project_token"] is False
    # rotating revokes the old token
    c.post(f"/api/projects/{ids['project']}/token", headers=AUTH)
    assert c.get("/api/projects", headers=pt).status_code == 401


def test_queues_per_job_name(tmp_path: Path, sqlite_url: str) -> None:
    with TestClient(
        create_app(make_settings(tmp_path, db_url=sqlite_url), embedded_worker=False)
    ) as c:
        _queues(c)


def _queues(c: TestClient) -> None:
    before = c.get("/api/queues", headers=AUTH).json()
    redis = c.app.state.df.redis  # type: ignore[attr-defined]

    async def fill() -> None:
        await redis.hset(
            JOB_METRICS_KEY, mapping={"execute_step|completed": 4, "execute_step|failed": 1}
        )
        await redis.zadd("arq:queue", {"exec:1:2:3": 1, "plan:9:0": 2})
        await redis.set("arq:in-progress:qa:1:1:5", b"1")

    c.portal.call(fill)  # type: ignore[union-attr]
    body = c.get("/api/queues", headers=AUTH).json()
    assert body["depth"] == before["depth"] + 2
    assert body["in_progress"] == before["in_progress"] + 1 and body["failed"] == 1
    assert body["jobs"]["execute_step"] == {
        "queued": 1,
        "in_progress": 0,
        "failed": 1,
        "outcomes": {"completed": 4, "failed": 1},
    }
    assert body["jobs"]["plan_protocol"]["queued"] == 1
    assert body["jobs"]["run_quality"]["in_progress"] == 1


def test_cookie_writes_need_the_console_header(client: tuple[TestClient, dict[str, Any]]) -> None:
    c, ids = client
    login = c.post("/console/login", data={"token": TOKEN}, follow_redirects=False)
    assert login.status_code == 303
    assert "httponly" in login.headers["set-cookie"].lower()
    assert TOKEN not in login.headers["set-cookie"]
    assert c.get("/api/projects").status_code == 200  # the cookie is enough to read
    run = ids["runs"][0]
    assert c.post(f"/api/protocols/{run}/actions/pause").status_code == 403
    ok = c.post(f"/api/protocols/{run}/actions/pause", headers={"X-Deksdenflow-Console": "1"})
    assert ok.status_code == 202


JUNK = [
    "",
    "-1",
    "abc",
    "1e9",
    "0",
    "2147483648",
    "99999999999999999999",
    "\x00",
    "null",
    "🙂",
    "1;DROP TABLE events",
]
JUNK_BODIES: list[Any] = [
    None,
    1,
    "x",
    [],
    {},
    {"step": -1},
    {"step": 2**40},
    {"project_id": None, "task": 5},
    {"name": "🙂" * 300, "git_url": "x"},
    {"secrets": "no"},
    {"default_models": {"a": 1}},
    {"config": []},
    {"zzz": 1},
]


def test_no_500_on_junk(client: tuple[TestClient, dict[str, Any]]) -> None:
    """Every described operation, fed junk query values and bodies, answers below 500."""
    c, ids = client
    statuses: set[int] = set()
    for op in OPERATIONS:
        method, path, query = op.method, op.path, op.query
        for action in ["pause", "open_pr", "nope"] if "{action}" in path else [""]:
            for ident in (str(ids["runs"][0]), "424242", "2147483648"):
                concrete = (
                    path.replace(
                        "{project_id}", str(ids["project"]) if ident != "424242" else ident
                    )
                    .replace("{run_id}", ident)
                    .replace("{step_id}", ident)
                    .replace("{delivery_id}", ident)
                    .replace("{action}", action)
                )
                for junk in JUNK:
                    params = {name: junk for name in query}
                    resp = c.request(method.upper(), concrete, params=params, headers=AUTH)
                    assert resp.status_code < 500, (method, concrete, params, resp.text)
                    statuses.add(resp.status_code)
                if method != "get":
                    for body in JUNK_BODIES:
                        resp = c.request(method.upper(), concrete, json=body, headers=AUTH)
                        assert resp.status_code < 500, (method, concrete, body, resp.text)
                        statuses.add(resp.status_code)
    assert {400, 404, 422} <= statuses


def test_start_replans_a_run_whose_planning_failed(tmp_path: Path, sqlite_url: str) -> None:
    from sqlalchemy import create_engine, text

    ids = seed(sqlite_url, runs=2, status=ProtocolStatus.FAILED)
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            text("DELETE FROM step_runs WHERE protocol_run_id = :r"), {"r": ids["runs"][0]}
        )
    engine.dispose()
    app = create_app(make_settings(tmp_path, db_url=sqlite_url), embedded_worker=False)
    with TestClient(app) as c:
        started = c.post(f"/api/protocols/{ids['runs'][0]}/actions/start", headers=AUTH)
        assert started.status_code == 202, started.text
        assert started.json()["status"] == ProtocolStatus.PLANNING
        queued = c.get("/api/queues", headers=AUTH).json()
        assert queued["jobs"]["plan_protocol"]["queued"] == 1
        # a failed run that has steps is retried step by step, not re-planned
        refused = c.post(f"/api/protocols/{ids['runs'][1]}/actions/start", headers=AUTH)
        assert refused.status_code == 409 and refused.json()["current"] == ProtocolStatus.FAILED
