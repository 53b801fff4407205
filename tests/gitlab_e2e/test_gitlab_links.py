"""DEKSDENFLOW_PUBLIC_URL on GitLab: commit statuses carry target_url to the step's page."""

from __future__ import annotations

from collections.abc import Callable

from bot.domain.states import ProtocolStatus, StepStatus
from tests.gitlab_e2e.conftest import PROJECT_ID, World

PUBLIC = "https://bot.example.com"


def test_commit_statuses_and_status_note_link_to_the_console(
    world_factory: Callable[..., World],
) -> None:
    # links exist only with a PUBLIC_URL (default: none), which is what this test is about
    world = world_factory(public_url=PUBLIC)
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    world.send("Note Hook", world.note("/run-step"))
    run = world.wait_run(ProtocolStatus.RUNNING, [StepStatus.NEEDS_QA, StepStatus.PENDING])
    posts = world.fake.requests_to("POST", f"/projects/{PROJECT_ID}/statuses/*")
    step_page = f"{PUBLIC}/console/protocols/{run.id}/steps/1"
    assert posts and all(p.json["target_url"] == step_page for p in posts)
    body = world.status_note()["body"]
    assert f"({PUBLIC}/console/protocols/{run.id})" in body and f"({step_page})" in body


def test_without_a_public_url_statuses_have_no_target_url(world: World) -> None:
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    world.send("Note Hook", world.note("/run-step"))
    world.wait_run(ProtocolStatus.RUNNING, [StepStatus.NEEDS_QA, StepStatus.PENDING])
    posts = world.fake.requests_to("POST", f"/projects/{PROJECT_ID}/statuses/*")
    assert posts and all("target_url" not in p.json for p in posts)
    assert "/console/" not in world.status_note()["body"]
