"""Protocol jobs, re-exported: the step runner lives in plan, execute, quality and advance.

plan_protocol  (plan.py)     one planning call, decompose calls, plan committed and pushed
execute_step   (execute.py)  one step's engine call, its commit (once), push, outcome
run_quality    (quality.py)  the QA call, its report, the verdict (loop, block or pass)
advance.py                   what follows a step: QA, triggers, next step, completion
boundary.py / outcome.py     the lease and error boundary; the one outcome writer
"""

from __future__ import annotations

from bot.jobs.advance import after_step_completed, enqueue_next_step
from bot.jobs.engine_run import run_engine
from bot.jobs.env import JobEnv
from bot.jobs.execute import execute_step
from bot.jobs.plan import SPEC_FILE, plan_protocol, planning_schema, protocol_files, step_marker
from bot.jobs.quality import QA_REPORT, qa_marker, run_quality
from bot.jobs.specs import spec_of, step_values

__all__ = [
    "QA_REPORT",
    "SPEC_FILE",
    "JobEnv",
    "after_step_completed",
    "enqueue_next_step",
    "execute_step",
    "plan_protocol",
    "planning_schema",
    "protocol_files",
    "qa_marker",
    "run_engine",
    "run_quality",
    "spec_of",
    "step_marker",
    "step_values",
]
