"""Pure policy decisions: QA gate, verdicts, loops, triggers, token budgets and CI results.

Runtime state is the JSON dict a job keeps on ProtocolRun (never mutated here; every decision
returns a new one):

    {"loop_counts": {"<step index>": <loops taken>},
     "ci_fingerprints": {"<step index>": "<fingerprint of the last failing CI>"}}
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.domain.spec import ProtocolSpec, QAPolicy, StepSpec
from bot.domain.states import StepStatus

Verdict = Literal["PASS", "FAIL"]
BudgetMode = Literal["strict", "warn", "off"]
LoopTrigger = Literal["qa_fail", "ci_fail"]
Outcome = Literal["pass", "fail", "complete"]


@dataclass(frozen=True)
class QADecision:
    """What a step becomes after execution, and whether to start QA right away."""

    status: Literal[StepStatus.NEEDS_QA, StepStatus.COMPLETED]
    run_qa: bool
    policy: QAPolicy
    reason: str


def qa_decision(
    step_spec: StepSpec, protocol_spec: ProtocolSpec | None, auto_qa_after_exec: bool
) -> QADecision:
    """QA `skip` completes the step; `light`/`full` leave it in needs_qa.

    `auto_qa_after_exec` only decides whether the QA job is enqueued now or waits for `/qa`;
    the gate itself stays. `step_spec.qa.policy` already carries the protocol default when the
    step had no QA block of its own, so `protocol_spec` is only a fallback for odd callers.
    """
    policy = step_spec.qa.policy or (protocol_spec.qa_policy if protocol_spec else "full")
    if policy == "skip":
        return QADecision(StepStatus.COMPLETED, False, policy, "QA policy is skip")
    if auto_qa_after_exec:
        return QADecision(
            StepStatus.NEEDS_QA, True, policy, f"QA policy is {policy}; running QA now"
        )
    return QADecision(StepStatus.NEEDS_QA, False, policy, f"QA policy is {policy}; waiting for /qa")


# The only two lines that count, and only as the reply's last non-empty line outside a fence.
_VERDICT_LINES: Mapping[str, Verdict] = {"VERDICT: PASS": "PASS", "VERDICT: FAIL": "FAIL"}
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
NO_VERDICT = "no verdict"


def explain_verdict(text: str) -> tuple[Verdict, str]:
    """(verdict, why): strict, because the reply is written by the model under review.

    Only the last non-empty line counts, exactly `VERDICT: PASS` or `VERDICT: FAIL` (trailing
    whitespace aside), and only outside a code fence. Decoration, a `>` quote, a fenced PASS
    followed by a closing fence, or a retraction after the line all give FAIL, "no verdict".
    """
    lines = [line.rstrip() for line in text.splitlines()]
    in_fence = False
    last: tuple[str, bool] | None = None
    for line in lines:
        if _FENCE.match(line):
            in_fence = not in_fence
            last = (line, True)
        elif line.strip():
            last = (line, in_fence)
    if last is None or last[1]:
        return "FAIL", NO_VERDICT
    verdict = _VERDICT_LINES.get(last[0])
    if verdict is None:
        return "FAIL", NO_VERDICT
    return verdict, last[0]


def parse_verdict(text: str) -> Verdict:
    """The QA verdict of a reply; anything but a clean last `VERDICT:` line counts as FAIL."""
    return explain_verdict(text)[0]


@dataclass(frozen=True)
class LoopDecision:
    """Retry (reset `reset_steps` to pending) or block the protocol for a human."""

    action: Literal["retry", "block"]
    reset_steps: list[int]
    new_runtime_state: dict[str, Any]
    reason: str


def _state_copy(runtime_state: Mapping[str, Any] | None) -> dict[str, Any]:
    return copy.deepcopy(dict(runtime_state or {}))


def loop_count(runtime_state: Mapping[str, Any] | None, step_index: int) -> int:
    """How many loops `step_index` has taken so far."""
    counts = (runtime_state or {}).get("loop_counts") or {}
    return int(counts.get(str(step_index), 0))


def loop_decision(
    step_spec: StepSpec, runtime_state: Mapping[str, Any] | None, trigger: LoopTrigger
) -> LoopDecision:
    """After a QA or CI failure: loop back per the step's loop policy, or block.

    Resets back_to..this step, except `skip_steps` (the failing step itself is always redone).
    Bounded by `max_iterations`, counted per failing step.
    """
    state = _state_copy(runtime_state)
    idx = step_spec.index
    loop = step_spec.loop
    if loop is None:
        return LoopDecision(
            "block", [], state, f"step {idx:02d} has no loop policy; {trigger} needs a human"
        )
    if loop.on not in (trigger, "always"):
        return LoopDecision(
            "block", [], state, f"step {idx:02d} loops on {loop.on}, not {trigger}; needs a human"
        )
    used = loop_count(state, idx)
    if used >= loop.max_iterations:
        return LoopDecision(
            "block",
            [],
            state,
            f"step {idx:02d} used all {loop.max_iterations} loop iterations; needs a human",
        )
    start = min(loop.back_to, idx)
    reset = [i for i in range(start, idx + 1) if i == idx or i not in loop.skip_steps]
    state.setdefault("loop_counts", {})[str(idx)] = used + 1
    return LoopDecision(
        "retry",
        reset,
        state,
        f"{trigger} on step {idx:02d}: loop {used + 1}/{loop.max_iterations}, "
        f"back to step {start:02d}",
    )


@dataclass(frozen=True)
class TriggerAction:
    """Run step `step_index` next: inline (same job, at `depth`) or as a new job (depth 0)."""

    step_index: int
    mode: Literal["enqueue", "inline"]
    depth: int
    reason: str


def trigger_decisions(
    step_spec: StepSpec, outcome: Outcome, depth: int, max_inline_depth: int
) -> list[TriggerAction]:
    """The triggers that fire for `outcome`, in spec order.

    `depth` is how deep the current step already runs inline (0 = its own job). An inline
    trigger that would exceed `max_inline_depth` is enqueued instead, so a chain of triggers
    cannot grow one job's stack (or runtime) without bound.
    """
    actions: list[TriggerAction] = []
    for trig in step_spec.triggers:
        if trig.on != outcome:
            continue
        src = f"step {step_spec.index:02d} {outcome} → step {trig.step:02d}"
        if trig.mode == "inline" and depth + 1 <= max_inline_depth:
            actions.append(TriggerAction(trig.step, "inline", depth + 1, f"{src} inline"))
        elif trig.mode == "inline":
            actions.append(
                TriggerAction(
                    trig.step,
                    "enqueue",
                    0,
                    f"{src}: inline depth {depth + 1} exceeds the cap of {max_inline_depth}; "
                    "enqueued instead",
                )
            )
        else:
            actions.append(TriggerAction(trig.step, "enqueue", 0, f"{src} enqueued"))
    return actions


@dataclass(frozen=True)
class BudgetDecision:
    """Whether to go on, and whether to record a budget warning event."""

    allow: bool
    warn: bool
    reason: str


def _unlimited(budget: int | None) -> bool:
    return budget is None or budget <= 0


def _check_mode(mode: str) -> None:
    if mode not in ("strict", "warn", "off"):
        raise ValueError(f"unknown budget mode {mode!r}")


def budget_check_before_step(
    mode: BudgetMode, protocol_used: int, protocol_budget: int | None
) -> BudgetDecision:
    """Before a step starts: is the protocol's token budget already spent?"""
    _check_mode(mode)
    if mode == "off" or _unlimited(protocol_budget):
        return BudgetDecision(True, False, "no protocol budget enforced")
    assert protocol_budget is not None
    if protocol_used < protocol_budget:
        return BudgetDecision(
            True, False, f"{protocol_used}/{protocol_budget} protocol tokens used"
        )
    reason = f"protocol used {protocol_used} of its {protocol_budget} token budget"
    if mode == "strict":
        return BudgetDecision(False, False, reason + "; blocking")
    return BudgetDecision(True, True, reason + "; continuing (warn mode)")


