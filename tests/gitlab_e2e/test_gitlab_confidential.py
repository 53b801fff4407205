"""Confidential issues: GitLab sends `Confidential Note Hook` / `Confidential Issue Hook`, and the
bot treats them like their public counterparts."""

from __future__ import annotations

from bot.domain.states import ProtocolStatus, StepStatus
from tests.gitlab_e2e.conftest import World


def test_confidential_note_runs_the_command(world: World) -> None:
    note = world.note("/plan")
    note["issue"]["confidential"] = True
    answer = world.send("Confidential Note Hook", note)
    outcome = world.delivery_result(answer["id"])
    assert {"command": "plan", "result": "planning 0001-add-a-greeting"} in outcome["handled"]
    world.wait_reaction(note)
    world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])


def test_confidential_issue_label_starts_a_protocol(world: World) -> None:
    event = world.label_event("deksdenflow:plan")
    event["object_attributes"]["confidential"] = True
    answer = world.send("Confidential Issue Hook", event)
    assert {
        "label": "deksdenflow:plan",
        "result": "planning 0001-add-a-greeting",
    } in world.delivery_result(answer["id"])["handled"]
    world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
