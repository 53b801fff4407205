"""The GitHub loop end to end: the real app (memory queue + embedded worker), respx as GitHub,
and a local bare repository as the remote the payloads' `clone_url` points at."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import respx
from arq.constants import default_queue_name
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select
from starlette.testclient import TestClient

from bot.storage.db import Database
from bot.storage.deliveries import load_delivery
from bot.storage.models import Event, Project, ProtocolRun
from bot.storage.runs import RunState, load_run
from bot.web.app import AppState, create_app
from tests.conftest import GITHUB_SECRET, make_settings
from tests.github_e2e.fake_github import (
    APP_ID,
    APP_SLUG,
    FULL_NAME,
    INSTALLATION_ID,
    LOG_HOST,
    FakeGitHub,
)
from tests.gitutil import make_origin as shared_make_origin

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "github"
API = "https://api.github.com"


def make_origin(tmp_path: Path) -> Path:
    """A bare repository with one commit on main: the repository's 'GitHub remote'."""
    return shared_make_origin(tmp_path, readme="# hello\n")


def sample(case: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / case / "body").read_text())
    return data


def sign(body: bytes) -> str:
    return "sha256=" + hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()


@pytest.fixture(scope="session")
def app_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


class GitHubLoop:
    """Deliveries in (signed POSTs), GitHub out (the fake's records), state from the database."""

    def __init__(self, client: TestClient, fake: FakeGitHub, origin: Path) -> None:
        self.client = client
        self.fake = fake
        self.origin = origin
        self._comment_ids = iter(range(5001, 10_000))

    @property
    def state(self) -> AppState:
        state: AppState = self.client.app.state.df  # type: ignore[attr-defined]
        return state

    @property
    def db(self) -> Database:
        assert self.state.db is not None
        return self.state.db

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run an async function in the app's event loop (the worker's loop)."""
        assert self.client.portal is not None
        return self.client.portal.call(fn, *args)

    # -- deliveries ------------------------------------------------------------------------

    def post(self, event: str, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        response = self.client.post(
            "/webhooks/github",
            content=body,
            headers={
                "X-GitHub-Event": event,
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": sign(body),
                "Content-Type": "application/json",
            },
        )
        assert response.status_code in (200, 202), response.text
        result: dict[str, Any] = response.json()
        return result

    def deliver(self, event: str, payload: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        """POST a delivery and wait until it and every job it caused have finished; its outcome."""
        answer = self.post(event, payload)
        self.wait_idle(answer["id"], timeout)
        row = self.call(load_delivery, self.db, answer["id"])
        return {"status": row.status, "outcome": row.outcome, "error": row.error}

    def wait_idle(self, delivery_id: int | None = None, timeout: float = 15.0) -> None:
        async def idle() -> bool:
            if delivery_id is not None:
                row = await load_delivery(self.db, delivery_id)
                if row is None or row.status in ("pending", "processing"):
                    return False
            assert self.state.redis is not None
            return int(await self.state.redis.zcard(default_queue_name)) == 0

        deadline = time.monotonic() + timeout
        calm = 0
        while calm < 2:  # twice in a row: a job may be between a finish and its follow-up enqueue
            if time.monotonic() > deadline:
                raise AssertionError("the worker did not go idle in time")
            calm = calm + 1 if self.call(idle) else 0
            time.sleep(0.03)

    # -- state -----------------------------------------------------------------------------

    def run(self) -> RunState:
        async def latest() -> RunState:
            async with self.db.sessions() as session:
                run_id = (
                    await session.execute(
                        select(ProtocolRun.id).order_by(ProtocolRun.id.desc()).limit(1)
                    )
                ).scalar()
            assert run_id is not None, "no protocol run"
            return await load_run(self.db, run_id)

        result: RunState = self.call(latest)
        return result

    def project(self) -> Project | None:
        async def get() -> Project | None:
            async with self.db.sessions() as session:
                return (
                    await session.execute(select(Project).where(Project.name == FULL_NAME))
                ).scalar()

        return self.call(get)  # type: ignore[no-any-return]

    def events(self, event_type: str) -> list[Event]:
        async def get() -> list[Event]:
            async with self.db.sessions() as session:
                rows = await session.execute(
                    select(Event).where(Event.event_type == event_type).order_by(Event.id)
                )
                return list(rows.scalars())

        return self.call(get)  # type: ignore[no-any-return]

    def update_run(self, **values: Any) -> None:
        from bot.storage.runs import update_run

        run_id = self.run().run.id
        self.call(lambda: update_run(self.db, run_id, **values))

    # -- payloads (recorded samples with our repository, installation and values) ----------

    def _repo(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload["repository"] = {
            **payload.get("repository", {}),
            "full_name": FULL_NAME,
            "clone_url": str(self.origin),
            "default_branch": "main",
        }
        payload["installation"] = {"id": INSTALLATION_ID}
        return payload

    def installation_created(self) -> dict[str, Any]:
        payload = sample("installation_created")
        payload["installation"]["id"] = INSTALLATION_ID
        payload["installation"]["app_id"] = APP_ID
        payload["repositories"] = [
            {"id": 1, "name": "Hello-World", "full_name": FULL_NAME, "private": False}
        ]
        return payload

    def comment(
        self,
        body: str,
        *,
        user: str = "alice",
        user_type: str = "User",
        number: int = 1,
        comment_id: int | None = None,
    ) -> dict[str, Any]:
        payload = self._repo(sample("issue_comment_created"))
        payload["issue"] = {
            **payload["issue"],
            "number": number,
            "title": "Add a greeting",
            "body": "Say hello.",
        }
        payload["issue"].pop("pull_request", None)
        who = {"login": user, "type": user_type, "id": 7}
        payload["comment"] = {
            **payload["comment"],
            "id": comment_id if comment_id is not None else next(self._comment_ids),
            "body": body,
            "user": who,
            "performed_via_github_app": None,
        }
        payload["sender"] = who
        return payload

    def workflow_run(
        self, branch: str, sha: str | None, conclusion: str = "success"
    ) -> dict[str, Any]:
        payload = self._repo(sample("workflow_run_completed"))
        payload["workflow_run"] = {
            **payload["workflow_run"],
            "head_branch": branch,
            "head_sha": sha,
            "status": "completed",
            "conclusion": conclusion,
        }
        return payload

    def check_run_action(
        self, name: str, branch: str, sha: str | None, identifier: str
    ) -> dict[str, Any]:
        payload = self._repo(sample("check_run_requested_action"))
        payload["check_run"] = copy.deepcopy(payload["check_run"])
        payload["check_run"].update(name=name, head_sha=sha, app={"id": APP_ID, "slug": APP_SLUG})
        payload["check_run"]["check_suite"].update(head_branch=branch, head_sha=sha)
        payload["requested_action"] = {"identifier": identifier}
        return payload

    def pr_closed(self, branch: str, number: int, merged: bool) -> dict[str, Any]:
        payload = self._repo(sample("pull_request_closed"))
        payload["number"] = number
        payload["pull_request"] = {
            **payload["pull_request"],
            "number": number,
            "merged": merged,
            "head": {**payload["pull_request"]["head"], "ref": branch},
        }
        return payload

    def ci_green(self, sha: str | None = None) -> dict[str, Any]:
        """Actions reports green on `sha` (default: the protocol's head) of the newest run."""
        self.ci_suite("success")
        state = self.run()
        return self.deliver(
            "workflow_run", self.workflow_run(state.run.protocol_name, sha or state.run.head_sha)
        )

    def ci_suite(
        self, conclusion: str, name: str = "GitHub Actions", status: str = "completed"
    ) -> None:
        """What GET …/check-suites answers: one suite of another app."""
        self.fake.check_suites = [
            {
                "id": 9001,
                "status": status,
                "conclusion": conclusion,
                "app": {"id": 15368, "slug": "github-actions", "name": name},
            },
            {
                "id": 9002,
                "status": "completed",
                "conclusion": "success",
                "app": {"id": APP_ID, "slug": APP_SLUG},
            },
        ]


@pytest.fixture
def loop_factory(tmp_path: Path, app_key: str) -> Iterator[Callable[..., GitHubLoop]]:
    """Start the app against a fresh bare origin with GitHub faked by respx."""
    stack: list[Any] = []

    def start(**overrides: Any) -> GitHubLoop:
        """The product's default settings (QA right after execution, CI gating, the relay's
        interval …): end-to-end tests run as the product ships. `overrides` is for a test
        whose point is a non-default setting; it says why where it passes one."""
        origin = make_origin(tmp_path)
        fake = FakeGitHub(str(origin))
        mock = respx.mock(base_url=API, assert_all_called=False)
        mock.start()
        stack.append(mock.stop)
        mock.route(host=LOG_HOST).mock(side_effect=fake.log_handler)  # job logs' storage
        mock.route().mock(side_effect=fake.respx_handler)
        values: dict[str, Any] = {
            "db_url": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "github_app_id": APP_ID,
            "github_private_key": app_key,
            "github_app_slug": APP_SLUG,
        }
        settings = make_settings(tmp_path, product_defaults=True, **{**values, **overrides})
        client = TestClient(create_app(settings))
        client.__enter__()
        stack.append(lambda: client.__exit__(None, None, None))
        return GitHubLoop(client, fake, origin)

    try:
        yield start
    finally:
        for undo in reversed(stack):
            undo()


@pytest.fixture
def gh(loop_factory: Callable[..., GitHubLoop]) -> GitHubLoop:
    return loop_factory()