def budget_check_after_step(
    mode: BudgetMode, step_used: int, step_budget: int | None
) -> BudgetDecision:
    """After a step ran: did it exceed its own budget? strict → block the step."""
    _check_mode(mode)
    if mode == "off" or _unlimited(step_budget):
        return BudgetDecision(True, False, "no step budget enforced")
    assert step_budget is not None
    if step_used <= step_budget:
        return BudgetDecision(True, False, f"{step_used}/{step_budget} step tokens used")
    reason = f"step used {step_used} tokens, over its budget of {step_budget}"
    if mode == "strict":
        return BudgetDecision(False, False, reason + "; blocking")
    return BudgetDecision(True, True, reason + "; continuing (warn mode)")


def ci_fingerprint(failing_checks: Iterable[tuple[str, str]]) -> str:
    """A stable id of *which* checks failed *how*: order and duplicates (re-runs) don't matter."""
    items = sorted(
        {(name.strip(), conclusion.strip().lower()) for name, conclusion in failing_checks}
    )
    payload = "\n".join(f"{name}\x1f{conclusion}" for name, conclusion in items)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class CIDecision:
    """What to do with a step after its CI finished."""

    action: Literal["run_qa", "complete", "retry", "block"]
    reason: str
    new_runtime_state: dict[str, Any]
    reset_steps: list[int] = field(default_factory=list)


def ci_decision(
    step_spec: StepSpec,
    runtime_state: Mapping[str, Any] | None,
    result: Literal["success", "failure"],
    fingerprint: str,
    auto_qa_on_ci: bool,
    label: str = "",
) -> CIDecision:
    """Green CI → QA (or complete); red CI → loop per policy, but the same failure twice → block.

    Looping on an identical failure would burn tokens without new information, so a repeated
    fingerprint stops and asks a human.
    """
    state = _state_copy(runtime_state)
    key = str(step_spec.index)
    prints: dict[str, str] = state.setdefault("ci_fingerprints", {})
    if result == "success":
        prints.pop(key, None)
        if auto_qa_on_ci and step_spec.qa.policy != "skip":
            return CIDecision("run_qa", f"CI passed; running {step_spec.qa.policy} QA", state)
        return CIDecision("complete", "CI passed", state)
    if result != "failure":
        raise ValueError(f"unknown CI result {result!r}")
    previous = prints.get(key)
    prints[key] = fingerprint
    if previous == fingerprint:
        what = f"{label} — fingerprint {fingerprint}" if label else fingerprint
        return CIDecision(
            "block",
            f"CI failed the same way twice on step {step_spec.index:02d} ({what}); needs a human",
            state,
        )
    loop = loop_decision(step_spec, state, "ci_fail")
    return CIDecision(loop.action, loop.reason, loop.new_runtime_state, loop.reset_steps)
