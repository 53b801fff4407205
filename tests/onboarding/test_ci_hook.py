"""POST /webhooks/ci: authentication, body checks, and the same transitions as a forge's CI
event."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.core.errors import WebhookError
from bot.domain.states import ProtocolStatus, StepStatus
from bot.git.onboarding import ASSETS
from bot.handlers.ci_report import ci_delivery, parse_report, verify
from bot.jobs.ci import apply_ci_result
from bot.jobs.steps import execute_step
from bot.web.app import create_app
from engines.scripted import ScriptedEngine
from tests.conftest import LiveServer
from tests.gitutil import git
from tests.protocol.conftest import Harness, make_harness, protocol_settings

TOKEN = "ci-hook-token-0123456789"


def sign(body: bytes, token: str = TOKEN) -> str:
    return "sha256=" + hmac.new(token.encode(), body, hashlib.sha256).hexdigest()


def test_verify_and_parse_are_strict() -> None:
    body = b'{"branch": "0001-x", "status": "success"}'
    verify({"X-DeksdenFlow-Signature": sign(body)}, body, TOKEN)
    verify({"x-deksdenflow-token": TOKEN}, body, TOKEN)
    for headers in (
        {},
        {"X-DeksdenFlow-Token": "nope"},
        {"X-DeksdenFlow-Signature": sign(body, "other")},
    ):
        with pytest.raises(WebhookError) as err:
            verify(headers, body, TOKEN)
        assert err.value.status_code == 401
    report = parse_report(b'{"protocol_run_id": 3, "status": "failure", "failing": ["lint"]}')
    assert report.protocol_run_id == 3 and report.failing == ("lint",)
    for bad, status in (
        (b"not json", 400),
        (b"[]", 422),
        (b'{"branch": "x"}', 422),
        (b'{"branch": "x", "status": "done"}', 422),
        (b'{"status": "success"}', 422),
        (b'{"branch": "x", "status": "success", "failing": "lint"}', 422),
        (b'{"protocol_run_id": true, "status": "success"}', 422),
    ):
        with pytest.raises(WebhookError) as err:
            parse_report(bad)
        assert err.value.status_code == status, bad


@pytest.fixture
async def ci_harness(tmp_path: Path, origin: Path) -> AsyncIterator[Harness]:
    # no QA after execution nor on CI: green CI completes the step directly, so the transition
    # is visible at once (with QA queued, green CI would wait for its verdict)
    settings = protocol_settings(
        tmp_path, webhook_token=TOKEN, auto_qa_on_ci=False, auto_qa_after_exec=False
    )
    async with make_harness(settings, origin) as h:
        h.use(ScriptedEngine())
        yield h


async def runs_waiting_for_ci(h: Harness, *tasks: str) -> list[tuple[int, str, str]]:
    """Runs whose step 1 executed and waits on CI."""
    ids = [await h.start(task) for task in tasks]
    out = []
    for run_id in ids:
        assert await execute_step(h.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa"
    for run_id in ids:
        state = await h.state(run_id)
        assert state.step(1).status == StepStatus.NEEDS_QA
        out.append((run_id, state.run.protocol_name, state.run.head_sha))
    return out


async def snapshot(h: Harness, run_id: int) -> tuple[str, list[str], list[str]]:
    state = await h.state(run_id)
    ci_events = [e.event_type for e in await h.events(run_id, "ci.")]
    return state.run.status, [s.status for s in state.steps], ci_events


async def wait_processed(h: Harness, delivery_id: int) -> dict[str, Any]:
    """The stored delivery's outcome, once the worker has processed it (and its jobs ran)."""
    from bot.storage.deliveries import load_delivery

    for _ in range(600):
        row = await load_delivery(h.ctx["db"], delivery_id)
        if row is not None and row.status not in ("pending", "processing"):
            outcome: dict[str, Any] = row.outcome
            return {"status": row.status, **outcome}
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery {delivery_id} was not processed")


