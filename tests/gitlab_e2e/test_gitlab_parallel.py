"""A plan that is a graph on the GitLab fake with the product's DEFAULT settings: two independent
steps run on child branches, a Pipeline Hook on each child branch gates its step, the steps are
merged, and pipelines on the protocol branch complete the protocol (red blocks it, a green
re-run on the same head gets it out)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, text

from bot.domain.states import ProtocolStatus, StepStatus
from tests.gitlab_e2e.conftest import World
from tests.gitutil import git
from tests.intake.helpers import sync_url
from tests.protocol.conftest import origin_branches, origin_file, scripted_script
from tests.protocol.parallel_support import graph_planning

_PIPELINE_IDS = itertools.count(880_000)


def graph_world(tmp_path: Path, world_factory: Callable[..., World]) -> World:
    steps = {
        f"part-{i}": {
            "message": f"part {i}",
            "files": [{"path": f"part{i}.txt", "content": f"part {i}\n"}],
        }
        for i in (1, 2)
    }
    script = tmp_path / "graph.yml"
    planning = graph_planning([None, []], qa="full")  # 01 and 02 depend on nothing
    script.write_text(yaml.safe_dump(scripted_script(planning=planning, execute={"steps": steps})))
    return world_factory(scripted_script=script)


def pipeline(world: World, ref: str, sha: str, status: str) -> Any:
    """A pipeline on `ref` at `sha` finished (each call another pipeline: a re-run is new)."""
    payload = world.pipeline(sha, ref, status, [("test", status)])
    payload["object_attributes"]["id"] = next(_PIPELINE_IDS)
    answer = world.send("Pipeline Hook", payload)
    return world.delivery_result(answer["id"])["handled"]


def runtime(world: World) -> dict[str, Any]:
    raw = world.run().runtime_state
    return dict(json.loads(raw) if isinstance(raw, str) else raw or {})


def test_two_independent_steps_are_gated_by_pipelines_on_their_branches_and_merged(
    tmp_path: Path, world_factory: Callable[..., World]
) -> None:
    world = graph_world(tmp_path, world_factory)
    note = world.note("/plan")
    world.send("Note Hook", note)
    world.wait_reaction(note)
    world.wait_run(ProtocolStatus.PLANNED, [StepStatus.PENDING, StepStatus.PENDING])
    engine = create_engine(sync_url(world.db_url))  # a repository with CI (.gitlab-ci.yml)
    with engine.begin() as conn:
        conn.execute(text("UPDATE projects SET ci_provider = 'gitlab-ci'"))
    engine.dispose()
    world.send("Note Hook", world.note("/approve"))
    world.wait(lambda: bool(world.run().approved), "approval")
    world.send("Note Hook", world.note("/run-step next"))
    run = world.wait_run(ProtocolStatus.RUNNING, [StepStatus.NEEDS_QA, StepStatus.NEEDS_QA])
    name = run.protocol_name
    world.wait(
        lambda: all(json.loads(s.runtime_state).get("qa_verdict") == "PASS" for s in world.steps()),
        "both QAs",
    )
    shas = [json.loads(s.runtime_state)["commit_sha"] for s in world.steps()]
    assert {f"{name}--01", f"{name}--02"} <= set(origin_branches(world.origin))

    assert {"ci": "success", "outcome": "complete"} in pipeline(
        world, f"{name}--01", shas[0], "success"
    )
    world.wait_run(ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.NEEDS_QA])
    assert origin_file(world.origin, name, "part1.txt") == "part 1\n"
    assert {"ci": "success", "outcome": "complete"} in pipeline(
        world, f"{name}--02", shas[1], "success"
    )
    world.wait_run(ProtocolStatus.RUNNING, [StepStatus.COMPLETED, StepStatus.COMPLETED])
    assert origin_file(world.origin, name, "part2.txt") == "part 2\n"
    assert [b for b in origin_branches(world.origin) if "--" in b] == []
    head = world.run().head_sha
    assert runtime(world)["awaiting_ci"] == head == git("rev-parse", name, cwd=world.origin).strip()

    assert {"ci": "failure", "outcome": "blocked"} in pipeline(world, name, head, "failed")
    world.wait_run(ProtocolStatus.BLOCKED)
    assert (
        "CI failed on the protocol branch after the steps were merged" in runtime(world)["message"]
    )
    assert {"ci": "success", "outcome": "complete"} in pipeline(world, name, head, "success")
    world.wait_run(ProtocolStatus.COMPLETED)
