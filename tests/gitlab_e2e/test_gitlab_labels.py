"""GitLab: an issue opened with the trigger label already set starts planning, once."""

from __future__ import annotations

import json
from typing import Any

from bot.domain.states import ProtocolStatus, StepStatus
from tests.gitlab_e2e.conftest import SAMPLES, World
from tests.intake.helpers import rows


def opened_with(
    world: World, *labels: str, action: str = "open", updated_at: str = "2026-11-30 08:00:00 UTC"
) -> dict[str, Any]:
    """An Issue Hook as GitLab sends it for a new issue: labels in object_attributes/labels."""
    payload: dict[str, Any] = json.loads((SAMPLES / "issue_hook__1.json").read_text())
    world._project_fields(payload)
    payload["user"] = world._user(world.alice)
    template = payload["labels"][0]
    found = [{**template, "id": 900 + i, "title": t} for i, t in enumerate(labels)]
    payload["object_attributes"].update(
        iid=world.issue["iid"],
        title=world.issue["title"],
        description="Please greet",
        action=action,
        labels=found,
        updated_at=updated_at,
    )
    payload["labels"] = found
    payload.pop("changes", None)
    return payload


def test_issue_opened_with_the_plan_label_plans_once(world: World) -> None:
    answer = world.send("Issue Hook", opened_with(world, "bug", "deksdenflow:plan"))
    assert {
        "label": "deksdenflow:plan",
        "result": "planning 0001-add-a-greeting",
    } in world.delivery_result(answer["id"])["handled"]
    world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    # an update of the issue (title edited) still carries the label: nothing happens
    # (GitLab moves updated_at on every change; the same one again would be a replay)
    update = opened_with(
        world, "bug", "deksdenflow:plan", action="update", updated_at="2026-11-30 08:01:00 UTC"
    )
    update["changes"] = {"title": {"previous": "x", "current": "Add a greeting"}}
    world.send("Issue Hook", update)
    # an update that (again) lists it as added, e.g. removed and re-added: still no second plan
    again = opened_with(
        world, "bug", "deksdenflow:plan", action="update", updated_at="2026-11-30 08:02:00 UTC"
    )
    again["changes"] = {"labels": {"previous": [], "current": again["labels"]}}
    out = world.send("Issue Hook", again)
    assert {
        "label": "deksdenflow:plan",
        "result": "0001-add-a-greeting is already planned",
    } in world.delivery_result(out["id"])["handled"]
    assert len(rows(world.db_url, "SELECT id FROM protocol_runs")) == 1


def test_issue_opened_without_our_label_is_ignored(world: World) -> None:
    answer = world.send("Issue Hook", opened_with(world, "bug"))
    assert {"ignored": "no label of ours"} in world.delivery_result(answer["id"])["handled"]
    assert rows(world.db_url, "SELECT id FROM protocol_runs") == []