async def test_ci_hook_drives_the_same_transitions_as_a_forge_event(
    ci_harness: Harness, tmp_path: Path
) -> None:
    h = ci_harness
    (forge_run, _, forge_sha), (hook_run, hook_branch, hook_sha) = await runs_waiting_for_ci(
        h, "Forge CI", "Hook CI"
    )
    # what a GitHub check suite / GitLab pipeline event does
    assert await apply_ci_result(h.ctx, forge_run, forge_sha, "success") == "complete"

    with LiveServer(create_app(h.ctx["settings"])) as server:
        url = f"{server.url}/webhooks/ci"
        async with httpx.AsyncClient(timeout=30) as client:
            # stored and answered; the decision is the worker's, not the request's
            body = json.dumps(
                {"branch": hook_branch, "status": "running", "sha": hook_sha}
            ).encode()
            r = await client.post(
                url, content=body, headers={"X-DeksdenFlow-Signature": sign(body)}
            )
            assert r.status_code == 202 and r.json()["status"] == "accepted"
            assert (await wait_processed(h, r.json()["id"]))["handled"][-1]["outcome"] == "recorded"
            # the same report again is a duplicate of the stored delivery
            again = await client.post(
                url, content=body, headers={"X-DeksdenFlow-Signature": sign(body)}
            )
            assert again.status_code == 200 and again.json()["status"] == "duplicate"

            bad = await client.post(url, content=body, headers={"X-DeksdenFlow-Token": "wrong"})
            assert bad.status_code == 401
            unsigned = await client.post(url, content=body)
            assert unsigned.status_code == 401
            unknown = json.dumps({"branch": "0099-nope", "status": "success"}).encode()
            r = await client.post(url, content=unknown, headers={"X-DeksdenFlow-Token": TOKEN})
            assert r.status_code == 202
            handled = (await wait_processed(h, r.json()["id"]))["handled"]
            assert handled[-1] == {"ignored": "no protocol for branch '0099-nope'"}
            r = await client.post(url, content=b"{", headers={"X-DeksdenFlow-Token": TOKEN})
            assert r.status_code == 400
            r = await client.post(
                url, content=b'{"branch": "x"}', headers={"X-DeksdenFlow-Token": TOKEN}
            )
            assert r.status_code == 422

            # the real report.sh, with curl, signs and sends the success
            env = {
                **{
                    k: v
                    for k, v in os.environ.items()
                    if not k.startswith(("DEKSDENFLOW_", "GITHUB_", "CI_"))
                },
                "DEKSDENFLOW_CI_URL": url,
                "DEKSDENFLOW_WEBHOOK_TOKEN": TOKEN,
                "DEKSDENFLOW_BRANCH": hook_branch,
                "DEKSDENFLOW_SHA": hook_sha,
            }
            done = await asyncio.to_thread(
                subprocess.run,
                ["bash", str(ASSETS / "ci" / "report.sh"), "success"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            assert answer["status"] == "accepted"
            handled = (await wait_processed(h, answer["id"]))["handled"]
            assert handled[-1] == {
                "protocol_run_id": hook_run,
                "ci": "success",
                "outcome": "complete",
            }

    forge = await snapshot(h, forge_run)
    hook = await snapshot(h, hook_run)
    assert (
        forge[:2]
        == hook[:2]
        == (ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.PENDING])
    )
    assert hook[2] == ["ci.running", "ci.success"] and forge[2] == ["ci.success"]


async def test_ci_hook_failure_loops_like_a_forge_failure(
    ci_harness: Harness, tmp_path: Path
) -> None:
    """report.sh sends the failing stage and its log tail (what run_hook kept in .deksdenflow-ci/);
    the step goes round its fix loop as on a forge's red CI, with that log as its feedback."""
    h = ci_harness
    (forge_run, _, forge_sha), (hook_run, hook_branch, hook_sha) = await runs_waiting_for_ci(
        h, "Forge red", "Hook red"
    )
    await apply_ci_result(h.ctx, forge_run, forge_sha, "failure", [("lint", "failure")])
    workspace = tmp_path / "ci-workspace"
    (workspace / ".deksdenflow-ci").mkdir(parents=True)
    (workspace / ".deksdenflow-ci" / "stage").write_text("test\n")
    noise = "".join(f"collected line {n} — ünïcode\n" for n in range(2000))  # more than the tail
    (workspace / ".deksdenflow-ci" / "test.log").write_text(
        noise + 'E       AssertionError: expected 3, got 4\n\tat "quoted" \\ path\n'
        "FAILED tests/test_math.py::test_add\n"
    )
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DEKSDENFLOW_", "GITHUB_", "CI_"))
        },
        "DEKSDENFLOW_CI_URL": "",
        "DEKSDENFLOW_WEBHOOK_TOKEN": TOKEN,
        "DEKSDENFLOW_BRANCH": hook_branch,
        "DEKSDENFLOW_SHA": hook_sha,
    }
    with LiveServer(create_app(h.ctx["settings"])) as server:
        env["DEKSDENFLOW_CI_URL"] = f"{server.url}/webhooks/ci"
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", str(ASSETS / "ci" / "report.sh"), "failure", "ci"],
            capture_output=True, text=True, env=env, timeout=60, cwd=workspace,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert (await wait_processed(h, answer["id"]))["handled"][-1]["outcome"] == "retry"
    # both went round the loop once (the hook's one ran again in the server's own worker)
    assert [(await h.state(r)).step(1).retries for r in (forge_run, hook_run)] == [1, 1]
    step = (await h.state(hook_run)).step(1)
    feedback = json.dumps(step.runtime_state["feedback"])
    assert "AssertionError: expected 3, got 4" in feedback and "failing stage: test" in feedback
    assert "collected line 1999" in feedback and "collected line 10 " not in feedback  # the tail


