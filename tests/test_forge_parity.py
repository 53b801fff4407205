"""One scenario, three forges: GitHub (respx fake), GitLab (fake over HTTP) and Local (records).

plan → approve → run step 1 → CI success → QA PASS → merge. Each forge is driven through its
own entry points (signed deliveries, hooks, the shared command flow in-process for Local) and
the observable results are normalised and compared: the command outcomes, the reactions on the
command comments, the protocol/step/CI/QA events in order, the check names with their final
states per commit, and the final statuses. A user moving between forges must see the same bot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from arq.constants import default_queue_name
from starlette.testclient import TestClient

from bot.domain.states import ProtocolStatus, StepStatus
from bot.handlers.commands_flow import handle_comment
from bot.handlers.forge_events import CommentEvent, RepoInfo
from bot.handlers.router import HandlerContext
from bot.handlers.sansio import IncomingDelivery
from bot.jobs.ci import apply_ci_result, pr_finished
from bot.storage.models import ForgeRecord
from tests.github_e2e.conftest import GitHubLoop, app_key, loop_factory  # noqa: F401 (fixtures)
from tests.gitlab_e2e.conftest import World, fake_gitlab, origin, world_factory  # noqa: F401
from tests.intake.helpers import rows
from tests.protocol.conftest import make_harness, protocol_settings

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
    head = gh.run().run.head_sha
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
    head = world.run().head_sha
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
    settings = protocol_settings(tmp_path, auto_qa_after_exec=False)
    return asyncio.run(_local_flow(settings, origin_path, f"sqlite:///{tmp_path / 'db.sqlite3'}"))


async def _local_flow(settings: Any, origin_path: Path, db_url: str) -> Observed:
    from sqlalchemy import select

    async with make_harness(settings, origin_path) as h:
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
        ci = await apply_ci_result(h.ctx, state.run.id, state.run.head_sha, "success", [])
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
    ("ci.success", 1),
    ("qa.verdict", 1),
    ("step.completed", 1),
    ("protocol.completed", None),
]


@pytest.mark.parametrize("forge", list(DRIVERS))
def test_same_loop_on_every_forge(
    forge: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    seen = DRIVERS[forge](request, tmp_path)
    # what every forge must show on its own
    assert seen["commands"] == EXPECTED_COMMANDS, seen["commands"]
    assert seen["ci"] == ("success", "run_qa")
    assert seen["merge"] == "completed"
    assert seen["reactions"] == [["eyes", "rocket"], ["eyes"], ["eyes", "rocket"]]
    assert seen["checks"] == EXPECTED_CHECKS
    assert seen["final"] == (
        ProtocolStatus.COMPLETED,
        [StepStatus.COMPLETED, StepStatus.PENDING],
        True,
    )
    assert seen["events"] == EXPECTED_EVENTS
    # … and exactly what the other forges showed (whichever ran first is the reference)
    for other, theirs in OBSERVED.items():
        for key in ("commands", "reactions", "checks", "events", "final"):
            assert seen[key] == theirs[key], f"{forge} differs from {other} in {key}"
    OBSERVED[forge] = seen
