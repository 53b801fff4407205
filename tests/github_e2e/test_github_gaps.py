"""The GitHub App paths the full-loop test leaves out: labels, auto mode, several commands in one
comment, fork pull requests, check_suite CI, re-requested checks, installation suspend/delete,
a failing job's 😕 and the manifest setup flow (page, conversion, the new webhook secret)."""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select, update

from bot.domain.states import ProtocolStatus, StepStatus
from bot.storage.app_credentials import load_stored_credentials
from bot.storage.models import Project, StoredSecret
from tests.github_e2e.conftest import GitHubLoop, sample
from tests.github_e2e.fake_github import APP_ID, APP_SLUG, FULL_NAME, INSTALLATION_ID
from tests.protocol.conftest import scripted_script

R = f"/repos/{FULL_NAME}"
PROTOCOL = "0001-add-a-greeting"
API_TOKEN = "api-test-token-0123456789"  # tests.conftest.make_settings


def pairs(calls: list[Any]) -> list[tuple[str, str]]:
    return [(c.method, c.path) for c in calls]


def checks_created(gh: GitHubLoop, mark: int = 0) -> list[str]:
    return [c.body["name"] for c in gh.fake.since(mark) if c.key == ("POST", f"{R}/check-runs")]


def reactions_on(gh: GitHubLoop, comment_id: int) -> list[str]:
    return [
        c.body["content"]
        for c in gh.fake.requests("POST", f"{R}/issues/comments/{comment_id}/reactions")
    ]


def labeled(gh: GitHubLoop, label: str, user: str = "alice") -> dict[str, Any]:
    payload = gh._repo(sample("issues_labeled"))
    payload["issue"] = {
        **payload["issue"],
        "number": 1,
        "title": "Add a greeting",
        "body": "Say hello.",
    }
    payload["label"] = {**payload["label"], "name": label}
    payload["sender"] = {"login": user, "type": "User", "id": 7}
    return payload


def pull_comment(gh: GitHubLoop, body: str, number: int, comment_id: int) -> dict[str, Any]:
    payload = gh.comment(body, number=number, comment_id=comment_id)
    payload["issue"]["pull_request"] = {"url": f"https://api.github.com{R}/pulls/{number}"}
    return payload


