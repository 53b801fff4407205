"""Create and start a protocol through the API on a local origin, then open its draft PR."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from starlette.testclient import TestClient

from bot.domain.states import ProtocolStatus
from bot.web.app import create_app
from tests.conftest import make_settings

AUTH = {"Authorization": "Bearer api-test-token-0123456789"}
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "T",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "T",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def bare_origin(tmp_path: Path) -> Path:
    seed = tmp_path / "seed"
    seed.mkdir()
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "init"]):
        if args[0] == "add":
            (seed / "README.md").write_text("# demo\n")
        subprocess.run(["git", *args], cwd=seed, env=GIT_ENV, check=True)
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(seed), str(bare)], env=GIT_ENV, check=True)
    return bare


def wait_status(
    c: TestClient, run_id: int, wanted: set[str], timeout: float = 60
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        run: dict[str, object] = c.get(f"/api/protocols/{run_id}", headers=AUTH).json()
        if run["status"] in wanted or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def test_create_start_and_open_pr(tmp_path: Path, sqlite_url: str) -> None:
    origin = bare_origin(tmp_path)
    settings = make_settings(tmp_path, db_url=sqlite_url)
    with TestClient(create_app(settings)) as c:
        project = c.post(
            "/api/projects",
            headers=AUTH,
            json={"name": "local-demo", "provider": "local", "git_url": str(origin)},
        ).json()
        made = c.post(
            "/api/protocols",
            headers=AUTH,
            json={"project_id": project["id"], "task": "Add a changelog"},
        )
        assert made.status_code == 201, made.text
        run = made.json()
        assert run["protocol_name"].startswith("0001-")
        assert run["status"] in (
            ProtocolStatus.PENDING,
            ProtocolStatus.PLANNING,
            ProtocolStatus.PLANNED,
        )
        planned = wait_status(c, run["id"], {ProtocolStatus.PLANNED, ProtocolStatus.FAILED})
        assert planned["status"] == ProtocolStatus.PLANNED, planned
        assert planned["steps"]
        # the plan job opens the draft PR right after `planned`: let it finish first
        deadline = time.monotonic() + 30
        while not c.get(f"/api/protocols/{run['id']}", headers=AUTH).json()["pr_number"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # planning already opened the draft PR; open_pr is idempotent and answers with it
        opened = c.post(f"/api/protocols/{run['id']}/actions/open_pr", headers=AUTH)
        assert opened.status_code == 202, opened.text
        number = opened.json()["result"]["pr_number"]
        assert (
            number
            and c.get(f"/api/protocols/{run['id']}", headers=AUTH).json()["pr_number"] == number
        )
        again = c.post(f"/api/protocols/{run['id']}/actions/open_pr", headers=AUTH)
        assert again.json()["result"]["pr_number"] == number
        assert (
            c.post(f"/api/protocols/{run['id']}/actions/start", headers=AUTH).json()["current"]
            == ProtocolStatus.PLANNED
        )
        second = c.post(
            "/api/protocols", headers=AUTH, json={"project_id": project["id"], "task": "Second"}
        )
        assert second.json()["protocol_name"].startswith("0002-")
        events = c.get(f"/api/events?protocol_run_id={run['id']}&after=0", headers=AUTH).json()[
            "items"
        ]
        assert "protocol.created" in {e["event_type"] for e in events}
