"""CI as a gate on the GitLab fake with the product's DEFAULT settings: a repeated red pipeline
is one decision, CI seen once makes the repository a CI repository, green CI completes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from bot.domain.states import ProtocolStatus, StepStatus
from tests.gitlab_e2e.conftest import World
from tests.intake.helpers import rows


def test_repeated_red_pipeline_is_one_decision_and_ci_then_gates(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory()
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    run_note = world.note("/run-step")
    world.send("Note Hook", run_note)
    # no CI known yet (no .gitlab-ci.yml seen, no pipeline reported): QA alone gates
    run = world.wait_run(ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.PENDING])
    name = run.protocol_name
    step_sha = json.loads(world.steps()[0].runtime_state)["commit_sha"]

    red = world.pipeline(step_sha, name, "failed", [("test", "failed")])
    first = world.send("Pipeline Hook", red)
    assert {"ci": "failure", "outcome": "reopened"} in world.delivery_result(first["id"])["handled"]
    world.wait_run(ProtocolStatus.BLOCKED, [StepStatus.BLOCKED, StepStatus.PENDING])
    # the same failure reported again (a retried pipeline on the same sha; an identical resend
    # is already dropped by the intake): no second decision
    repeat = json.loads(json.dumps(red))
    repeat["object_attributes"]["id"] += 1
    again = world.send("Pipeline Hook", repeat)
    assert {"ci": "failure", "outcome": "duplicate"} in world.delivery_result(again["id"])[
        "handled"
    ]
    assert [e.event_type for e in world.events("ci.")] == ["ci.failure", "ci.duplicate"]
    assert rows(world.db_url, "SELECT ci_provider FROM projects")[0][0] == "gitlab-ci"

    # the repository has CI now: after /retry, QA passing is not enough …
    world.send("Note Hook", world.note("/retry 1"))
    world.wait(
        lambda: (
            json.loads(world.steps()[0].runtime_state).get("qa_passed_on") not in (None, step_sha)
        ),
        "QA of the retried step",
    )
    world.wait_run(ProtocolStatus.RUNNING, [StepStatus.NEEDS_QA, StepStatus.PENDING])
    new_sha = json.loads(world.steps()[0].runtime_state)["commit_sha"]
    assert new_sha != step_sha
    # … green CI on the step's commit completes it
    green = world.send(
        "Pipeline Hook", world.pipeline(new_sha, name, "success", [("test", "success")])
    )
    assert {"ci": "success", "outcome": "complete"} in world.delivery_result(green["id"])["handled"]
    world.wait_run(ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.PENDING])


def step_completed(world: World, step: int) -> Callable[[], bool]:
    return lambda: world.step_statuses()[step - 1] == StepStatus.COMPLETED


def test_a_step_edits_the_status_notes_by_id_and_completion_edits_them_once(
    world_factory: Callable[..., World],
) -> None:
    """Forge requests per step: the status note's id is remembered (no listing of the thread's
    notes before each edit), and the last step's QA pass leaves the note to the protocol's
    completion, which follows at once (one edit per note, not two in a row)."""
    world = world_factory()
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    for step in (1, 2):
        before = len(world.fake.requests)
        ask = world.note(f"/run-step {step}")
        world.send("Note Hook", ask)
        world.wait_reaction(ask)
        world.wait(step_completed(world, step), f"step {step} QA'd")

        def edits(since: int = before) -> list[tuple[str, str]]:
            calls = [(r.method, r.path) for r in world.fake.requests[since:]]
            assert not [c for c in calls if c[0] == "GET" and c[1].endswith("/notes")], calls
            return [c for c in calls if c[0] == "PUT" and "/notes/" in c[1]]

        # the issue's note and the MR's: after the step executed and after its QA (step 01);
        # after it executed and at the completion (step 02, whose QA pass completes the protocol)
        world.wait(lambda: len(edits()) >= 4, "the status notes edited")
        time.sleep(0.5)  # a fifth edit would come right after
        assert len(edits()) == 4, edits()
    world.wait_run(ProtocolStatus.COMPLETED, [StepStatus.COMPLETED, StepStatus.COMPLETED])
    assert "completed" in world.status_note()["body"]


def test_a_deleted_status_note_is_posted_again(world_factory: Callable[..., World]) -> None:
    world = world_factory()
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    status = world.status_note()
    notes = world.fake.state.notes[(world.project["id"], "issues", world.issue["iid"])]
    notes.remove(status)  # someone deleted it: the remembered id answers 404
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    ask = world.note("/run-step")
    world.send("Note Hook", ask)
    world.wait_reaction(ask)
    assert world.status_note()["id"] != status["id"]  # found missing, posted anew, one note
