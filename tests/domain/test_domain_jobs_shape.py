"""The jobs package stays readable: no function over 60 lines (issue #11)."""

from __future__ import annotations

import ast
from pathlib import Path

JOBS = Path(__file__).resolve().parents[2] / "bot" / "jobs"


def test_no_function_in_the_jobs_package_is_longer_than_60_lines() -> None:
    long = []
    for path in sorted(JOBS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long, long


def test_only_the_job_boundary_reads_arqs_ctx_in_the_step_runner() -> None:
    """plan/execute/quality/outcome use JobEnv; ctx["..."] stays in env.py (and advance's
    enqueues)."""
    for name in (
        "plan.py",
        "execute.py",
        "quality.py",
        "outcome.py",
        "engine_run.py",
        "boundary.py",
    ):
        text = (JOBS / name).read_text()
        assert 'ctx["' not in text, name
