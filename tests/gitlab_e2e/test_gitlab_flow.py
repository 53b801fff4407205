"""GitLab end to end: webhooks into the app, jobs on the embedded worker, python-gitlab on a fake
GitLab over real HTTP, git against a local bare origin; the same loop as on GitHub."""

from __future__ import annotations

import json
from typing import Any

from bot.domain.rendering import status_marker
from bot.domain.states import ProtocolStatus, StepStatus
from tests.gitlab_e2e.conftest import PROJECT_ID, World
from tests.gitlab_e2e.test_gitlab_fix_loop import has_ci, step_waiting_for_ci
from tests.gitutil import git

NOTES = f"/projects/{PROJECT_ID}/issues/1/notes"


def _plan_and_approve(world: World) -> Any:
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    run = world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    return run


def test_plan_approve_run_qa_ci_merge(world: World) -> None:
    fake = world.fake
    # 1. `/plan` by a Developer: permission looked up, 👀 on the note, planning enqueued.
    plan_note = world.note("/plan")
    answer = world.send("Note Hook", plan_note, **{"X-Gitlab-Event-UUID": "uuid-of-the-delivery"})
    outcome = world.delivery_result(answer["id"])
    assert {"command": "plan", "result": "planning 0001-add-a-greeting"} in outcome["handled"]
    world.wait_reaction(plan_note)
    run = world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    name = run.protocol_name
    assert name == "0001-add-a-greeting"
    assert run.pr_number == 1 and run.pr_url.endswith("/-/merge_requests/1")

    alice_id = world.alice["id"]
    perm = fake.requests_to("GET", "/users")[0]
    assert perm.query["username"] == "alice"
    assert (
        fake.requests_to("GET", f"/projects/{PROJECT_ID}/members/all/{alice_id}")[0].status == 200
    )
    awards = [(a["name"], a["awardable_id"]) for a in fake.state.award_emoji]
    # eyes when the command is taken, rocket once the plan job finished well
    assert awards == [
        ("eyes", plan_note["object_attributes"]["id"]),
        ("rocket", plan_note["object_attributes"]["id"]),
    ]

    # The draft MR: `Draft:` title, the protocol branch into main.
    mr_post = fake.requests_to("POST", f"/projects/{PROJECT_ID}/merge_requests")
    assert len(mr_post) == 1
    assert mr_post[0].json["title"].startswith("Draft: ")
    assert (mr_post[0].json["source_branch"], mr_post[0].json["target_branch"]) == (name, "main")
    mr = fake.state.merge_requests[(PROJECT_ID, 1)]
    assert mr["draft"] is True
    assert f".protocols/{name}/plan.md" in mr["description"]

    # One status note on the issue (edited in place) and one on the MR.
    note = world.status_note()
    assert note["author"]["username"] == "deksdenflow-bot"
    assert status_marker(name) in note["body"]
    assert len(fake.requests_to("POST", NOTES)) == 1
    assert len(fake.requests_to("PUT", f"{NOTES}/*")) >= 1
    mr_notes = [
        n
        for n in fake.notes_of(world.project, "merge_requests", 1)
        if status_marker(name) in n["body"]
    ]
    assert len(mr_notes) == 1

    # 2. `/approve`, then `/run-step`: step 01 runs, its commit status goes running → success;
    # QA follows on its own (the default AUTO_QA_AFTER_EXEC) and, with no CI known for the
    # project yet (no .gitlab-ci.yml seen, no pipeline reported), its PASS completes the step.
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    plan_head = run.head_sha
    run_note = world.note("/run-step")
    world.send("Note Hook", run_note)
    world.wait_reaction(run_note)
    # the step is completed before its QA status is sent and the run's head recorded: wait for
    # the job to get there, then read the head
    world.wait(lambda: len(fake.statuses()) == 6, "QA statuses")
    run = world.wait_run(ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.PENDING])
    step_head = json.loads(world.steps()[0].runtime_state)["commit_sha"]
    qa_head = run.head_sha
    assert plan_head not in (step_head, qa_head) and step_head != qa_head
    assert git("rev-parse", name, cwd=world.origin).strip() == qa_head
    assert git("rev-parse", f"{name}~1", cwd=world.origin).strip() == step_head
    # running on the commit the step started from, closed there with the result (or it would
    # stay running forever), then success on the commit the step made; QA the same way
    assert fake.statuses() == [
        ("deksdenflow/step-01", plan_head, "running"),
        ("deksdenflow/step-01", plan_head, "success"),
        ("deksdenflow/step-01", step_head, "success"),
        ("deksdenflow/qa-01", step_head, "running"),
        ("deksdenflow/qa-01", step_head, "success"),
        ("deksdenflow/qa-01", qa_head, "success"),
    ]
    # the status joined the commit's push pipeline instead of creating an external one
    step_pipeline = fake.state.commits[(PROJECT_ID, step_head)]["last_pipeline"]["id"]
    success = [
        r
        for r in fake.requests_to("POST", f"/projects/{PROJECT_ID}/statuses/{step_head}")
        if r.json["name"] == "deksdenflow/step-01"
    ][-1]
    assert success.json["pipeline_id"] == step_pipeline
    assert ("rocket", run_note["object_attributes"]["id"]) in [
        (a["name"], a["awardable_id"]) for a in fake.state.award_emoji
    ]
    assert [e.message for e in world.events("qa.verdict")] == ["step 01: PASS"]

    # 3. CI: a pipeline for another sha is ignored; success on the step's commit is read and
    # recorded against the step (already completed by its QA) and changes nothing.
    stale = world.send(
        "Pipeline Hook", world.pipeline(plan_head, name, "success", [("test", "success")])
    )
    assert {"ignored": "not a step's commit"} in world.delivery_result(stale["id"])["handled"]
    green = world.send(
        "Pipeline Hook", world.pipeline(step_head, name, "success", [("test", "success")])
    )
    assert {"ci": "success", "outcome": "recorded"} in world.delivery_result(green["id"])["handled"]
    world.wait_run(ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.PENDING])
    assert [e.event_type for e in world.events("ci.")] == ["ci.stale", "ci.success"]
    assert len(fake.statuses()) == 6  # no second QA

    # 4. The MR is merged: the protocol is completed and the status note says so.
    world.send("Merge Request Hook", world.merge_request_event(1, name, "merge"))
    run = world.wait_run("completed")
    world.wait(lambda: "completed" in world.status_note()["body"].lower(), "completed note")

    # Never echo GitLab's recursion-detection header on our own API calls.
    assert all(r.header("X-Gitlab-Event-UUID") is None for r in fake.requests)
    # Every call the bot made succeeded (no 4xx/5xx hidden behind best-effort feedback).
    assert [(r.method, r.path, r.status) for r in fake.requests if r.status >= 400] == []
    assert world.events("feedback.failed") == []


