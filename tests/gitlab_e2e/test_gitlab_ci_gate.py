"""CI as a gate on the GitLab fake with the product's DEFAULT settings: a repeated red pipeline
is one decision, CI seen once makes the repository a CI repository, green CI completes."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.gitlab_e2e.conftest import World
from tests.intake.helpers import rows


def test_repeated_red_pipeline_is_one_decision_and_ci_then_gates(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory(default_settings=True)
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    world.wait_run("planned", ["pending", "pending"])
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    run_note = world.note("/run-step")
    world.send("Note Hook", run_note)
    # no CI known yet (no .gitlab-ci.yml seen, no pipeline reported): QA alone gates
    run = world.wait_run("running", ["completed", "pending"])
    name = run.protocol_name
    step_sha = json.loads(world.steps()[0].runtime_state)["commit_sha"]

    red = world.pipeline(step_sha, name, "failed", [("test", "failed")])
    first = world.send("Pipeline Hook", red)
    assert {"ci": "failure", "outcome": "reopened"} in world.delivery_result(first["id"])["handled"]
    world.wait_run("blocked", ["blocked", "pending"])
    # the same failure reported again (a retried pipeline on the same sha; an identical resend
    # is already dropped by the intake): no second decision
    repeat = json.loads(json.dumps(red))
    repeat["object_attributes"]["id"] += 1
    again = world.send("Pipeline Hook", repeat)
    assert {"ci": "failure", "outcome": "duplicate"} in world.delivery_result(again["id"])["handled"]
    assert [e.event_type for e in world.events("ci.")] == ["ci.failure", "ci.duplicate"]
    assert rows(world.db_url, "SELECT ci_provider FROM projects")[0][0] == "gitlab-ci"

    # the repository has CI now: after /retry, QA passing is not enough …
    world.send("Note Hook", world.note("/retry 1"))
    world.wait(
        lambda: json.loads(world.steps()[0].runtime_state).get("qa_passed_on") not in (None, step_sha),
        "QA of the retried step",
    )
    world.wait_run("running", ["needs_qa", "pending"])
    new_sha = json.loads(world.steps()[0].runtime_state)["commit_sha"]
    assert new_sha != step_sha
    # … green CI on the step's commit completes it
    green = world.send("Pipeline Hook", world.pipeline(new_sha, name, "success", [("test", "success")]))
    assert {"ci": "success", "outcome": "complete"} in world.delivery_result(green["id"])["handled"]
    world.wait_run("running", ["completed", "pending"])
