"""GitLab end-to-end fixtures: the app on the fake GitLab, a bare origin, payload builders."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from bot.web.app import create_app
from tests.conftest import make_settings
from tests.gitlab.fake_gitlab import DEVELOPER, REPORTER, FakeGitLab, _Call
from tests.gitutil import git, make_origin
from tests.intake.helpers import gitlab_headers, rows

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "gitlab"
PROJECT_ID = 7
PROJECT_PATH = "acme/widgets"


class RepoBackedGitLab(FakeGitLab):
    """The fake GitLab, plus: commits pushed to a project's local bare origin exist on it.

    Real GitLab knows every pushed commit and, with a .gitlab-ci.yml, starts a pipeline for it;
    with `pipelines_on_push` each newly seen commit on a branch gets a running push pipeline, so
    the bot's commit statuses join it (pipeline_id) as on GitLab.
    """

    def __init__(self) -> None:
        super().__init__()
        self.origins: dict[int, Path] = {}
        self.pipelines_on_push = True

    def link_origin(self, project: dict[str, Any], origin: Path) -> None:
        self.origins[project["id"]] = origin

    def sync_commits(self, pid: int) -> None:
        origin = self.origins.get(pid)
        if origin is None:
            return
        refs = git(
            "for-each-ref", "--format=%(objectname) %(refname:short)", "refs/heads/", cwd=origin
        )
        for line in refs.splitlines():
            head, branch = line.split(" ", 1)
            for sha in git("rev-list", head, cwd=origin).split():
                if (pid, sha) in self.state.commits:
                    continue
                if self.pipelines_on_push and sha == head and branch != "main":
                    self._create_pipeline(pid, sha, branch, "running", "push")
                else:
                    self.state.commits[(pid, sha)] = {
                        "id": sha,
                        "short_id": sha[:8],
                        "title": "commit",
                        "last_pipeline": None,
                    }

    def _get_commit(self, call: _Call) -> Any:
        self.sync_commits(self._project(call.params["pid"])["id"])
        return super()._get_commit(call)

    def _post_status(self, call: _Call) -> Any:
        self.sync_commits(self._project(call.params["pid"])["id"])
        return super()._post_status(call)

    def statuses(self, name_prefix: str = "deksdenflow/") -> list[tuple[str, str, str]]:
        """(name, sha, state) of every status POST that succeeded, in order."""
        return [
            (r.json["name"], r.path.rsplit("/", 1)[-1], r.json["state"])
            for r in self.requests_to("POST", "/projects/*/statuses/*")
            if r.status in (200, 201) and str(r.json.get("name", "")).startswith(name_prefix)
        ]


@pytest.fixture
def fake_gitlab() -> Iterator[RepoBackedGitLab]:
    fake = RepoBackedGitLab()
    with fake:
        yield fake
        assert not fake.errors, f"fake GitLab raised: {fake.errors!r}"


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A bare repository with one commit on main: the project's git remote."""
    return make_origin(tmp_path, readme="# widgets\n")