def test_reporter_is_refused_politely_and_nothing_runs(world: World) -> None:
    note = world.note("/plan", user=world.bob)
    answer = world.send("Note Hook", note)
    assert {"command": "plan", "result": "refused", "permission": "read"} in world.delivery_result(
        answer["id"]
    )["handled"]
    replies = world.fake.requests_to("POST", NOTES)
    assert len(replies) == 1
    assert replies[0].json["body"].startswith("Sorry @bob, `/plan` needs the **Developer** role")
    assert world.fake.state.award_emoji == []  # no 👀: the command was not taken
    assert world.run() is None
    assert world.fake.requests_to("POST", f"/projects/{PROJECT_ID}/merge_requests") == []


def test_bot_notes_are_ignored(world: World) -> None:
    note = world.note("/plan", user=world.fake.bot)
    payload = {**note, "user": {**note["user"], "bot": True}}
    answer = world.send("Note Hook", payload)
    assert {"ignored": "comment by a bot"} in world.delivery_result(answer["id"])["handled"]
    assert world.fake.requests == []


def test_rate_limited_call_is_retried_after_retry_after(world: World) -> None:
    award_path = f"{NOTES}/*/award_emoji"
    world.fake.fail(award_path, status=429, retry_after=1, method="POST")
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    world.wait_run("planned")
    awards = world.fake.requests_to("POST", award_path)
    assert [r.status for r in awards][:2] == [429, 201]
    assert (
        awards[0].path == awards[1].path == f"{NOTES}/{note['object_attributes']['id']}/award_emoji"
    )
    assert awards[0].json == awards[1].json == {"name": "eyes"}
    assert [a["name"] for a in world.fake.state.award_emoji] == ["eyes", "rocket"]


