"""The pure mapping, table by table: a workflow's calls → the steps, loops, triggers and
warnings."""

from __future__ import annotations

from typing import Any

import pytest

from bot.codemachine.mapping import build_import, plan_entries
from bot.codemachine.parser import CodeMachineError, load_workspace

AGENTS = """module.exports = [
  { id: 'a', name: 'Agent A', promptPath: 'p/a.md' },
  { id: 'b', name: 'Agent B', promptPath: 'p/b.md', engine: 'claude', model: 'sonnet' },
  { id: 'c', name: 'Agent C', promptPath: 'p/c.md' },
];"""
MODULES = """module.exports = [
  { id: 'loop', promptPath: 'p/loop.md', behavior: { type: 'loop', steps: 2 } },
  { id: 'to-c', promptPath: 'p/t.md', behavior: { type: 'trigger', triggerAgentId: 'c' } },
  { id: 'bare', promptPath: 'p/t.md', behavior: { type: 'trigger' } },
];"""
PROMPTS = {f"p/{n}.md": f"Do {n}." for n in ("a", "b", "c", "loop", "t")}


def workspace(steps: str) -> dict[str, str]:
    flow = f"export default {{ name: 'Flow', steps: [{steps}] }};"
    return {
        "config/main.agents.js": AGENTS,
        "config/modules.js": MODULES,
        "templates/workflows/flow.workflow.js": flow,
        **PROMPTS,
    }


def mapped(steps: str, known: set[str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    ws = load_workspace(workspace(steps))
    plan = build_import(
        ws, "templates/workflows/flow.workflow.js", "0001-flow", engine="scripted",
        known_engines=known or {"scripted"},
    )  # fmt: skip
    return plan.spec["steps"], plan.warnings


@pytest.mark.parametrize(
    ("steps", "entries", "added"),
    [
        ("resolveStep('a')", ["a"], 0),
        ("resolveStep('a'), resolveUI('x'), separator('y'), resolveStep('b')", ["a", "b"], 0),
        # a trigger target outside the workflow is appended as a step of its own, once
        (
            "resolveStep('a'), resolveModule('to-c'), resolveModule('to-c')",
            ["a", "to-c", "to-c", "c"],
            1,
        ),
        # ... but not when the workflow already runs it
        ("resolveStep('c'), resolveModule('to-c')", ["c", "to-c"], 0),
        ("resolveStep('a'), resolveModule('bare')", ["a", "bare"], 0),
    ],
)
def test_plan_entries(steps: str, entries: list[str], added: int) -> None:
    ws = load_workspace(workspace(steps))
    found, _first, warnings = plan_entries(ws, "templates/workflows/flow.workflow.js")
    assert [ident for _fn, ident, _opts in found] == entries
    assert len(warnings) == added


@pytest.mark.parametrize(
    ("steps", "index", "expected"),
    [
        # a plain agent: a work step with the light QA policy
        (
            "resolveStep('a')",
            1,
            {"step_type": "work", "commit_type": "feat", "qa": {"policy": "light"}},
        ),
        # a loop module: full QA, back `steps` steps, bounded by the default iterations
        (
            "resolveStep('a'), resolveStep('c'), resolveModule('loop')",
            3,
            {
                "step_type": "review",
                "loop": {"max_iterations": 5, "back_to": 1, "skip_steps": [], "on": "qa_fail"},
                "qa": {"policy": "full"},
            },
        ),
        # options override the module: one step back, two iterations, executeOnce steps skipped
        (
            "resolveStep('a', { executeOnce: true }), resolveStep('c'), "
            "resolveModule('loop', { loopSteps: 2, loopMaxIterations: 2 })",
            3,
            {"loop": {"max_iterations": 2, "back_to": 1, "skip_steps": [1], "on": "qa_fail"}},
        ),
        # iterations are capped at 50 whatever the workspace says
        (
            "resolveStep('a'), resolveModule('loop', { loopMaxIterations: 900 })",
            2,
            {"loop": {"max_iterations": 50, "back_to": 1, "skip_steps": [], "on": "qa_fail"}},
        ),
        # a trigger module enqueues its target's step when it passes
        (
            "resolveStep('c'), resolveModule('to-c')",
            2,
            {"step_type": "review", "triggers": [{"on": "pass", "step": 1, "mode": "enqueue"}]},
        ),
        # an engine this server has keeps its model, for the step and its QA
        (
            "resolveStep('b')",
            1,
            {"engine": "claude", "model": "sonnet", "qa": {"policy": "light", "model": "sonnet"}},
        ),
        ("resolveStep('a', { agentName: 'Renamed' })", 1, {"title": "Renamed"}),
    ],
)
def test_map_step(steps: str, index: int, expected: dict[str, Any]) -> None:
    found, _warnings = mapped(steps, known={"scripted", "claude"})
    step = found[index - 1]
    for key, value in expected.items():
        if key == "qa":  # the validated spec adds the QA prompt's default
            assert value.items() <= step["qa"].items(), step["qa"]
        else:
            assert step.get(key) == value, (key, step.get(key))


@pytest.mark.parametrize(
    ("steps", "known", "warning"),
    [
        (
            "resolveStep('b')",
            {"scripted"},
            "engine 'claude' is not available here; it runs on scripted",
        ),
        (
            "resolveStep('a'), resolveModule('loop')",
            {"scripted"},
            "no loopMaxIterations; bounded at 5",
        ),
        (
            "resolveStep('a'), resolveModule('bare')",
            {"scripted"},
            "trigger module without triggerAgentId",
        ),
        (
            "resolveStep('a'), resolveModule('to-c')",
            {"scripted"},
            "'c' is not a workflow step: added as step 3",
        ),
    ],
)
def test_warnings(steps: str, known: set[str], warning: str) -> None:
    found, warnings = mapped(steps, known)
    assert any(warning in w for w in warnings), warnings
    if "engine" in warning:
        assert "engine" not in found[0] and "model" not in found[0]


@pytest.mark.parametrize(
    ("steps", "where"),
    [
        ("resolveStep('zz')", "unknown agent 'zz'"),
        ("resolveModule('loop', { loopSteps: 0 })", "loopSteps"),
        ("resolveStep('a', { model: 5 })", "steps[0].model"),
        ("resolveFolder('x')", "resolveFolder() is not supported"),
        ("resolveStep('a', { loopSkip: 'init' })", "loopSkip"),
    ],
)
def test_bad_workflows_name_the_place(steps: str, where: str) -> None:
    with pytest.raises(CodeMachineError) as caught:
        load_workspace(workspace(steps))
    assert where in str(caught.value)
