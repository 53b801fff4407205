"""What a CI result means for which step, and whether a step's gates are all green (pure).

A CI result is about one commit. The commits a step owns are its own commit (`commit_sha`,
the bot's `[protocol-NNNN/XX]` commit) and the commit of its QA report (`qa_commit`, which only
adds `quality-report.md`): CI on either judges that step. Any other sha — the plan commit, an
earlier attempt of a step that has been executed again since — is stale and changes nothing.

A step remembers the last CI verdict it was given (`runtime_state["ci"]`: sha, result, the step
commit it judged); a second webhook about the same sha with the same result (GitHub sends
`workflow_run` and `check_suite` for one run, GitLab repeats pipeline hooks) is a duplicate and
makes no second decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bot.domain.policies import QADecision
from bot.domain.states import ProtocolStatus, StepStatus

CIResult = Literal["success", "failure"]
CIAction = Literal["ignore", "stale", "duplicate", "record", "run_qa", "complete", "loop", "reopen"]
GateOutcome = Literal["completed", "waiting-ci", "ci-failed", "already"]

# statuses in which a step's commits are the step's current work (a pending or running step is
# being redone: CI on its previous commit says nothing about the next one)
JUDGED = frozenset(
    {StepStatus.NEEDS_QA, StepStatus.COMPLETED, StepStatus.FAILED, StepStatus.BLOCKED}
)


@dataclass(frozen=True)
class StepCI:
    """What CI decisions need to know about one step (plain values)."""

    index: int
    status: str
    commit_sha: str | None = None
    qa_commit: str | None = None
    qa_passed_on: str | None = None  # the step commit a passing QA of this attempt judged
    qa_policy: str = "full"
    ci: Mapping[str, Any] | None = None  # the last verdict: {"sha", "result", "for_commit"}

    @property
    def commits(self) -> frozenset[str]:
        return frozenset(s for s in (self.commit_sha, self.qa_commit) if s)

    @property
    def qa_passed(self) -> bool:
        """QA passed on this attempt's commit (or the step's QA policy is skip)."""
        if self.qa_policy == "skip":
            return True
        return self.qa_passed_on is not None and self.qa_passed_on == (self.commit_sha or "")

    @property
    def ci_result(self) -> str | None:
        """The CI verdict on this attempt (its own commit or its QA commit), if any."""
        if not self.ci or self.ci.get("for_commit") != (self.commit_sha or ""):
            return None
        result = self.ci.get("result")
        return result if isinstance(result, str) else None


def step_ci(step: Any, qa_policy: str | None = None) -> StepCI:
    """A StepCI from a StepRun row (anything with step_index, status, runtime_state, policy)."""
    rs: Mapping[str, Any] = step.runtime_state or {}
    policy = qa_policy or ((step.policy or {}).get("qa") or {}).get("policy") or "full"

    def text(key: str) -> str | None:
        value = rs.get(key)
        return value if isinstance(value, str) and value else None

    ci = rs.get("ci")
    return StepCI(
        index=step.step_index,
        status=step.status,
        commit_sha=text("commit_sha"),
        qa_commit=text("qa_commit"),
        qa_passed_on=text("qa_passed_on"),
        qa_policy=str(policy),
        ci=ci if isinstance(ci, Mapping) else None,
    )


def step_for_sha(steps: Iterable[StepCI], sha: str) -> StepCI | None:
    """The step that owns commit `sha` (its own commit or its QA-report commit); None if stale."""
    owners = [s for s in steps if sha in s.commits]
    return max(owners, key=lambda s: s.index) if owners else None


def current_step(steps: Sequence[StepCI]) -> StepCI | None:
    """For a report without a sha: the latest step waiting on its gates, else the latest done."""
    judged = [s for s in steps if s.status in (StepStatus.NEEDS_QA, StepStatus.COMPLETED)]
    waiting = [s for s in judged if s.status == StepStatus.NEEDS_QA]
    pool = waiting or judged
    return max(pool, key=lambda s: s.index) if pool else None


def head_of(step: StepCI) -> str | None:
    """The newest commit of a step: its QA report when there is one, else its own commit."""
    return step.qa_commit or step.commit_sha


@dataclass(frozen=True)
class CIMeaning:
    """What one CI result means: the action, the step it is about, and why (for the event)."""

    action: CIAction
    step_index: int | None
    reason: str


def interpret_ci(
    protocol_status: str,
    steps: Sequence[StepCI],
    sha: str,
    result: CIResult,
    *,
    qa_queued: bool,
    auto_qa_on_ci: bool,
    merged: bool = False,
    gates: bool = True,
) -> CIMeaning:
    """Decide what a finished CI run on commit `sha` means.

    `qa_queued`: QA of a freshly executed step is already on its way (AUTO_QA_AFTER_EXEC), so
    green CI must not start a second one. `merged`: the protocol's PR/MR was merged; its branch
    is done and a late red CI is recorded, not reopened. `gates`: CI gates steps here (the
    repository's `policies.ci_gates`, else DEKSDENFLOW_CI_GATES); when not, red CI is recorded.
    """
    if protocol_status in (
        ProtocolStatus.CANCELLED,
        ProtocolStatus.PENDING,
        ProtocolStatus.PLANNING,
    ):
        return CIMeaning("ignore", None, f"protocol is {protocol_status}")
    step = step_for_sha(steps, sha)
    if step is None:
        return CIMeaning("stale", None, f"{sha[:12]} is no step's commit")
    label = f"step {step.index:02d}"
    if step.status not in JUDGED:
        return CIMeaning(
            "stale",
            step.index,
            f"{label} is {step.status} again; CI of {sha[:12]} is for an earlier attempt",
        )
    ci = step.ci or {}
    if (
        ci.get("sha") == sha
        and ci.get("result") == result
        and ci.get("for_commit") == (step.commit_sha or "")
    ):
        return CIMeaning(
            "duplicate", step.index, f"CI {result} on {sha[:12]} was already decided for {label}"
        )
    if result == "success":
        if step.status != StepStatus.NEEDS_QA:
            return CIMeaning("record", step.index, f"CI passed on {label} ({step.status})")
        if step.qa_passed:
            return CIMeaning("complete", step.index, f"CI passed and QA passed: {label} completed")
        if qa_queued:
            return CIMeaning("record", step.index, f"CI passed on {label}; waiting for its QA")
        if auto_qa_on_ci:
            return CIMeaning(
                "run_qa", step.index, f"CI passed; running {step.qa_policy} QA of {label}"
            )
        return CIMeaning("complete", step.index, f"CI passed: {label} completed")
    if step.status in (StepStatus.FAILED, StepStatus.BLOCKED):
        return CIMeaning(
            "record", step.index, f"CI failed on {label}, which is already {step.status}"
        )
    if not gates:
        return CIMeaning(
            "record",
            step.index,
            f"CI failed on {label}; CI does not gate steps here (ci_gates: false)",
        )
    if step.status == StepStatus.NEEDS_QA:
        return CIMeaning("loop", step.index, f"CI failed on {label}")
    # a completed step: its CI turned red after the fact
    if merged:
        return CIMeaning(
            "record", step.index, f"CI failed on {label} after the pull request was merged"
        )
    return CIMeaning(
        "reopen", step.index, f"CI failed on {label} after it completed; {label} is blocked"
    )


def gate_after_qa(step: StepCI, has_ci: bool) -> GateOutcome:
    """QA just passed (or was skipped): may the step complete now?

    Without CI in the repository QA alone gates. With CI, the verdict on this attempt must be
    green; red means the CI path already blocked or looped the step.
    """
    if step.status == StepStatus.COMPLETED:
        return "already"
    if step.status != StepStatus.NEEDS_QA:
        return "ci-failed" if step.ci_result == "failure" else "already"
    if not has_ci:
        return "completed"
    verdict = step.ci_result
    if verdict == "success":
        return "completed"
    if verdict == "failure":
        return "ci-failed"
    return "waiting-ci"


def hold_for_ci(decision: QADecision, has_ci: bool) -> QADecision:
    """After execution: a step whose QA is skipped still waits for CI when the repository has CI."""
    if decision.status == StepStatus.COMPLETED and has_ci:
        return QADecision(
            StepStatus.NEEDS_QA, False, decision.policy, f"{decision.reason}; waiting for CI"
        )
    return decision