def planned(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    assert gh.run().run.status == ProtocolStatus.PLANNED


def executed(gh: GitHubLoop) -> None:
    """… → /approve → /run-step: step 01 executed and QA'd on its own (PASS), waiting for CI."""
    planned(gh)
    gh.deliver("issue_comment", gh.comment("/approve"))
    gh.deliver("issue_comment", gh.comment("/run-step"))
    state = gh.run()
    assert [s.status for s in state.steps] == [StepStatus.NEEDS_QA, StepStatus.PENDING]
    assert state.step(1).runtime_state["qa_verdict"] == "PASS"


def step_commit(gh: GitHubLoop, index: int) -> str:
    """The step's own commit: the one its CI gate waits on (QA's report commit follows it)."""
    sha: str = gh.run().step(index).runtime_state["commit_sha"]
    return sha


def set_config(gh: GitHubLoop, **config: Any) -> None:
    async def write() -> None:
        async with gh.db.sessions.begin() as session:
            await session.execute(
                update(Project).where(Project.name == FULL_NAME).values(config=config)
            )

    gh.call(write)


# -- labels and auto mode --------------------------------------------------------------------


def test_plan_label_plans_the_issue(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    mark = gh.fake.mark()
    out = gh.deliver("issues", labeled(gh, "bug"))
    assert out["outcome"]["handled"][-1] == {"ignored": "no label of ours"}
    assert gh.fake.since(mark) == []

    out = gh.deliver("issues", labeled(gh, "deksdenflow:plan"))
    assert out["outcome"]["handled"][-1] == {
        "label": "deksdenflow:plan",
        "result": f"planning {PROTOCOL}",
    }
    calls = gh.fake.since(mark)
    # who added the label may act; there is no comment to react to; then the plan job's output
    assert pairs(calls)[:2] == [
        ("GET", f"{R}/collaborators/alice/permission"),
        ("GET", f"{R}/issues/1/comments"),
    ]
    assert ("POST", f"{R}/pulls") in pairs(calls)
    assert not any(c.path.endswith("/reactions") for c in calls)
    state = gh.run()
    assert (state.run.status, state.run.issue_number, state.run.approved) == (
        ProtocolStatus.PLANNED,
        1,
        False,
    )
    assert [s.status for s in state.steps] == [StepStatus.PENDING, StepStatus.PENDING]


def test_plan_label_by_a_reader_is_refused(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    gh.fake.permissions["bob"] = "read"
    mark = gh.fake.mark()
    out = gh.deliver("issues", labeled(gh, "deksdenflow:plan", user="bob"))
    assert out["outcome"]["handled"][-1] == {"label": "deksdenflow:plan", "result": "refused"}
    calls = gh.fake.since(mark)
    assert pairs(calls) == [
        ("GET", f"{R}/collaborators/bob/permission"),
        ("POST", f"{R}/issues/1/comments"),
    ]
    assert (
        calls[1]
        .body["body"]
        .startswith("Sorry @bob, the `deksdenflow:plan` label needs write access")
    )


def test_auto_label_runs_every_step_with_its_ci_and_qa_to_the_end(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    out = gh.deliver("issues", labeled(gh, "deksdenflow:auto"))
    assert out["outcome"]["handled"][-1] == {
        "label": "deksdenflow:auto",
        "result": f"planning {PROTOCOL}",
    }
    # approved by the label: planning went straight on to step 1, which was QA'd right after
    # it executed and now waits for CI
    state = gh.run()
    assert state.run.approved and state.run.auto_mode
    assert [s.status for s in state.steps] == [StepStatus.NEEDS_QA, StepStatus.PENDING]
    gh.ci_suite("success")
    for index, expected in ((1, ["completed", "needs_qa"]), (2, ["completed", "completed"])):
        assert gh.run().step(index).runtime_state["qa_verdict"] == "PASS"
        out = gh.deliver("workflow_run", gh.workflow_run(PROTOCOL, step_commit(gh, index)))
        assert out["outcome"]["handled"][-1] == {"ci": "success", "outcome": "complete"}
        assert [s.status for s in gh.run().steps] == expected
    state = gh.run()
    assert state.run.status == ProtocolStatus.COMPLETED
    assert [s.runtime_state["qa_verdict"] for s in state.steps] == ["PASS", "PASS"]
    assert checks_created(gh) == [
        "deksdenflow/step-01",
        "deksdenflow/step-01",
        "deksdenflow/qa-01",
        "deksdenflow/qa-01",
        "deksdenflow/step-02",
        "deksdenflow/step-02",
        "deksdenflow/qa-02",
        "deksdenflow/qa-02",
    ]
    assert all(r["status"] == "completed" for r in gh.fake.check_runs.values())


# -- comments --------------------------------------------------------------------------------


def test_several_commands_in_one_comment_run_in_order(gh: GitHubLoop) -> None:
    planned(gh)
    mark = gh.fake.mark()
    out = gh.deliver(
        "issue_comment", gh.comment("Looks good.\n/approve\n/run-step\n", comment_id=5401)
    )
    handled = [h for h in out["outcome"]["handled"] if "command" in h]
    assert handled == [
        {"command": "approve", "result": "approved"},
        {"command": "run-step", "result": "step 1"},
    ]
    calls = gh.fake.since(mark)
    # one permission lookup for both; 👀 per accepted command (GitHub keeps one), 🚀 after the job
    assert pairs(calls)[:3] == [
        ("GET", f"{R}/collaborators/alice/permission"),
        ("POST", f"{R}/issues/comments/5401/reactions"),
        ("POST", f"{R}/issues/comments/5401/reactions"),
    ]
    assert reactions_on(gh, 5401) == ["eyes", "eyes", "rocket"]
    state = gh.run()
    assert state.run.approved and [s.status for s in state.steps] == [
        StepStatus.NEEDS_QA,
        StepStatus.PENDING,
    ]


def test_command_on_a_pull_request_from_a_fork_is_refused_unless_allowed(gh: GitHubLoop) -> None:
    planned(gh)
    gh.deliver("issue_comment", gh.comment("/approve"))
    fork = {"ref": "patch-1", "repo": {"full_name": "mallory/Hello-World"}}
    gh.fake.pulls[7] = {
        "number": 7,
        "state": "open",
        "head": fork,
        "base": {"ref": "main", "repo": {"full_name": FULL_NAME}},
    }

    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", pull_comment(gh, "/run-step", 7, 5501))
    assert out["outcome"]["handled"][-1] == {"command": "run-step", "result": "refused-fork"}
    calls = gh.fake.since(mark)
    assert pairs(calls) == [
        ("GET", f"{R}/collaborators/alice/permission"),
        ("GET", f"{R}/pulls/7"),
        ("POST", f"{R}/issues/7/comments"),
    ]
    assert calls[2].body == {
        "body": "`/run-step` is not accepted on pull requests from forks here."
    }
    assert [s.status for s in gh.run().steps] == [StepStatus.PENDING, StepStatus.PENDING]

    # /status and /help are harmless: no fork lookup at all
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", pull_comment(gh, "/help", 7, 5502))
    assert out["outcome"]["handled"][-1] == {"command": "help", "result": "help"}
    assert ("GET", f"{R}/pulls/7") not in pairs(gh.fake.since(mark))

    # the protocol's own pull request (same repository) is looked up once and accepted
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", pull_comment(gh, "/run-step", 101, 5503))
    assert out["outcome"]["handled"][-1] == {"command": "run-step", "result": "step 1"}
    assert pairs(gh.fake.since(mark))[:3] == [
        ("GET", f"{R}/collaborators/alice/permission"),
        ("GET", f"{R}/pulls/101"),
        ("POST", f"{R}/issues/comments/5503/reactions"),
    ]

    # a repository that opts in takes commands from forks, without asking about the pull
    set_config(gh, allow_fork_commands=True)
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", pull_comment(gh, "/qa", 7, 5504))
    assert out["outcome"]["handled"][-1]["result"] != "refused-fork"
    assert ("GET", f"{R}/pulls/7") not in pairs(gh.fake.since(mark))


# -- CI and checks ---------------------------------------------------------------------------


_SUITE_IDS = iter(range(118_600_000, 118_700_000))


def check_suite(gh: GitHubLoop, sha: str | None, app_id: int = 15368) -> dict[str, Any]:
    payload = gh._repo(sample("check_suite_completed"))
    payload["check_suite"] = {
        **payload["check_suite"],
        "id": next(
            _SUITE_IDS
        ),  # each delivery is another suite (one version of one suite is a replay)
        "head_branch": PROTOCOL,
        "head_sha": sha,
        "status": "completed",
        "conclusion": "success",
        "app": {"id": app_id, "slug": "github-actions" if app_id != APP_ID else APP_SLUG},
    }
    return payload


def test_check_suite_completed_drives_ci_like_workflow_run(gh: GitHubLoop) -> None:
    executed(gh)
    head = step_commit(gh, 1)  # QA already passed: CI on the step's commit is what it waits for
    mark = gh.fake.mark()
    out = gh.deliver("check_suite", check_suite(gh, head, app_id=APP_ID))
    assert [
        h for h in out["outcome"]["handled"] if "ci" in h or "ignored" in h
    ] == []  # our own suite
    assert gh.fake.since(mark) == []

    gh.ci_suite("in_progress", status="in_progress")
    out = gh.deliver("check_suite", check_suite(gh, head))
    assert out["outcome"]["handled"][-1] == {"waiting": "other check suites still running"}
    assert [s.status for s in gh.run().steps] == [StepStatus.NEEDS_QA, StepStatus.PENDING]

    gh.ci_suite("success")
    mark = gh.fake.mark()
    out = gh.deliver("check_suite", check_suite(gh, head))
    assert out["outcome"]["handled"][-1] == {"ci": "success", "outcome": "complete"}
    assert pairs(gh.fake.since(mark))[0] == ("GET", f"{R}/commits/{head}/check-suites")
    assert checks_created(gh, mark) == []  # QA ran before CI, right after the step executed
    state = gh.run()
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED, StepStatus.PENDING]
    assert state.steps[0].runtime_state["qa_verdict"] == "PASS"


def rerequested(gh: GitHubLoop, name: str) -> dict[str, Any]:
    payload = gh.check_run_action(name, PROTOCOL, gh.run().run.head_sha, "")
    payload["action"] = "rerequested"
    payload.pop("requested_action", None)
    return payload


def test_check_run_rerequested_reruns_the_step_or_its_qa(gh: GitHubLoop) -> None:
    executed(gh)  # QA passed on its own, CI due
    gh.ci_green(step_commit(gh, 1))
    assert [s.status for s in gh.run().steps] == [StepStatus.COMPLETED, StepStatus.PENDING]

    # "Re-run" on the QA check runs QA again
    mark = gh.fake.mark()
    out = gh.deliver("check_run", rerequested(gh, "deksdenflow/qa-01"))
    assert out["outcome"]["handled"][-1] == {"action": "run-qa", "step": 1}
    assert checks_created(gh, mark)[0] == "deksdenflow/qa-01"

    # … on the step's check re-executes the step (a retry)
    before = gh.run().run.head_sha
    mark = gh.fake.mark()
    out = gh.deliver("check_run", rerequested(gh, "deksdenflow/step-01"))
    assert out["outcome"]["handled"][-1] == {"action": "retry-step", "step": 1}
    assert checks_created(gh, mark)[0] == "deksdenflow/step-01"
    state = gh.run()
    assert state.steps[0].retries == 1 and state.steps[0].status == StepStatus.NEEDS_QA
    assert state.run.head_sha != before


# -- installations ---------------------------------------------------------------------------


def test_installation_suspend_deleted_and_unsuspend_switch_the_project(gh: GitHubLoop) -> None:
    gh.deliver("installation", gh.installation_created())
    project = gh.project()
    assert project is not None and project.enabled

    suspend = {**gh.installation_created(), "action": "suspend"}
    suspend.pop("repositories")  # GitHub sends the installation only: all of its projects
    out = gh.deliver("installation", suspend)
    assert out["outcome"]["handled"][-1] == {"disabled": f"installation {INSTALLATION_ID}"}
    project = gh.project()
    assert project is not None and not project.enabled
    mark = gh.fake.mark()
    out = gh.deliver("issue_comment", gh.comment("/plan"))
    assert (out["status"], out["outcome"]["handled"][-1]) == (
        "processed",
        {"ignored": f"project {FULL_NAME} is disabled"},
    )
    assert gh.fake.since(mark) == []  # not a word to a suspended installation

    out = gh.deliver("installation", {**suspend, "action": "unsuspend"})
    assert out["outcome"]["handled"][-1] == {"enabled": f"installation {INSTALLATION_ID}"}
    project = gh.project()
    assert project is not None and project.enabled
    out = gh.deliver("issue_comment", gh.comment("/status"))
    assert out["outcome"]["handled"][-1] == {"command": "status", "result": "no-protocol"}

    out = gh.deliver("installation", {**gh.installation_created(), "action": "deleted"})
    assert out["outcome"]["handled"][-1] == {"disabled": [FULL_NAME]}
    project = gh.project()
    assert project is not None and not project.enabled


# -- a failing job ---------------------------------------------------------------------------


def test_failed_job_reacts_confused(
    tmp_path: Path, loop_factory: Callable[..., GitHubLoop]
) -> None:
    script = tmp_path / "failing.yml"
    script.write_text(
        yaml.safe_dump(
            scripted_script(execute={"steps": {"record-task": {"fail": "agent crashed"}}})
        )
    )
    gh = loop_factory(scripted_script=script)
    planned(gh)
    gh.deliver("issue_comment", gh.comment("/approve"))
    out = gh.deliver("issue_comment", gh.comment("/run-step", comment_id=5601))
    assert out["outcome"]["handled"][-1] == {"command": "run-step", "result": "step 1"}
    assert reactions_on(gh, 5601) == ["eyes", "confused"]
    state = gh.run()
    assert state.steps[0].status == StepStatus.FAILED
    assert (
        state.run.status == ProtocolStatus.BLOCKED
        and "agent crashed" in state.run.runtime_state["message"]
    )
    # the step's check run, opened in progress, is closed as a failure (never left spinning)
    runs = [r for r in gh.fake.check_runs.values() if r["name"] == "deksdenflow/step-01"]
    assert [(r["status"], r.get("conclusion")) for r in runs] == [("completed", "failure")]


# -- the manifest setup flow -----------------------------------------------------------------


def test_setup_page_needs_the_api_token_and_posts_the_manifest(gh: GitHubLoop) -> None:
    assert gh.client.get("/github/setup").status_code == 401
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    page = gh.client.get("/github/setup", headers=auth)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form action="https://github.com/settings/apps/new?state=' in page.text
    value = page.text.split('name="manifest" value="', 1)[1].split('"', 1)[0]
    manifest = json.loads(html.unescape(value))
    assert manifest["hook_attributes"]["url"] == "http://testserver/webhooks/github"
    assert manifest["redirect_url"] == "http://testserver/github/setup/callback"
    assert manifest["default_permissions"] and manifest["default_events"]
    org = gh.client.get("/github/setup?organization=acme", headers=auth)
    assert 'action="https://github.com/organizations/acme/settings/apps/new?state=' in org.text
    # a project token is not the operator
    assert gh.client.get("/github/setup", headers={"X-Project-Token": "dfp_1_x"}).status_code == 401


def _setup_state(gh: GitHubLoop) -> str:
    page = gh.client.get("/github/setup", headers={"Authorization": f"Bearer {API_TOKEN}"})
    return page.text.split("?state=", 1)[1].split('"', 1)[0]


def _stored_rows(gh: GitHubLoop) -> list[str]:
    db = gh.state.db
    assert db is not None

    async def read() -> list[str]:
        async with db.sessions() as session:
            return list((await session.execute(select(StoredSecret.value))).scalars())

    rows: list[str] = gh.client.portal.call(read)  # type: ignore[union-attr]
    return rows


def test_setup_callback_without_state_is_refused_and_stores_nothing(gh: GitHubLoop) -> None:
    mark = gh.fake.mark()
    for query in ("?code=abc", "?code=abc&state=forged-state-value", "?code=abc&state="):
        assert gh.client.get("/github/setup/callback" + query).status_code == 403
    assert gh.fake.since(mark) == []  # no conversion was even asked for
    assert _stored_rows(gh) == []
    assert not (gh.state.settings.data_dir / "github-app.json").exists()


def test_setup_callback_converts_stores_0600_and_uses_the_new_secret(
    gh: GitHubLoop, app_key: str
) -> None:
    conversion = {
        "id": 5151,
        "slug": "deksdenflow-new",
        "pem": app_key,
        "webhook_secret": "brand-new-webhook-secret",
        "client_id": "Iv1.abc",
        "html_url": "https://github.com/apps/deksdenflow-new",
        "client_secret": "never-stored",
    }
    gh.fake.fail_next("POST", "/app-manifests/abc/conversions", 201, conversion)
    state = _setup_state(gh)
    assert gh.client.get(f"/github/setup/callback?code=../x&state={state}").status_code == 400
    mark = gh.fake.mark()
    page = gh.client.get(f"/github/setup/callback?code=abc&state={state}")
    assert page.status_code == 200 and "deksdenflow-new" in page.text
    calls = gh.fake.since(mark)
    assert pairs(calls) == [("POST", "/app-manifests/abc/conversions")]
    assert calls[0].token is None  # the code is the credential: no app or installation auth
    # the state is spent: the same redirect cannot be replayed
    assert gh.client.get(f"/github/setup/callback?code=abc&state={state}").status_code == 403

    # sealed in the database, where workers read it; nothing in clear on disk or in the row
    (row,) = _stored_rows(gh)
    assert (
        row.startswith("fernet:")
        and "brand-new-webhook-secret" not in row
        and "PRIVATE KEY" not in row
    )
    db = gh.state.db
    assert db is not None

    async def load() -> dict[str, Any] | None:
        assert db is not None
        return await load_stored_credentials(gh.state.settings, db)

    kept = gh.client.portal.call(load)  # type: ignore[union-attr]
    assert kept is not None
    assert kept["id"] == 5151 and kept["webhook_secret"] == "brand-new-webhook-secret"
    assert "client_secret" not in kept
    key = gh.state.settings.data_dir / "secret.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(gh.state.settings.data_dir.stat().st_mode) == 0o700

    def signed(secret: str) -> int:
        body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
        signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return gh.client.post(
            "/webhooks/github",
            content=body,
            headers={
                "X-GitHub-Event": "ping",
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": signature,
                "Content-Type": "application/json",
            },
        ).status_code

    assert signed("brand-new-webhook-secret") in (200, 202)
    assert signed("some-other-secret") == 401


@pytest.mark.parametrize("code", ["", "a b", "abc/../x"])
def test_setup_callback_rejects_malformed_codes(gh: GitHubLoop, code: str) -> None:
    mark = gh.fake.mark()
    assert gh.client.get("/github/setup/callback", params={"code": code}).status_code == 400
    assert gh.fake.since(mark) == []


def test_git_url_must_be_the_forges_own_clone_url(gh: GitHubLoop) -> None:
    assert gh.deliver("installation", gh.installation_created())["status"] == "processed"
    project = gh.project()
    assert project is not None
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    gh.fake.clone_url = f"https://github.com/{FULL_NAME}.git"
    other = gh.client.patch(
        f"/api/projects/{project.id}",
        headers=auth,
        json={"git_url": "https://github.com/evil/fork.git"},
    )
    assert other.status_code == 422 and "clone URL" in other.text
    same = gh.client.patch(
        f"/api/projects/{project.id}", headers=auth, json={"git_url": gh.fake.clone_url}
    )
    assert same.status_code == 200 and same.json()["git_url"] == gh.fake.clone_url
