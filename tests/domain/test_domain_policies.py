"""Policy decisions: QA gate, verdicts, loops, triggers, budgets, CI."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from bot.domain.policies import (
    budget_check_after_step,
    budget_check_before_step,
    ci_decision,
    ci_fingerprint,
    explain_verdict,
    loop_decision,
    parse_verdict,
    qa_decision,
    trigger_decisions,
)
from bot.domain.spec import LoopSpec, OutputsSpec, QASpec, StepSpec, TriggerSpec
from bot.domain.states import StepStatus


def step(
    index: int = 3,
    qa: str = "full",
    loop: LoopSpec | None = None,
    triggers: tuple[TriggerSpec, ...] = (),
) -> StepSpec:
    return StepSpec(
        index=index,
        slug="s",
        title="S",
        file=f"{index:02d}-s.md",
        qa=QASpec(policy=qa),  # type: ignore[arg-type]
        outputs=OutputsSpec(protocol=f".protocols/0001-x/{index:02d}-s.md"),
        loop=loop,
        triggers=triggers,
    )


@pytest.mark.parametrize(
    ("policy", "auto", "status", "run_qa"),
    [
        ("skip", True, StepStatus.COMPLETED, False),
        ("skip", False, StepStatus.COMPLETED, False),
        ("light", True, StepStatus.NEEDS_QA, True),
        ("light", False, StepStatus.NEEDS_QA, False),
        ("full", True, StepStatus.NEEDS_QA, True),
        ("full", False, StepStatus.NEEDS_QA, False),
    ],
)
def test_qa_decision(policy: str, auto: bool, status: str, run_qa: bool) -> None:
    d = qa_decision(step(qa=policy), None, auto)
    assert (d.status, d.run_qa, d.policy) == (status, run_qa, policy)
    assert d.reason


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("All good.\nVERDICT: PASS", "PASS"),
        ("VERDICT: FAIL", "FAIL"),
        ("VERDICT: PASS\r\n", "PASS"),
        ("VERDICT: PASS  \n\n\n", "PASS"),
        ("Report\n```\nlog\n```\n\nVERDICT: PASS", "PASS"),
        ("VERDICT: FAIL\n...\nVERDICT: PASS", "PASS"),
        ("VERDICT: PASS\n...\nVERDICT: FAIL", "FAIL"),
        # anything else is FAIL: decoration, quotes, fences, retractions, near misses
        ("**VERDICT: PASS**", "FAIL"),
        ("`VERDICT: PASS`", "FAIL"),
        ("> VERDICT: PASS", "FAIL"),
        ("## VERDICT: PASS", "FAIL"),
        ("  VERDICT: PASS", "FAIL"),
        ("Verdict: pass", "FAIL"),
        ("VERDICT: PASS.", "FAIL"),
        ("Broken build.\n```\nVERDICT: PASS\n```", "FAIL"),
        ("Broken build.\n```text\nVERDICT: PASS", "FAIL"),  # an unclosed fence
        ("~~~\nVERDICT: PASS\n~~~", "FAIL"),
        ("VERDICT: PASS\n\nActually no: the tests fail. I retract that.", "FAIL"),
        ("VERDICT: PASS\n\nThanks for reading.", "FAIL"),
        ("", "FAIL"),
        ("Looks great, ship it!", "FAIL"),
        ("VERDICT: PASS or FAIL", "FAIL"),
        ("VERDICT: MAYBE", "FAIL"),
        ("VERDICT PASS", "FAIL"),
    ],
)
def test_parse_verdict(text: str, verdict: str) -> None:
    assert parse_verdict(text) == verdict
    got, why = explain_verdict(text)
    assert got == verdict
    if text.strip().endswith("VERDICT: FAIL") and verdict == "FAIL":
        assert why == "VERDICT: FAIL"
    elif verdict == "FAIL":
        assert why == "no verdict"


LOOP = LoopSpec(max_iterations=2, back_to=1, skip_steps=(2,), on="qa_fail")


@pytest.mark.parametrize(
    ("loop", "state", "trigger", "action", "reset", "count"),
    [
        (None, {}, "qa_fail", "block", [], None),
        (LOOP, {}, "qa_fail", "retry", [1, 3], 1),
        (LOOP, {"loop_counts": {"3": 1}}, "qa_fail", "retry", [1, 3], 2),
        (LOOP, {"loop_counts": {"3": 2}}, "qa_fail", "block", [], 2),
        (LOOP, {"loop_counts": {"4": 5}}, "qa_fail", "retry", [1, 3], 1),  # counted per step
        (LOOP, {}, "ci_fail", "block", [], None),  # loops on qa_fail only
        (LoopSpec(1, 3, (), "ci_fail"), {}, "ci_fail", "retry", [3], 1),
        (LoopSpec(1, 2, (), "always"), {}, "qa_fail", "retry", [2, 3], 1),
        (LoopSpec(1, 2, (), "always"), {}, "ci_fail", "retry", [2, 3], 1),
        (
            LoopSpec(3, 1, (3,), "qa_fail"),
            {},
            "qa_fail",
            "retry",
            [1, 2, 3],
            1,
        ),  # self always redone
    ],
)
def test_loop_decision(
    loop: LoopSpec | None,
    state: dict[str, Any],
    trigger: Any,
    action: str,
    reset: list[int],
    count: int | None,
) -> None:
    before = copy.deepcopy(state)
    d = loop_decision(step(loop=loop), state, trigger)
    assert d.action == action
    assert d.reset_steps == reset
    assert d.new_runtime_state.get("loop_counts", {}).get("3") == count
    assert state == before  # input not mutated
    assert d.reason


def test_loop_is_bounded() -> None:
    s = step(loop=LoopSpec(max_iterations=3, back_to=3))
    state: dict[str, Any] = {"other": "kept"}
    actions = []
    for _ in range(5):
        d = loop_decision(s, state, "qa_fail")
        actions.append(d.action)
        state = d.new_runtime_state
    assert actions == ["retry", "retry", "retry", "block", "block"]
    assert state["other"] == "kept"
    assert "3 loop iterations" in loop_decision(s, state, "qa_fail").reason


TRIGGERS = (
    TriggerSpec(on="pass", step=4, mode="inline"),
    TriggerSpec(on="pass", step=5, mode="enqueue"),
    TriggerSpec(on="fail", step=1, mode="inline"),
    TriggerSpec(on="complete", step=6),
)


@pytest.mark.parametrize(
    ("outcome", "depth", "cap", "expected"),
    [
        ("pass", 0, 3, [(4, "inline", 1), (5, "enqueue", 0)]),
        ("pass", 2, 3, [(4, "inline", 3), (5, "enqueue", 0)]),
        ("pass", 3, 3, [(4, "enqueue", 0), (5, "enqueue", 0)]),
        ("pass", 0, 0, [(4, "enqueue", 0), (5, "enqueue", 0)]),
        ("fail", 0, 3, [(1, "inline", 1)]),
        ("fail", 5, 3, [(1, "enqueue", 0)]),
        ("complete", 0, 3, [(6, "enqueue", 0)]),
    ],
)
def test_trigger_decisions(
    outcome: Any, depth: int, cap: int, expected: list[tuple[int, str, int]]
) -> None:
    actions = trigger_decisions(step(triggers=TRIGGERS), outcome, depth, cap)
    assert [(a.step_index, a.mode, a.depth) for a in actions] == expected


def test_trigger_degrade_says_why() -> None:
    [inline_one, _] = trigger_decisions(step(triggers=TRIGGERS), "pass", 3, 3)
    assert inline_one.mode == "enqueue"
    assert "exceeds the cap of 3" in inline_one.reason
    assert trigger_decisions(step(), "pass", 0, 3) == []


@pytest.mark.parametrize(
    ("mode", "used", "budget", "allow", "warn"),
    [
        ("off", 10**9, 10, True, False),
        ("strict", 10**9, None, True, False),
        ("strict", 10**9, 0, True, False),
        ("strict", 99, 100, True, False),
        ("strict", 100, 100, False, False),
        ("strict", 150, 100, False, False),
        ("warn", 99, 100, True, False),
        ("warn", 100, 100, True, True),
        ("warn", 150, 100, True, True),
    ],
)
def test_budget_before_step(
    mode: Any, used: int, budget: int | None, allow: bool, warn: bool
) -> None:
    d = budget_check_before_step(mode, used, budget)
    assert (d.allow, d.warn) == (allow, warn)
    assert d.reason


@pytest.mark.parametrize(
    ("mode", "used", "budget", "allow", "warn"),
    [
        ("off", 10**9, 10, True, False),
        ("strict", 10**9, None, True, False),
        ("warn", 10**9, 0, True, False),
        ("strict", 100, 100, True, False),  # exactly on budget is fine
        ("strict", 101, 100, False, False),
        ("warn", 101, 100, True, True),
        ("warn", 50, 100, True, False),
    ],
)
def test_budget_after_step(
    mode: Any, used: int, budget: int | None, allow: bool, warn: bool
) -> None:
    d = budget_check_after_step(mode, used, budget)
    assert (d.allow, d.warn) == (allow, warn)


def test_budget_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError):
        budget_check_before_step("loose", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        budget_check_after_step("loose", 1, 1)  # type: ignore[arg-type]


def test_ci_fingerprint_is_stable() -> None:
    a = ci_fingerprint([("tests", "failure"), ("lint", "failure")])
    assert a == ci_fingerprint([("lint", "failure"), ("tests", "failure")])
    assert a == ci_fingerprint([("lint", "failure"), ("tests", "failure"), ("tests", "failure")])
    assert a == ci_fingerprint(iter([(" lint ", "FAILURE"), ("tests", "failure")]))
    assert a != ci_fingerprint([("tests", "failure")])
    assert a != ci_fingerprint([("tests", "timed_out"), ("lint", "failure")])
    # Name/conclusion boundaries matter: ("ab", "c") is not ("a", "bc").
    assert ci_fingerprint([("ab", "c")]) != ci_fingerprint([("a", "bc")])
    assert len(a) == 16 and int(a, 16) >= 0


CI_LOOP = LoopSpec(max_iterations=3, back_to=2, on="ci_fail")


@pytest.mark.parametrize(
    ("qa", "auto", "action"),
    [
        ("full", True, "run_qa"),
        ("light", True, "run_qa"),
        ("skip", True, "complete"),
        ("full", False, "complete"),
    ],
)
def test_ci_success(qa: str, auto: bool, action: str) -> None:
    state = {"ci_fingerprints": {"3": "abc"}}
    d = ci_decision(step(qa=qa, loop=CI_LOOP), state, "success", "", auto)
    assert d.action == action
    assert "3" not in d.new_runtime_state["ci_fingerprints"]
    assert state == {"ci_fingerprints": {"3": "abc"}}


def test_ci_same_failure_twice_blocks() -> None:
    s = step(loop=CI_LOOP)
    fp = ci_fingerprint([("tests", "failure")])
    first = ci_decision(s, {}, "failure", fp, True)
    assert first.action == "retry"
    assert first.reset_steps == [2, 3]
    second = ci_decision(s, first.new_runtime_state, "failure", fp, True)
    assert second.action == "block"
    assert "needs a human" in second.reason


def test_ci_different_failures_loop_until_max() -> None:
    s = step(loop=CI_LOOP)
    state: dict[str, Any] = {}
    actions = []
    for n in range(5):
        d = ci_decision(s, state, "failure", ci_fingerprint([(f"check-{n}", "failure")]), True)
        actions.append(d.action)
        state = d.new_runtime_state
    assert actions == ["retry", "retry", "retry", "block", "block"]


def test_ci_failure_without_ci_loop_blocks() -> None:
    d = ci_decision(step(loop=LoopSpec(3, 3, (), "qa_fail")), {}, "failure", "fp", True)
    assert d.action == "block"
    assert d.new_runtime_state["ci_fingerprints"]["3"] == "fp"
    assert ci_decision(step(), {}, "failure", "fp", False).action == "block"


def test_ci_success_between_failures_forgets_the_fingerprint() -> None:
    s = step(loop=CI_LOOP)
    d1 = ci_decision(s, {}, "failure", "fp", True)
    d2 = ci_decision(s, d1.new_runtime_state, "success", "", False)
    d3 = ci_decision(s, d2.new_runtime_state, "failure", "fp", True)
    assert d3.action == "retry"


def test_ci_rejects_unknown_result() -> None:
    with pytest.raises(ValueError):
        ci_decision(step(), {}, "neutral", "fp", True)  # type: ignore[arg-type]
