"""Bounded fix loops and the repository's `policies:` (pure).

Precedence, for every policy: what the protocol's StepSpec says, then `.deksdenflow.yml`
`policies:` on the base branch (stored on the project when a protocol is planned), then the
environment's defaults (DEKSDENFLOW_*). The planner may only lower the loop bound of a step,
never raise it past the repository's or the environment's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.domain.spec import LoopSpec, QAPolicy

DEFAULT_FIX_ATTEMPTS = 2
MAX_FIX_ATTEMPTS = 10
QA_POLICIES = ("skip", "light", "full")


@dataclass(frozen=True)
class RepoPolicies:
    """`policies:` of `.deksdenflow.yml` (None: the file does not say)."""

    qa_policy: QAPolicy | None = None
    max_tokens: int | None = None
    max_tokens_per_step: int | None = None
    max_fix_attempts: int | None = None
    ci_gates: bool | None = None


def _count(value: Any, top: int | None = None) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return min(value, top) if top is not None else value


def repo_policies(project_config: Mapping[str, Any] | None) -> RepoPolicies:
    """The repository's policies from a project's stored config (bad values count as unset)."""
    raw = (project_config or {}).get("policies")
    p: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    qa = p.get("qa_policy")
    gates = p.get("ci_gates")
    return RepoPolicies(
        qa_policy=qa if qa in QA_POLICIES else None,
        max_tokens=_count(p.get("max_tokens")) or None,
        max_tokens_per_step=_count(p.get("max_tokens_per_step")) or None,
        max_fix_attempts=_count(p.get("max_fix_attempts"), MAX_FIX_ATTEMPTS),
        ci_gates=gates if isinstance(gates, bool) else None,
    )


def fix_attempt_bound(planner: int | None, repo: int | None, env: int) -> int:
    """Automatic fix attempts a step gets: the repository's (else the environment's) bound,
    or the planner's choice where it is smaller."""
    bound = repo if repo is not None else env
    bound = max(0, min(bound, MAX_FIX_ATTEMPTS))
    if planner is not None and 0 <= planner < bound:
        return planner
    return bound


def default_loop(step_index: int, bound: int) -> LoopSpec | None:
    """The loop a planned step gets: redo this step on QA FAIL or red CI, `bound` times.
    A bound of 0 means no automatic attempt: the first failure asks a human."""
    if bound <= 0:
        return None
    return LoopSpec(max_iterations=bound, back_to=step_index, on="always")


def qa_policy_for(planner: QAPolicy, repo: QAPolicy | None) -> QAPolicy:
    """A planned step's QA policy: the repository's when it sets one, else the planner's."""
    return repo or planner


def ci_gates(repo: RepoPolicies, env_default: bool) -> bool:
    """Whether green CI is required before a step completes (and red CI loops or blocks)."""
    return repo.ci_gates if repo.ci_gates is not None else env_default


def attempt_text(attempt: int, bound: int | None, why: str | None) -> str:
    """ "attempt 2/3: CI failed: tests — …" for the status comment and the check run."""
    total = f"/{bound + 1}" if bound is not None and attempt <= bound + 1 else ""
    reason = f": {why}" if why else ""
    return f"attempt {attempt}{total}{reason}"
