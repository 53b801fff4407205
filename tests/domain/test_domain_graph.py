"""The step graph: defaults, validation with JSON paths, readiness, the bound, and its Mermaid
picture."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from bot.codemachine.mapping import build_import
from bot.codemachine.parser import load_workspace, select_workflow
from bot.core.errors import SpecError
from bot.domain.graph import (
    StepView,
    active_steps,
    find_cycle,
    graph_errors,
    is_linear,
    mermaid,
    missing_dependencies,
    ready_steps,
    resolve_dependencies,
    to_start,
)
from bot.domain.planning import spec_from_planning
from bot.domain.spec import (
    spec_to_dict,
    validate_planning_output,
    validate_spec,
)
from bot.domain.states import ProtocolStatus, StepStatus
from tests.codemachine.workspace import WORKFLOW, workspace_files

DIAMOND = {1: (), 2: (1,), 3: (1,), 4: (2, 3)}


def spec_data(*deps: list[int] | None) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for i, d in enumerate(deps, start=1):
        step: dict[str, Any] = {
            "index": i,
            "slug": f"s{i}",
            "title": f"Step {i}",
            "file": f"{i:02d}-s{i}.md",
        }
        if d is not None:
            step["depends_on"] = d
        steps.append(step)
    return {
        "version": 1,
        "protocol": "0001-graph",
        "task": "graph",
        "engine": "codex",
        "steps": steps,
    }


def planning(*deps: list[int] | str | None) -> dict[str, Any]:
    steps = []
    for i, d in enumerate(deps, start=1):
        step: dict[str, Any] = {
            "slug": f"s{i}",
            "title": f"S{i}",
            "content": "c",
            "commit_type": "feat",
            "qa_policy": "skip",
        }
        if d != "absent":
            step["depends_on"] = d
        steps.append(step)
    return {"title": "t", "plan": "p", "context": "", "log": "", "setup": "s", "steps": steps}


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([(1, None), (2, None), (3, None)], {1: (), 2: (1,), 3: (2,)}),
        ([(1, None), (2, [1]), (3, [1]), (4, [2, 3])], DIAMOND),
        ([(1, []), (2, []), (3, None)], {1: (), 2: (), 3: (2,)}),
        ([(1, None), (2, [1, 1])], {1: (), 2: (1,)}),
    ],
    ids=["chain-by-default", "diamond", "roots-and-default", "duplicates"],
)
def test_resolve_dependencies(
    nodes: list[tuple[int, list[int] | None]], expected: dict[int, tuple[int, ...]]
) -> None:
    assert resolve_dependencies(nodes) == expected


@pytest.mark.parametrize(
    ("deps", "expected"),
    [
        ([None, None, None], []),
        ([None, [1], [1], [2, 3]], []),
        ([None, [3], [2]], ["$.steps[1].depends_on: dependency cycle 2 → 3 → 2"]),
        ([[9], None], ["$.steps[0].depends_on[0]: no step with id 9"]),
        ([None, [2]], ["$.steps[1].depends_on[0]: step 2 depends on itself"]),
        (
            [[2], [1]],
            [
                "$.steps[0].depends_on: dependency cycle 1 → 2 → 1",
                "$.steps: no step without dependencies; the protocol would have nowhere to start",
            ],
        ),
    ],
    ids=["chain", "diamond", "cycle", "unknown", "self", "no-root-cycle"],
)
def test_graph_errors(deps: list[list[int] | None], expected: list[str]) -> None:
    assert graph_errors([(i, d) for i, d in enumerate(deps, start=1)]) == expected


def test_no_root_is_named() -> None:
    # every step depends on something, and the graph has no cycle: impossible once ids are
    # known, so the rule is checked on the resolved graph of a cycle-free input too
    assert find_cycle({1: (2,), 2: ()}) == []
    errors = graph_errors([(1, [2]), (2, [1])])
    assert any("no step without dependencies" in e for e in errors)


@pytest.mark.parametrize(
    ("deps", "message"),
    [
        ([None, [3], [2]], "$.steps[1].depends_on: dependency cycle 2 → 3 → 2"),
        ([None, [7]], "$.steps[1].depends_on[0]: no step with id 7"),
    ],
    ids=["cycle", "unknown"],
)
def test_spec_rejects_bad_graphs_with_the_json_path(
    deps: list[list[int] | None], message: str
) -> None:
    with pytest.raises(SpecError) as info:
        validate_spec(spec_data(*deps))
    assert message in info.value.errors, info.value.errors


@pytest.mark.parametrize(
    ("deps", "message"),
    [
        ([None, [3], [2]], "$.steps[1].depends_on: dependency cycle 2 → 3 → 2"),
        ([None, [4]], "$.steps[1].depends_on[0]: no step with id 4"),
        ([None, [0]], "$.steps[1].depends_on[0]: 0 is less than the minimum of 1"),
        ([None, "two"], "$.steps[1].depends_on: 'two' is not of type 'array', 'null'"),
    ],
    ids=["cycle", "unknown", "zero", "not-a-list"],
)
def test_planning_rejects_bad_graphs(deps: list[Any], message: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_planning_output(planning(*deps))
    assert message in info.value.errors, info.value.errors


def test_a_plan_without_depends_on_is_a_chain_and_round_trips_unchanged() -> None:
    out = validate_planning_output(planning("absent", "absent", "absent"))
    spec = spec_from_planning("0001-graph", "graph", out)
    assert spec.dependencies() == {1: (), 2: (1,), 3: (2,)}
    assert all("depends_on" not in s for s in spec_to_dict(spec)["steps"])  # stored as before
    assert is_linear(spec.dependencies(), [1, 2, 3])


def test_a_planned_diamond_reaches_the_spec() -> None:
    spec = spec_from_planning(
        "0001-graph", "graph", validate_planning_output(planning(None, [1], [1], [2, 3]))
    )
    assert spec.dependencies() == DIAMOND
    assert validate_spec(spec_to_dict(spec)).dependencies() == DIAMOND
    assert not is_linear(spec.dependencies(), [1, 2, 3, 4])


def test_codemachine_depends_on_maps_agent_ids() -> None:
    files = workspace_files()
    path = "templates/workflows/greeting.workflow.js"
    files[path] = WORKFLOW.replace(
        "resolveStep('task-sanity-check', { model: 'sonnet', agentName: 'Reviewer' })",
        "resolveStep('task-sanity-check', "
        "{ model: 'sonnet', agentName: 'Reviewer', dependsOn: ['init'] })",
    )
    ws = load_workspace(files)
    # its loop module goes back over earlier steps, which a graph cannot run: refused, by path
    with pytest.raises(
        SpecError, match=r"\$\.steps\[\d\]\.loop\.back_to: a loop back to an earlier step"
    ):
        build_import(
            ws,
            select_workflow(ws, None),
            "0001-add-a-greeting",
            engine="scripted",
            known_engines={"scripted"},
        )
    # without its loop and trigger modules the graph is imported
    kept = [line for line in files[path].splitlines() if "resolveModule(" not in line]
    files[path] = "\n".join(kept) + "\n"
    ws = load_workspace(files)
    plan = build_import(
        ws,
        select_workflow(ws, None),
        "0001-add-a-greeting",
        engine="scripted",
        known_engines={"scripted"},
    )
    spec = validate_spec(copy.deepcopy(plan.spec))
    assert spec.step(3).depends_on == (1,)
    assert spec.dependencies()[3] == (1,) and spec.dependencies()[2] == (1,)


def views(**statuses: str) -> dict[int, StepView]:
    return {int(k[1:]): StepView(v) for k, v in statuses.items()}


@pytest.mark.parametrize(
    ("steps", "ready"),
    [
        (
            views(
                s1=StepStatus.PENDING,
                s2=StepStatus.PENDING,
                s3=StepStatus.PENDING,
                s4=StepStatus.PENDING,
            ),
            [1],
        ),
        (
            views(
                s1=StepStatus.COMPLETED,
                s2=StepStatus.PENDING,
                s3=StepStatus.PENDING,
                s4=StepStatus.PENDING,
            ),
            [2, 3],
        ),
        (
            views(
                s1=StepStatus.COMPLETED,
                s2=StepStatus.COMPLETED,
                s3=StepStatus.RUNNING,
                s4=StepStatus.PENDING,
            ),
            [],
        ),
        (
            views(
                s1=StepStatus.COMPLETED,
                s2=StepStatus.COMPLETED,
                s3=StepStatus.COMPLETED,
                s4=StepStatus.PENDING,
            ),
            [4],
        ),
        (
            views(
                s1=StepStatus.COMPLETED,
                s2=StepStatus.FAILED,
                s3=StepStatus.COMPLETED,
                s4=StepStatus.PENDING,
            ),
            [],
        ),
    ],
    ids=["start", "fan-out", "waits-for-both", "fan-in", "failed-dependency"],
)
def test_ready_steps(steps: dict[int, StepView], ready: list[int]) -> None:
    assert ready_steps(DIAMOND, steps) == ready


def test_a_completed_step_not_merged_yet_does_not_count() -> None:
    steps = {
        1: StepView(StepStatus.COMPLETED),
        2: StepView(StepStatus.COMPLETED, integrated=False),
        3: StepView(StepStatus.COMPLETED),
        4: StepView(StepStatus.PENDING),
    }
    assert ready_steps(DIAMOND, steps) == []
    assert missing_dependencies(DIAMOND, steps, 4) == (2,)
    assert active_steps(steps) == [2]


def test_the_bound() -> None:
    assert to_start([2, 3, 4], active=1, bound=3) == [2, 3]
    assert to_start([2, 3], active=3, bound=3) == []
    assert to_start([2, 3], active=0, bound=1) == [2]


def test_mermaid_shows_every_node_state_and_edge() -> None:
    steps = {
        1: StepView(StepStatus.COMPLETED),
        2: StepView(StepStatus.RUNNING),
        3: StepView(StepStatus.FAILED),
        4: StepView(StepStatus.PENDING),
    }
    text = mermaid(DIAMOND, steps, {1: "Model", 2: 'Evil"] --> x', 3: "View", 4: "Docs"})
    assert text.startswith("flowchart TD")
    assert 's1["01 Model<br/>completed"]' in text
    assert "s2 --> s4" in text and "s3 --> s4" in text and "s1 --> s2" in text
    assert "class s2 running" in text and "class s3 failed" in text
    assert '"]' not in text.split("\n")[2][:-2]  # a title cannot close the node's label


def test_the_status_comment_draws_a_graph_above_the_table() -> None:
    from bot.domain.rendering import ProtocolView, status_comment
    from bot.domain.rendering import StepView as RowView

    steps = {
        1: StepView(StepStatus.COMPLETED),
        2: StepView(StepStatus.RUNNING),
        3: StepView(StepStatus.RUNNING),
        4: StepView(StepStatus.PENDING),
    }
    picture = mermaid(DIAMOND, steps, {i: f"Part {i}" for i in DIAMOND})
    rows = tuple(RowView(index=i, title=f"Part {i}", status=v.status) for i, v in steps.items())
    body = status_comment(
        ProtocolView(name="0001-graph", status=ProtocolStatus.RUNNING, steps=rows, graph=picture)
    )
    assert "```mermaid\nflowchart TD" in body and "s1 --> s2" in body
    assert body.index("```mermaid") < body.index("**Steps**")
    plain = status_comment(
        ProtocolView(name="0001-graph", status=ProtocolStatus.RUNNING, steps=rows)
    )
    assert "mermaid" not in plain  # a chain's comment is as before


def test_the_console_gets_the_graph_with_columns_and_states() -> None:
    from bot.storage.models import ProtocolRun, StepRun
    from bot.web.console_steps import graph_nodes

    config = spec_data(None, [1], [1], [2, 3])
    run = ProtocolRun(template_config=config)
    statuses = [StepStatus.COMPLETED, StepStatus.RUNNING, StepStatus.COMPLETED, StepStatus.PENDING]
    steps = [
        StepRun(step_index=i, step_name=f"{i:02d}-s{i}", summary=f"Step {i}", status=st, retries=0,
                runtime_state={"integrated_attempt": 0} if i == 1 else {})
        for i, st in enumerate(statuses, start=1)
    ]  # fmt: skip
    nodes = graph_nodes(run, steps)
    assert [
        (n["index"], n["column"], n["depends_on"], n["status"], n["merged"]) for n in nodes
    ] == [
        (1, 0, [], StepStatus.COMPLETED, True),
        (2, 1, [1], StepStatus.RUNNING, False),
        (3, 1, [1], StepStatus.COMPLETED, False),
        (4, 2, [2, 3], StepStatus.PENDING, False),
    ]
    assert graph_nodes(ProtocolRun(template_config=spec_data(None, None)), steps[:2]) == []


def test_a_repository_may_set_its_bound() -> None:
    from bot.storage.repo_config import parse_repo_config

    assert parse_repo_config("policies:\n  max_parallel_steps: 2\n")["policies"] == {
        "max_parallel_steps": 2
    }
    with pytest.raises(
        SpecError, match=r"policies\.max_parallel_steps: must be a whole number from 1 to 32"
    ):
        parse_repo_config("policies:\n  max_parallel_steps: 0\n")
