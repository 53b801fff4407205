"""A plan whose steps run side by side refuses what its scheduler cannot honour (loops and
triggers), naming the JSON path, instead of ignoring it; a plain chain keeps both."""

from __future__ import annotations

from typing import Any

import pytest

from bot.core.errors import SpecError
from bot.domain.graph import unsupported_in_graph
from bot.domain.spec import validate_spec
from tests.domain.test_domain_graph import spec_data

LOOP = {"max_iterations": 2, "back_to": 1, "on": "qa_fail"}
TRIGGER = {"on": "fail", "step": 1}


def with_extras(data: dict[str, Any], pos: int, **extra: Any) -> dict[str, Any]:
    data["steps"][pos].update(extra)
    return data


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (
            {"loop": LOOP},
            "$.steps[2].loop.back_to: a loop back to an earlier step is not supported in a plan "
            "whose steps run side by side (depends_on)",
        ),
        (
            {"triggers": [TRIGGER, {"on": "pass", "step": 2}]},
            "$.steps[2].triggers[1]: a trigger is not supported",
        ),
    ],
)
def test_a_graph_refuses_loops_and_triggers_with_the_json_path(
    extra: dict[str, Any], error: str
) -> None:
    data = with_extras(spec_data(None, [1], [1]), 2, **extra)
    with pytest.raises(SpecError) as info:
        validate_spec(data)
    assert any(e.startswith(error) for e in info.value.errors), info.value.errors


def test_a_chain_keeps_its_loops_and_triggers() -> None:
    data = with_extras(spec_data(None, None, None), 2, loop=LOOP, triggers=[TRIGGER])
    spec = validate_spec(data)
    assert spec.steps[2].loop is not None and spec.steps[2].triggers


def test_a_graph_keeps_each_step_s_own_fix_loop() -> None:
    fix = {"max_iterations": 3, "on": "qa_fail"}  # back_to defaults to the step itself
    data = with_extras(spec_data(None, [1], [1]), 2, loop=fix)
    assert validate_spec(data).steps[2].loop is not None
    data = with_extras(spec_data(None, [1], [1]), 1, loop={**fix, "back_to": 2})
    assert validate_spec(data).steps[1].loop is not None


def test_the_pure_check_is_quiet_on_chains_and_odd_input() -> None:
    chain: list[dict[str, Any]] = [{"index": 1}, {"index": 2, "loop": LOOP}]
    assert unsupported_in_graph(chain) == []
    assert unsupported_in_graph([{"index": "x", "loop": LOOP}]) == []  # the schema reports it
    graph: list[dict[str, Any]] = [
        {"index": 1},
        {"index": 2, "depends_on": [], "triggers": [TRIGGER]},
    ]
    assert unsupported_in_graph(graph) == [
        "$.steps[1].triggers[0]: a trigger is not supported in a plan whose steps run side by "
        "side (depends_on)"
    ]