async def test_ci_hook_finds_a_protocol_planned_on_a_pull_request_branch(
    ci_harness: Harness, origin: Path
) -> None:
    """`/plan` on a human's PR commits to that PR's branch: report.sh sends that branch (and a
    graph step's child branch `NNNN-task--XX`), and the hook finds the protocol by it."""
    h = ci_harness
    git("branch", "feature-x", "main", cwd=origin)  # the human's PR branch
    run_id = await h.start("Finish feature x", pull=(55, "feature-x", "main"))
    state = await h.state(run_id)
    assert (
        state.run.runtime_state["branch"] == "feature-x" and state.run.protocol_name != "feature-x"
    )
    assert await execute_step(h.ctx, protocol_run_id=run_id, step_index=1) == "needs_qa"
    sha = (await h.state(run_id)).run.head_sha
    assert (
        git("rev-parse", "feature-x", cwd=origin).strip() == sha
    )  # the step went to the PR branch
    name = state.run.protocol_name

    with LiveServer(create_app(h.ctx["settings"])) as server:
        url = f"{server.url}/webhooks/ci"
        async with httpx.AsyncClient(timeout=30) as client:

            async def report(data: dict[str, Any]) -> list[dict[str, Any]]:
                body = json.dumps(data).encode()
                r = await client.post(
                    url, content=body, headers={"X-DeksdenFlow-Signature": sign(body)}
                )
                assert r.status_code == 202, r.text
                handled: list[dict[str, Any]] = (await wait_processed(h, r.json()["id"]))["handled"]
                return handled

            # a graph step's child branch reports to its protocol
            child = await report({"branch": f"{name}--01", "status": "running", "sha": sha})
            assert child[-1] == {"protocol_run_id": run_id, "outcome": "recorded"}
            # the protocol's own name is no branch of this run: nothing is found by it
            own = await report({"branch": name, "status": "success", "sha": sha})
            assert own[-1] == {"ignored": f"no protocol for branch {name!r}"}
            # a run id with a branch it does not commit to is refused
            wrong = await report({"protocol_run_id": run_id, "branch": "main", "status": "success"})
            assert wrong[-1] == {"ignored": f"no protocol for protocol run {run_id}"}
            done = await report({"branch": "feature-x", "status": "success", "sha": sha})
            assert done[-1] == {"protocol_run_id": run_id, "ci": "success", "outcome": "complete"}
    assert (await h.state(run_id)).step(1).status == StepStatus.COMPLETED


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_find_run_by_branch_on_both_databases(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The lookup reads the PR branch out of runtime_state (JSON): the same answers on SQLite
    and Postgres; a branch in two projects needs `project`; a later protocol on one PR wins."""
    from bot.core.settings import Settings
    from bot.handlers.ci_report import CIReport, find_run
    from bot.storage.db import create_database
    from bot.storage.migrate import upgrade_head
    from bot.storage.runs import create_run, get_or_create_project, update_run
    from tests.conftest import _truncate_postgres

    if backend == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        _truncate_postgres(url)
    else:
        url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
        upgrade_head(url)
    db = create_database(Settings(db_url=url, data_dir=tmp_path).async_database_url)
    try:
        a = await get_or_create_project(
            db,
            name="o/a",
            provider="github",
            git_url="https://github.com/o/a.git",
            base_branch="main",
        )
        b = await get_or_create_project(
            db,
            name="o/b",
            provider="github",
            git_url="https://github.com/o/b.git",
            base_branch="main",
        )
        own = await create_run(
            db, project=a, protocol_name="0001-own", description="x", base_branch="main"
        )
        on_pr = await create_run(
            db, project=a, protocol_name="0002-on-pr", description="x", base_branch="main"
        )
        await update_run(db, on_pr.id, runtime_state={"branch": "feature-x"}, pr_number=5)
        other = await create_run(
            db, project=b, protocol_name="0001-own", description="x", base_branch="main"
        )

        async def found(branch: str, project: str | None = None) -> int | None:
            report = CIReport("success", branch, None, None, project, ())
            run = await find_run(db, report)
            return run.id if run is not None else None

        assert await found("feature-x") == on_pr.id
        assert await found("0002-on-pr") is None  # it commits to the PR's branch, not its name
        assert await found("0001-own--03", "o/a") == own.id  # a graph step's child branch
        assert await found("0001-own", "o/b") == other.id
        with pytest.raises(WebhookError) as err:
            await found("0001-own")
        assert err.value.status_code == 409
        assert await found("feature") is None and await found("feature-x--01") is None
        later = await create_run(
            db, project=a, protocol_name="0003-again", description="x", base_branch="main"
        )
        await update_run(db, later.id, runtime_state={"branch": "feature-x"}, pr_number=5)
        assert await found("feature-x") == later.id
    finally:
        await db.dispose()


async def test_ci_hook_without_a_token_is_closed(tmp_path: Path) -> None:
    settings = protocol_settings(tmp_path)
    with LiveServer(create_app(settings)) as server:
        async with httpx.AsyncClient(timeout=30) as client:
            r = await client.post(
                f"{server.url}/webhooks/ci",
                content=b'{"branch": "x", "status": "success"}',
                headers={"X-DeksdenFlow-Token": ""},
            )
    assert r.status_code == 503 and "DEKSDENFLOW_WEBHOOK_TOKEN" in r.json()["error"]


def test_ci_delivery_stores_the_log_without_our_secrets() -> None:
    from bot.domain.secrets_scan import register_secrets

    register_secrets(["worker-secret-in-a-ci-log-0042"])
    body = json.dumps(
        {"branch": "0001-x", "status": "failure", "stage": "test",
         "log": "E   AssertionError\nTOKEN=worker-secret-in-a-ci-log-0042\n"}
    ).encode()  # fmt: skip
    delivery = ci_delivery({"X-DeksdenFlow-Token": TOKEN}, body, TOKEN)
    assert "worker-secret-in-a-ci-log-0042" not in delivery.body
    stored = parse_report(delivery.body.encode())
    assert stored.stage == "test" and "TOKEN=[REDACTED]" in stored.log
    with pytest.raises(WebhookError):
        parse_report(b'{"branch": "0001-x", "status": "failure", "log": 7}')


def test_ci_delivery_keys() -> None:
    body = b'{"branch": "0001-x", "status": "failure", "failing": ["lint"]}'
    first = ci_delivery({"X-DeksdenFlow-Token": TOKEN}, body, TOKEN)
    assert (first.provider, first.event, first.action) == ("ci", "report", "failure")
    assert first.key == ci_delivery({"x-deksdenflow-token": TOKEN}, body, TOKEN).key  # same body
    keyed = ci_delivery(
        {"X-DeksdenFlow-Token": TOKEN, "X-DeksdenFlow-Delivery": "run-7"}, body, TOKEN
    )
    assert keyed.key == "run-7"
    with pytest.raises(WebhookError) as err:
        ci_delivery({"X-DeksdenFlow-Token": TOKEN}, b'{"status": "done"}', TOKEN)
    assert err.value.status_code == 422
