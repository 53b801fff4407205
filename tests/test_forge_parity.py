"""One scenario, three forges: GitHub (respx fake), GitLab (fake over HTTP) and Local (records).

In a repository with CI, on the product's default settings: plan → approve → run step 1 → QA
PASS (on its own, right after the step) → CI success on the step's commit → merge. Each forge
is driven through its own entry points (signed deliveries, hooks, the shared command flow
in-process for Local) and the observable results are normalised and compared: the command
outcomes, the reactions on the command comments, the protocol/step/CI/QA events in order, the
check names with their final states per commit, and the final statuses. A user moving between
forges must see the same bot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import respx
from arq.constants import default_queue_name
from sqlalchemy import update
from starlette.testclient import TestClient

from bot.forge.base import IssueRef, RepoRef
from bot.forge.github import GitHubForge
from bot.forge.github_client import GitHubClient
from bot.forge.gitlab import GitLabForge
from bot.forge.gitlab_client import GitLabClient
from bot.forge.kinds import KINDS
from bot.forge.local import LocalForge
from bot.handlers.commands_flow import handle_comment
from bot.handlers.forge_events import CommentEvent, RepoInfo
from bot.handlers.router import HandlerContext
from bot.handlers.sansio import IncomingDelivery
from bot.jobs.ci import apply_ci_result, pr_finished
from bot.storage.models import ForgeRecord, Project
from bot.web.app import AppState
from tests.conftest import behaviour_overrides, make_settings
from tests.github_e2e.conftest import API as GH_API
from tests.github_e2e.conftest import GitHubLoop, app_key, loop_factory  # noqa: F401 (fixtures)
from tests.github_e2e.fake_github import APP_ID as GH_APP_ID
from tests.github_e2e.fake_github import FULL_NAME as GH_FULL_NAME
from tests.github_e2e.fake_github import INSTALLATION_ID as GH_INSTALLATION
from tests.github_e2e.fake_github import FakeGitHub
from tests.gitlab.fake_gitlab import FakeGitLab
from tests.gitlab_e2e.conftest import World, fake_gitlab, origin, world_factory  # noqa: F401
from tests.gitlab_e2e.test_gitlab_fix_loop import has_ci
from tests.intake.helpers import rows
from tests.protocol.conftest import make_harness

PROTOCOL = "0001-add-a-greeting"
COMMANDS = ("/plan", "/approve", "/run-step")
TRACKED = ("protocol.", "step.", "ci.", "qa.")

Observed = dict[str, Any]


def _commands(handled: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The command flow's notes (the intake recorder adds its own on the webhook forges)."""
    return [note for note in handled if "command" in note]


# -- normalisation ---------------------------------------------------------------------------


def _events(db_url: str) -> list[tuple[str, int | None]]:
    """(event type, step index) of the protocol, step, CI and QA events, in order."""
    found = rows(
        db_url,
        "SELECT e.event_type, s.step_index FROM events e "
        "LEFT JOIN step_runs s ON s.id = e.step_run_id ORDER BY e.id",
    )
    return [(str(t), i) for t, i in found if str(t).startswith(TRACKED)]


def _final(db_url: str) -> tuple[str, list[str], bool]:
    run = rows(db_url, "SELECT status, approved FROM protocol_runs ORDER BY id DESC LIMIT 1")[0]
    steps = [str(s[0]) for s in rows(db_url, "SELECT status FROM step_runs ORDER BY step_index")]
    return str(run[0]), steps, bool(run[1])