def _add_ci_loop(world: World) -> None:
    """Let step 01 loop on CI failures (the scripted plan has no loop policy)."""
    from sqlalchemy import create_engine, text

    run = world.run()
    spec = (
        run.template_config
        if isinstance(run.template_config, dict)
        else json.loads(run.template_config)
    )
    spec["steps"][0]["loop"] = {
        "max_iterations": 3,
        "back_to": 1,
        "skip_steps": [],
        "on": "ci_fail",
    }
    engine = create_engine(world.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE protocol_runs SET template_config = :spec WHERE id = :id"),
                {"spec": json.dumps(spec), "id": run.id},
            )
    finally:
        engine.dispose()


def test_same_pipeline_failure_twice_blocks(world: World) -> None:
    run = _plan_and_approve(world)
    name = run.protocol_name
    _add_ci_loop(world)
    # the project has CI, so the step, QA'd on its own right after it runs, waits for it
    # (without CI known QA's PASS would complete the step before the pipeline reports)
    has_ci(world)
    run_note = world.note("/run-step")
    world.send("Note Hook", run_note)
    world.wait_reaction(run_note)
    first = step_waiting_for_ci(world, 1, attempt=1)

    failing = [("lint", "success"), ("test", "failed")]
    answer = world.send("Pipeline Hook", world.pipeline(first, name, "failed", failing))
    assert {"ci": "failure", "outcome": "retry"} in world.delivery_result(answer["id"])["handled"]
    # the loop re-ran step 01: a new commit, QA'd again, waiting for CI again
    second = step_waiting_for_ci(world, 1, attempt=2)
    assert second != first
    step = world.steps()[0]
    assert step.retries == 1
    feedback = (
        json.loads(step.runtime_state)
        if isinstance(step.runtime_state, str)
        else step.runtime_state
    )["feedback"]
    assert "CI failed: test" in json.dumps(feedback)

    answer = world.send(
        "Pipeline Hook", world.pipeline(second, name, "failed", list(reversed(failing)))
    )
    assert {"ci": "failure", "outcome": "block"} in world.delivery_result(answer["id"])["handled"]
    run = world.wait_run(ProtocolStatus.BLOCKED, [StepStatus.FAILED, StepStatus.PENDING])
    world.wait(
        lambda: "CI failed the same way twice on step 01" in world.status_note()["body"],
        "blocked note",
    )
    assert [e.event_type for e in world.events("ci.")] == ["ci.failure", "ci.failure"]


def test_label_starts_a_protocol_and_closing_the_mr_cancels_it(world: World) -> None:
    answer = world.send("Issue Hook", world.label_event("deksdenflow:plan"))
    assert {
        "label": "deksdenflow:plan",
        "result": "planning 0001-add-a-greeting",
    } in world.delivery_result(answer["id"])["handled"]
    world.wait(lambda: world.run() is not None and world.run().pr_number is not None, "draft MR")
    run = world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    assert world.fake.state.merge_requests[(PROJECT_ID, 1)]["title"].startswith("Draft: ")

    world.send("Merge Request Hook", world.merge_request_event(1, run.protocol_name, "close"))
    world.wait_run("cancelled")


def test_label_by_a_reporter_is_refused(world: World) -> None:
    world.send("Issue Hook", world.label_event("deksdenflow:plan", user=world.bob))
    replies = world.fake.requests_to("POST", NOTES)
    assert [r.json["body"] for r in replies] == [
        "Sorry @bob, the `deksdenflow:plan` label needs write access to start a protocol."
    ]
    assert world.run() is None
