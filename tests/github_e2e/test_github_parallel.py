"""A plan that is a graph on the GitHub fake with the product's DEFAULT settings: two independent
steps run on child branches, CI on each child branch gates its step, the steps are merged, and CI
on the protocol branch completes the protocol (a red result there blocks it, a green re-run of
CI on the same head gets it out)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bot.domain.states import ProtocolStatus, StepStatus
from tests.github_e2e.conftest import GitHubLoop
from tests.gitutil import git
from tests.protocol.conftest import origin_branches, origin_file, scripted_script
from tests.protocol.parallel_support import graph_planning

TWO_ROOTS: list[list[int] | None] = [None, []]  # 01 and 02 depend on nothing: side by side


def graph_loop(tmp_path: Path, loop_factory: Callable[..., GitHubLoop]) -> GitHubLoop:
    steps = {
        f"part-{i}": {
            "message": f"part {i}",
            "files": [{"path": f"part{i}.txt", "content": f"part {i}\n"}],
        }
        for i in (1, 2)
    }
    script = tmp_path / "graph.yml"
    script.write_text(
        yaml.safe_dump(
            scripted_script(planning=graph_planning(TWO_ROOTS, qa="full"), execute={"steps": steps})
        )
    )
    return loop_factory(scripted_script=script)


_RUN_IDS = itertools.count(7_700_000)


def workflow(gh: GitHubLoop, branch: str, sha: str, conclusion: str) -> dict[str, Any]:
    """Actions finished a run on `branch` at `sha` (each call another run: a re-run is new)."""
    gh.ci_suite(conclusion, name="tests")
    payload = gh.workflow_run(branch, sha, conclusion)
    payload["workflow_run"]["id"] = next(_RUN_IDS)
    return gh.deliver("workflow_run", payload)


def test_two_independent_steps_are_gated_by_ci_on_their_branches_and_merged(
    tmp_path: Path, loop_factory: Callable[..., GitHubLoop]
) -> None:
    gh = graph_loop(tmp_path, loop_factory)
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan"))
    gh.deliver("issue_comment", gh.comment("/approve"))
    out = gh.deliver("issue_comment", gh.comment("/run-step next"))  # every ready step: 01 and 02
    assert out["outcome"]["handled"][-1] == {"command": "run-step", "result": "step 1"}, out
    state = gh.run()
    name = state.run.protocol_name
    # both ran on their own child branches, passed QA, and wait for CI there
    assert [s.status for s in state.steps] == [StepStatus.NEEDS_QA, StepStatus.NEEDS_QA], (
        state.run.runtime_state
    )
    assert {f"{name}--01", f"{name}--02"} <= set(origin_branches(gh.origin))
    shas = {i: state.step(i).runtime_state["commit_sha"] for i in (1, 2)}
    for i in (1, 2):
        assert git("branch", "--contains", shas[i], cwd=gh.origin).split()[-1] == f"{name}--0{i}"
    # green CI on 01's child branch completes 01 (and merges it), and nothing of 02
    out = workflow(gh, f"{name}--01", shas[1], "success")
    assert out["outcome"]["handled"][-1]["outcome"] == "complete", out
    state = gh.run()
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED, StepStatus.NEEDS_QA]
    assert origin_file(gh.origin, name, "part1.txt") == "part 1\n"  # merged at once
    out = workflow(gh, f"{name}--02", shas[2], "success")
    assert out["outcome"]["handled"][-1]["outcome"] == "complete", out
    state = gh.run()
    assert [s.status for s in state.steps] == [StepStatus.COMPLETED, StepStatus.COMPLETED]
    assert origin_file(gh.origin, name, "part2.txt") == "part 2\n"
    assert [b for b in origin_branches(gh.origin) if "--" in b] == []  # the child branches are gone
    head = state.run.head_sha
    assert (
        head
        and state.run.runtime_state["awaiting_ci"] == head
        and state.run.status == ProtocolStatus.RUNNING
    )
    assert git("rev-parse", name, cwd=gh.origin).strip() == head
    # red CI on the merged head blocks the protocol; a green re-run of CI on it completes it
    out = workflow(gh, name, head, "failure")
    assert out["outcome"]["handled"][-1]["outcome"] == "blocked", out
    state = gh.run()
    assert state.run.status == ProtocolStatus.BLOCKED
    assert (
        "CI failed on the protocol branch after the steps were merged (tests"
        in state.run.runtime_state["message"]
    )
    out = workflow(gh, name, head, "success")
    assert out["outcome"]["handled"][-1]["outcome"] == "complete", out
    assert gh.run().run.status == ProtocolStatus.COMPLETED