def _checks(reports: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(name, commit, final state) per (name, commit), in first-report order; commits become
    `c0`, `c1`… by first appearance so that different forges' shas compare."""
    final: dict[tuple[str, str], str] = {}
    for name, sha, state in reports:
        final[(name, sha)] = state
    shas: dict[str, str] = {}
    for _, sha in final:
        shas.setdefault(sha, f"c{len(shas)}")
    return [(name, shas[sha], state) for (name, sha), state in final.items()]


STATE = {
    "in_progress": "running",
    "running": "running",
    "pending": "pending",
    "queued": "pending",
    "success": "success",
    "failure": "failure",
    "failed": "failure",
    "canceled": "cancelled",
    "cancelled": "cancelled",
}


# -- GitHub ----------------------------------------------------------------------------------


def _github(request: pytest.FixtureRequest, tmp_path: Path) -> Observed:
    factory: Callable[..., GitHubLoop] = request.getfixturevalue("loop_factory")
    gh = factory()
    gh.deliver("installation", gh.installation_created())
    outcomes: list[Any] = []
    for i, command in enumerate(COMMANDS):
        out = gh.deliver("issue_comment", gh.comment(command, comment_id=6001 + i))
        assert out["status"] == "processed", out
        outcomes.append(_commands(out["outcome"]["handled"]))
    # the repository has CI: project setup found .github/workflows at installation
    project = gh.project()
    assert project is not None and project.ci_provider == "github-actions"
    head = gh.run().step(1).runtime_state["commit_sha"]
    gh.ci_suite("success")
    out = gh.deliver("workflow_run", gh.workflow_run(PROTOCOL, head))
    ci = out["outcome"]["handled"][-1]
    out = gh.deliver(
        "pull_request", gh.pr_closed(PROTOCOL, gh.run().run.pr_number or 0, merged=True)
    )
    merge = out["outcome"]["handled"][-1]["result"]
    gh.wait_idle()

    reactions: dict[int, list[str]] = {6001 + i: [] for i in range(len(COMMANDS))}
    for call in gh.fake.requests("POST", r"/repos/[^/]+/[^/]+/issues/comments/\d+/reactions"):
        reactions[int(call.path.split("/")[-2])].append(call.body["content"])
    reports = [
        (str(r["name"]), str(r["head_sha"]), str(r.get("conclusion") or r["status"]))
        for _, r in sorted(gh.fake.check_runs.items())
    ]
    db_url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    return {
        "overrides": behaviour_overrides(gh.state.settings),
        "commands": outcomes,
        "ci": (ci["ci"], ci["outcome"]),
        "merge": merge,
        "reactions": list(reactions.values()),
        "checks": _checks([(n, s, STATE[st]) for n, s, st in reports]),
        "events": _events(db_url),
        "final": _final(db_url),
    }


# -- GitLab ----------------------------------------------------------------------------------


def _wait_idle(client: TestClient, timeout: float = 30.0) -> None:
    """Until the app's queue stayed empty twice in a row (a job may be between two enqueues)."""
    state = client.app.state.df  # type: ignore[attr-defined]

    async def empty() -> bool:
        return int(await state.redis.zcard(default_queue_name)) == 0

    assert client.portal is not None
    deadline = time.monotonic() + timeout
    calm = 0
    while calm < 3:
        assert time.monotonic() < deadline, "the worker did not go idle in time"
        calm = calm + 1 if client.portal.call(empty) else 0
        time.sleep(0.05)


def _gitlab(request: pytest.FixtureRequest, tmp_path: Path) -> Observed:
    factory: Callable[..., World] = request.getfixturevalue("world_factory")
    world = factory()
    outcomes: list[Any] = []
    notes: list[int] = []
    for command in COMMANDS:
        note = world.note(command)
        notes.append(note["object_attributes"]["id"])
        answer = world.send("Note Hook", note)
        outcomes.append(_commands(world.delivery_result(answer["id"])["handled"]))
        _wait_idle(world.client)
        if command == "/plan":  # the same repository as on GitHub: one with CI
            has_ci(world)
    state: AppState = world.client.app.state.df  # type: ignore[attr-defined]
    head = json.loads(world.steps()[0].runtime_state)["commit_sha"]
    answer = world.send(
        "Pipeline Hook", world.pipeline(head, PROTOCOL, "success", [("test", "success")])
    )
    ci = world.delivery_result(answer["id"])["handled"][-1]
    _wait_idle(world.client)
    answer = world.send(
        "Merge Request Hook", world.merge_request_event(world.run().pr_number, PROTOCOL, "merge")
    )
    merge = world.delivery_result(answer["id"])["handled"][-1]["result"]
    _wait_idle(world.client)

    reactions: dict[int, list[str]] = {n: [] for n in notes}
    for award in world.fake.state.award_emoji:
        reactions[award["awardable_id"]].append(award["name"])
    return {
        "overrides": behaviour_overrides(state.settings),
        "commands": outcomes,
        "ci": (ci["ci"], ci["outcome"]),
        "merge": merge,
        "reactions": list(reactions.values()),
        "checks": _checks([(n, s, STATE[st]) for n, s, st in world.fake.statuses()]),
        "events": _events(world.db_url),
        "final": _final(world.db_url),
    }


# -- Local -----------------------------------------------------------------------------------


def _local(request: pytest.FixtureRequest, tmp_path: Path) -> Observed:
    origin_path: Path = request.getfixturevalue("origin")
    db_url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    # the product's defaults, as on the webhook forges (the local runtime itself turns off the
    # spare worktree: a CLI run is short)
    settings = make_settings(tmp_path, product_defaults=True, db_url=db_url)
    return asyncio.run(_local_flow(settings, origin_path, db_url))


async def _local_flow(settings: Any, origin_path: Path, db_url: str) -> Observed:
    from sqlalchemy import select

    async with make_harness(settings, origin_path) as h:
        # the same repository as on GitHub: one with CI
        async with h.ctx["db"].sessions.begin() as session:
            await session.execute(
                update(Project).where(Project.id == h.project.id).values(ci_provider="local")
            )
        repo = RepoInfo("local", h.project.name, str(origin_path), "main")
        outcomes: list[Any] = []
        for i, command in enumerate(COMMANDS):
            event = CommentEvent(
                repo=repo,
                issue_number=1,
                is_pull=False,
                comment_id=7001 + i,
                body=command,
                author="alice",
                author_is_bot=False,
                issue_title="Add a greeting",
                issue_body="Say hello.",
            )
            delivery = IncomingDelivery("local", f"local-{i}", "comment", None, "{}")
            hctx = HandlerContext(delivery_id=0, delivery=delivery, services=h.ctx)
            await handle_comment(hctx, event)
            outcomes.append(_commands(hctx.outcomes))
            await h.drain()
        state = await h.state(1)
        step_sha = state.step(1).runtime_state["commit_sha"]
        ci = await apply_ci_result(h.ctx, state.run.id, step_sha, "success", [])
        await h.drain()
        merge = await pr_finished(h.ctx, state.run.id, merged=True)
        await h.drain()
        async with h.ctx["db"].sessions() as session:
            records = list(
                (await session.execute(select(ForgeRecord).order_by(ForgeRecord.id))).scalars()
            )
    reactions: dict[int, list[str]] = {7001 + i: [] for i in range(len(COMMANDS))}
    reports: list[tuple[str, str, str]] = []
    for record in records:
        if record.kind == "reaction":
            reactions[int(record.data["comment"])].append(record.body)
        elif record.kind == "check":
            data = record.data
            state_name = str(data.get("conclusion") or data["status"])
            reports.append((str(data["name"]), str(data["head_sha"]), STATE[state_name]))
    return {
        "overrides": behaviour_overrides(settings),
        "commands": outcomes,
        "ci": ("success", ci),
        "merge": merge,
        "reactions": list(reactions.values()),
        "checks": _checks(reports),
        "events": _events(db_url),
        "final": _final(db_url),
    }


# -- the scenario ----------------------------------------------------------------------------

DRIVERS: dict[str, Callable[[pytest.FixtureRequest, Path], Observed]] = {
    "github": _github,
    "gitlab": _gitlab,
    "local": _local,
}
OBSERVED: dict[str, Observed] = {}

EXPECTED_COMMANDS = [
    [{"command": "plan", "result": f"planning {PROTOCOL}"}],
    [{"command": "approve", "result": "approved"}],
    [{"command": "run-step", "result": "step 1"}],
]
EXPECTED_CHECKS = [
    ("deksdenflow/step-01", "c0", "success"),  # opened on the plan commit, closed there
    ("deksdenflow/step-01", "c1", "success"),  # the step's own commit
    ("deksdenflow/qa-01", "c1", "success"),
    ("deksdenflow/qa-01", "c2", "success"),  # the quality-report commit
]
EXPECTED_EVENTS = [
    ("protocol.created", None),
    ("protocol.planning", None),
    ("protocol.planned", None),
    ("protocol.approved", None),
    ("protocol.running", None),
    ("step.running", 1),
    ("step.needs_qa", 1),
    ("qa.verdict", 1),  # QA right after the step (AUTO_QA_AFTER_EXEC) …
    ("step.waiting-ci", 1),  # … passed; the repository has CI, so the step waits for it
    ("ci.success", 1),
    ("step.completed", 1),
    ("protocol.completed", None),
]


@pytest.mark.parametrize("forge", list(DRIVERS))
def test_same_loop_on_every_forge(
    forge: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    seen = DRIVERS[forge](request, tmp_path)
    # every forge on the product's defaults (tests/conftest.py lists the plumbing that may differ)
    assert seen["overrides"] == {}, seen["overrides"]
    # what every forge must show on its own
    assert seen["commands"] == EXPECTED_COMMANDS, seen["commands"]
    assert seen["ci"] == ("success", "complete")
    assert seen["merge"] == "completed"
    assert seen["reactions"] == [["eyes", "rocket"], ["eyes"], ["eyes", "rocket"]]
    assert seen["checks"] == EXPECTED_CHECKS
    assert seen["final"] == ("completed", ["completed", "pending"], True)
    assert seen["events"] == EXPECTED_EVENTS
    # … and exactly what the other forges showed (whichever ran first is the reference)
    for other, theirs in OBSERVED.items():
        for key in ("commands", "reactions", "checks", "events", "final"):
            assert seen[key] == theirs[key], f"{forge} differs from {other} in {key}"
    OBSERVED[forge] = seen


# -- review threads: one question, each forge's own answer ------------------------------------
# A fix step's replies are sent, then the threads resolved; a worker that died between the reply
# and recording it asks which threads already hold the reply. The job asks every forge alike.


async def _github_threads(key: str) -> tuple[set[str], int, set[str]]:
    fake = FakeGitHub("https://github.com/o/r.git")
    fake.pulls[3] = {"number": 3, "node_id": "PR_3", "head": {"ref": "x"}, "base": {"ref": "main"}}
    fake.review_comments[700] = [{"id": 9001, "body": "rename"}, {"id": 9002, "body": "test"}]
    repo = RepoRef("github", GH_FULL_NAME, installation_id=GH_INSTALLATION)
    target = IssueRef(repo, 3, "pull")
    with respx.mock(base_url=GH_API, assert_all_called=False) as mock:
        mock.route().mock(side_effect=fake.respx_handler)
        async with GitHubClient(app_id=GH_APP_ID, private_key=key) as client:
            forge = GitHubForge(client)
            await forge.reply_in_thread(target, "9001", "fixed in abc")
            answered = await forge.answered_threads(target, {"9001", "9002"}, "fixed in abc")
            resolved = await forge.resolve_threads(target, ["9001"], [9001])
    return answered, resolved, fake.resolved_threads


async def _gitlab_threads(fake: FakeGitLab) -> tuple[set[str], int, set[str]]:
    project = fake.add_project("acme/widgets", project_id=7)
    mr = fake.add_merge_request(project, source_branch="0001-x")
    fake.add_discussion(project, mr["iid"], "d1")
    fake.add_discussion(project, mr["iid"], "d2")
    repo = RepoRef("gitlab", "acme/widgets", forge_id="7")
    target = IssueRef(repo, mr["iid"], "merge_request")
    client = GitLabClient(fake.url, fake.token, timeout=5.0)
    try:
        forge = GitLabForge(client)
        await forge.reply_in_thread(target, "d1", "fixed in abc")
        answered = await forge.answered_threads(target, {"d1", "d2"}, "fixed in abc")
        resolved = await forge.resolve_threads(target, ["d1"], [1])
    finally:
        client.close()
    done = {did for (_, _, did), is_resolved in fake.state.discussions.items() if is_resolved}
    return answered, resolved, done


async def _local_threads(tmp_path: Path, origin_path: Path) -> tuple[set[str], int, set[str]]:
    settings = make_settings(
        tmp_path, product_defaults=True, db_url=f"sqlite:///{tmp_path / 'db.sqlite3'}"
    )
    async with make_harness(settings, origin_path) as h:
        forge = LocalForge(h.ctx["db"], h.project.id)
        target = IssueRef(RepoRef("local", str(origin_path)), 3, "pull")
        await forge.reply_in_thread(target, "t1", "fixed in abc")
        await forge.reply_in_thread(target, "t2", "something else")
        answered = await forge.answered_threads(target, {"t1", "t2", "t3"}, "fixed in abc")
        resolved = await forge.resolve_threads(target, ["t1"])
        done = {r.key.partition(":")[2] for r in await forge.records("resolved")}
    return answered, resolved, done


async def test_review_threads_on_every_forge(
    app_key: str,  # noqa: F811 (the fixture imported above)
    fake_gitlab: FakeGitLab,  # noqa: F811
    origin: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # GitHub reads its review threads: the thread replied in is known, the other is not
    assert await _github_threads(app_key) == ({"9001"}, 1, {"PRRT_fake9001"})
    # GitLab does not say (a reply may be sent twice there), and resolves by discussion id
    assert await _gitlab_threads(fake_gitlab) == (set(), 1, {"d1"})
    # Local answers from its records like GitHub
    assert await _local_threads(tmp_path, origin) == ({"t1"}, 1, {"t1"})


def test_every_forge_has_a_kind_row() -> None:
    """The intake, recorder, git_url rule and console look a provider up in KINDS: a forge
    without a row would be served by none of them."""
    for forge in (GitHubForge, GitLabForge, LocalForge):
        kind = KINDS[forge.provider]
        assert kind.name == forge.provider == kind.repo_url.forge
    assert [k.name for k in KINDS.values() if k.checkout_is_origin] == ["local"]
    # only the forges that send webhooks have deliveries to record or pings to answer
    assert {k.name for k in KINDS.values() if k.recorded_events and k.ping_event} == {
        "github",
        "gitlab",
    }