class World:
    """The fake GitLab's project, users and issue; the running app; payload builders."""

    def __init__(
        self, fake: RepoBackedGitLab, origin: Path, client: TestClient, db_url: str
    ) -> None:
        self.fake = fake
        self.origin = origin
        self.client = client
        self.db_url = db_url
        self.project = fake.add_project(PROJECT_PATH, project_id=PROJECT_ID)
        fake.link_origin(self.project, origin)
        self.alice = fake.add_user("alice")
        self.bob = fake.add_user("bob")
        fake.add_member(self.project, self.alice, DEVELOPER)
        fake.add_member(self.project, self.bob, REPORTER)
        self.issue = fake.add_issue(self.project, title="Add a greeting", author=self.alice)

    # -- payloads from the documentation samples --------------------------------------------

    def _project_fields(self, payload: dict[str, Any]) -> None:
        payload["project_id"] = PROJECT_ID
        payload["project"].update(
            id=PROJECT_ID,
            path_with_namespace=PROJECT_PATH,
            default_branch="main",
            git_http_url=str(self.origin),
            http_url=str(self.origin),
        )

    def _user(self, user: dict[str, Any]) -> dict[str, Any]:
        return {"id": user["id"], "name": user["name"], "username": user["username"]}

    def note(self, text: str, user: dict[str, Any] | None = None) -> dict[str, Any]:
        """A note on the issue: created on the fake (so it can be awarded) and as a Note Hook."""
        user = user or self.alice
        note = self.fake.add_note(self.project, "issues", self.issue["iid"], text, author=user)
        payload: dict[str, Any] = json.loads((SAMPLES / "note_hook__3.json").read_text())
        self._project_fields(payload)
        payload["user"] = self._user(user)
        payload["object_attributes"].update(
            id=note["id"],
            note=text,
            noteable_type="Issue",
            project_id=PROJECT_ID,
            author_id=user["id"],
        )
        payload["issue"].update(
            iid=self.issue["iid"],
            title=self.issue["title"],
            description="Please greet",
            state="opened",
            project_id=PROJECT_ID,
        )
        return payload

    def pipeline(
        self, sha: str, ref: str, status: str, builds: list[tuple[str, str]]
    ) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads((SAMPLES / "pipeline_hook__1.json").read_text())
        self._project_fields(payload)
        payload["object_attributes"].update(ref=ref, sha=sha, status=status, source="push")
        template = payload["builds"][0]
        payload["builds"] = [
            {**copy.deepcopy(template), "id": 500 + i, "name": name, "status": state}
            for i, (name, state) in enumerate(builds)
        ]
        payload["merge_request"] = None
        return payload

    def label_event(self, added: str, user: dict[str, Any] | None = None) -> dict[str, Any]:
        """An Issue Hook whose `changes.labels` add `added` to the issue."""
        user = user or self.alice
        payload: dict[str, Any] = json.loads((SAMPLES / "issue_hook__1.json").read_text())
        self._project_fields(payload)
        payload["user"] = self._user(user)
        payload["object_attributes"].update(
            iid=self.issue["iid"],
            title=self.issue["title"],
            description="Please greet",
            action="update",
            project_id=PROJECT_ID,
        )
        previous = payload["changes"]["labels"]["previous"]
        payload["changes"]["labels"]["current"] = [
            *previous,
            {**previous[0], "id": 999, "title": added},
        ]
        return payload

    def merge_request_event(self, iid: int, branch: str, action: str) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads((SAMPLES / "merge_request_hook__1.json").read_text())
        self._project_fields(payload)
        payload["object_attributes"].update(
            iid=iid,
            source_branch=branch,
            target_branch="main",
            action=action,
            state="merged" if action == "merge" else "closed",
            source_project_id=PROJECT_ID,
            target_project_id=PROJECT_ID,
        )
        return payload

    # -- sending and waiting ------------------------------------------------------------------

    def send(self, event: str, payload: dict[str, Any], **headers: str) -> dict[str, Any]:
        res = self.client.post(
            "/webhooks/gitlab",
            content=json.dumps(payload).encode(),
            headers={**gitlab_headers(event), **headers},
        )
        assert res.status_code == 202, res.text
        answer: dict[str, Any] = res.json()
        self.wait(
            lambda: self.delivery_status(answer["id"]) not in ("pending", "processing"),
            f"delivery {answer}",
        )
        return answer

    def delivery_status(self, delivery_id: int) -> str:
        return str(
            rows(
                self.db_url, f"SELECT status FROM webhook_deliveries WHERE id = {int(delivery_id)}"
            )[0][0]
        )

    def delivery_result(self, delivery_id: int) -> Any:
        raw = rows(
            self.db_url, f"SELECT outcome FROM webhook_deliveries WHERE id = {int(delivery_id)}"
        )[0][0]
        return json.loads(raw) if isinstance(raw, str) else raw

    def run(self) -> Any:
        found = rows(self.db_url, "SELECT * FROM protocol_runs ORDER BY id DESC LIMIT 1")
        return found[0] if found else None

    def steps(self) -> list[Any]:
        return rows(self.db_url, "SELECT * FROM step_runs ORDER BY step_index")

    def step_statuses(self) -> list[str]:
        return [s.status for s in self.steps()]

    def events(self, prefix: str = "") -> list[Any]:
        return [
            e
            for e in rows(self.db_url, "SELECT * FROM events ORDER BY id")
            if str(e.event_type).startswith(prefix)
        ]

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                run = self.run()
                raise AssertionError(
                    f"timed out waiting for {what}; run={run and run.status} "
                    f"steps={self.step_statuses()} "
                    f"events={[(e.event_type, e.message) for e in self.events()][-12:]}"
                )
            time.sleep(0.05)

    def wait_run(self, status: str, steps: list[str] | None = None) -> Any:
        def ready() -> bool:
            run = self.run()
            return (
                run is not None
                and run.status == status
                and (steps is None or self.step_statuses() == steps)
            )

        self.wait(ready, f"protocol {status} with steps {steps}")
        return self.run()

    def wait_reaction(self, note: dict[str, Any], name: str = "rocket") -> None:
        """Until the job a note asked for has finished: 🚀 (or 😕) awarded on it."""
        note_id = note["object_attributes"]["id"]
        self.wait(
            lambda: any(
                a["awardable_id"] == note_id and a["name"] == name
                for a in self.fake.state.award_emoji
            ),
            f"{name} on note {note_id}",
        )

    def status_note(self) -> dict[str, Any]:
        notes = [
            n
            for n in self.fake.notes_of(self.project, "issues", self.issue["iid"])
            if "deksdenflow:status" in n["body"]
        ]
        assert len(notes) == 1, notes
        return notes[0]


@pytest.fixture
def world_factory(
    fake_gitlab: RepoBackedGitLab, origin: Path, tmp_path: Path, sqlite_url: str
) -> Iterator[Callable[..., World]]:
    clients: list[TestClient] = []

    def build(**overrides: Any) -> World:
        """The product's default settings (QA right after a step, CI gating …): end-to-end
        tests run as the product ships. `overrides` is for a test whose point is a
        non-default setting; it says why where it passes one."""
        values: dict[str, Any] = {
            "db_url": sqlite_url,
            "gitlab_url": fake_gitlab.url,
            "gitlab_token": fake_gitlab.token,
            **overrides,
        }
        client = TestClient(create_app(make_settings(tmp_path, product_defaults=True, **values)))
        client.__enter__()
        clients.append(client)
        return World(fake_gitlab, origin, client, sqlite_url)

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def world(world_factory: Callable[..., World]) -> World:
    return world_factory()
