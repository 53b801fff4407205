"""The fix loop on the GitLab fake with the product's DEFAULT settings: a red pipeline's failed
jobs and their traces (fetched through python-gitlab) reach the next attempt's prompt, the fix
goes green and the protocol completes; the same failure twice stops and asks a human."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from bot.domain.states import ProtocolStatus, StepStatus
from engines.base import EngineRequest, EngineResult
from engines.scripted import ScriptedEngine
from tests.gitlab.fake_gitlab import DEFAULT_TOKEN
from tests.gitlab_e2e.conftest import World
from tests.intake.helpers import sync_url

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "ci_logs"


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EngineRequest]]:
    seen: list[EngineRequest] = []
    original = ScriptedEngine.run

    async def run(self: ScriptedEngine, request: EngineRequest) -> EngineResult:
        seen.append(request)
        return await original(self, request)

    monkeypatch.setattr(ScriptedEngine, "run", run)
    yield seen


def executes(prompts: list[EngineRequest], step: int) -> list[str]:
    return [
        r.prompt for r in prompts if r.phase == "execute" and r.context.get("step_index") == step
    ]


def step_state(world: World, index: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(world.steps()[index - 1].runtime_state)
    return data


def has_ci(world: World) -> None:
    """The project has CI (what setup finds from a .gitlab-ci.yml on the base branch)."""
    engine = create_engine(sync_url(world.db_url))
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE projects SET ci_provider = 'gitlab-ci'"))
    finally:
        engine.dispose()


def trace(got: int) -> str:
    """The recorded job trace failing with `expected 3, got <got>`, echoing our GitLab token."""
    raw = (SAMPLES / "gitlab_job_trace.log").read_bytes().decode("utf-8")
    raw = raw.replace(
        "rootdir: /builds/acme/widgets\n",
        f"rootdir: /builds/acme/widgets\nCI_JOB_TOKEN={DEFAULT_TOKEN}\n",
    )
    return raw.replace("got 4", f"got {got}")


def red_pipeline(world: World, sha: str, branch: str, got: int = 4) -> Any:
    pipeline_id = 9000 + len(world.fake.state.jobs)
    world.fake.add_job(world.project, pipeline_id, "lint", "success", "ok\n")
    world.fake.add_job(world.project, pipeline_id, "flaky", "failed", "boom\n", allow_failure=True)
    world.fake.add_job(world.project, pipeline_id, "test", "failed", trace(got))
    payload = world.pipeline(sha, branch, "failed", [("lint", "success"), ("test", "failed")])
    payload["object_attributes"]["id"] = pipeline_id
    answer = world.send("Pipeline Hook", payload)
    return world.delivery_result(answer["id"])["handled"][-1]


def green_pipeline(world: World, sha: str, branch: str) -> Any:
    answer = world.send(
        "Pipeline Hook", world.pipeline(sha, branch, "success", [("test", "success")])
    )
    return world.delivery_result(answer["id"])["handled"][-1]


def step_waiting_for_ci(world: World, index: int, attempt: int) -> str:
    """Until step `index` ran its `attempt` (1-based), passed QA on it and waits for CI."""
    world.wait(
        lambda: (
            world.steps()[index - 1].retries == attempt - 1
            and world.steps()[index - 1].status == StepStatus.NEEDS_QA
            and step_state(world, index).get("qa_passed_on")
            == step_state(world, index).get("commit_sha")
        ),
        f"step {index} attempt {attempt} waiting for CI",
    )
    sha: str = step_state(world, index)["commit_sha"]
    return sha


def started(world_factory: Callable[..., World]) -> tuple[World, str]:
    world = world_factory()
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    run = world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    has_ci(world)
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    world.send("Note Hook", world.note("/run-step"))
    return world, str(run.protocol_name)


def test_red_pipeline_trace_reaches_the_next_attempt_and_the_fix_completes(
    world_factory: Callable[..., World], prompts: list[EngineRequest]
) -> None:
    world, branch = started(world_factory)
    first = step_waiting_for_ci(world, 1, 1)
    assert json.loads(world.steps()[0].policy)["loop"]["max_iterations"] == 2

    assert red_pipeline(world, first, branch) == {"ci": "failure", "outcome": "retry"}
    second_sha = step_waiting_for_ci(world, 1, 2)
    prompt = executes(prompts, 1)[1]
    assert "AssertionError: expected 3, got 4" in prompt
    assert "#### test (failed)" in prompt and "stage: test" in prompt
    assert "flaky" not in prompt  # allowed to fail: not evidence
    assert "section_start" not in prompt and "\x1b[" not in prompt
    # read through python-gitlab's job trace, the failed jobs listed for the pipeline
    assert world.fake.requests_to("GET", "/projects/*/pipelines/*/jobs")
    assert world.fake.requests_to("GET", "/projects/*/jobs/*/trace")
    # the worker's GitLab token is redacted before the prompt and the database
    assert DEFAULT_TOKEN not in prompt and "CI_JOB_TOKEN=[REDACTED" in prompt
    assert DEFAULT_TOKEN not in world.steps()[0].runtime_state
    # the attempt shows in the status note and in the step's commit status
    assert (
        "attempt 2/3: CI failed: test: E AssertionError: expected N, got N"
        in world.status_note()["body"]
    )
    assert any(
        name == "deksdenflow/step-01" and sha == second_sha
        for name, sha, _ in world.fake.statuses()
    )
    descriptions = [
        s.get("description", "")
        for s in world.fake.state.statuses
        if s["name"] == "deksdenflow/step-01"
    ]
    assert any("(attempt 2/3)" in d for d in descriptions)

    assert green_pipeline(world, second_sha, branch) == {"ci": "success", "outcome": "complete"}
    world.wait_run(ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.PENDING])
    world.send("Note Hook", world.note("/run-step"))
    step_two = step_waiting_for_ci(world, 2, 1)
    assert green_pipeline(world, step_two, branch) == {"ci": "success", "outcome": "complete"}
    world.wait_run(ProtocolStatus.COMPLETED, [StepStatus.COMPLETED, StepStatus.COMPLETED])


def test_the_same_failed_pipeline_twice_stops_and_asks_a_human(
    world_factory: Callable[..., World], prompts: list[EngineRequest]
) -> None:
    world, branch = started(world_factory)
    assert (
        red_pipeline(world, step_waiting_for_ci(world, 1, 1), branch, got=4)["outcome"] == "retry"
    )
    assert (
        red_pipeline(world, step_waiting_for_ci(world, 1, 2), branch, got=7)["outcome"] == "block"
    )
    run = world.wait_run(ProtocolStatus.BLOCKED, [StepStatus.FAILED, StepStatus.PENDING])
    message = json.loads(run.runtime_state)["message"]
    digest = json.loads(run.runtime_state)["ci_fingerprints"]["1"]
    assert "CI failed the same way twice on step 01" in message
    assert (
        "test: E AssertionError: expected N, got N" in message
        and f"fingerprint {digest}" in message
    )
    assert (
        "needs a human" in message and "CI failed the same way twice" in world.status_note()["body"]
    )
    assert len(executes(prompts, 1)) == 2
