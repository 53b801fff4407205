"""Fetching a red CI run's evidence from the forge (the I/O edge of bot/domain/ci_evidence.py).

GitHub: the commit's failed check runs (their output and annotations) and, for GitHub Actions,
the failed jobs' logs. GitLab: the pipeline's failed jobs and their traces. Each piece that
cannot be had (a 404, a log already expired) is left out with a note; the caller
(`bot.jobs.ci.gather_evidence`) redacts, cuts and bounds the whole in time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bot.domain.ci_evidence import (
    EVIDENCE_LIMIT,
    MAX_JOBS,
    RAW_LOG_LIMIT,
    CIEvidence,
    FailedJob,
    github_job,
    gitlab_job,
    hook_job,
)
from bot.forge.base import RepoRef

log = logging.getLogger(__name__)

FAILED_CONCLUSIONS = frozenset(
    {"failure", "timed_out", "action_required", "startup_failure", "cancelled"}
)
ACTIONS_SLUG = "github-actions"


def _failed_runs(runs: list[dict[str, Any]], own_app_id: Any) -> list[dict[str, Any]]:
    """Other apps' completed check runs that failed, at most MAX_JOBS (pure)."""
    failed = [
        r
        for r in runs
        if (r.get("app") or {}).get("id") != own_app_id
        and r.get("status") == "completed"
        and r.get("conclusion") in FAILED_CONCLUSIONS
    ]
    return sorted(failed, key=lambda r: str(r.get("name")))[:MAX_JOBS]


async def github_evidence(forge: Any, repo: RepoRef, sha: str, own_app_id: Any) -> CIEvidence:
    """The failed check runs of `sha`, with annotations and (GitHub Actions) job logs."""
    runs = await forge.list_check_runs(repo, sha, params={"filter": "latest"})
    jobs: list[FailedJob] = []
    missing: list[str] = []
    failed = _failed_runs(runs, own_app_id)
    share = max(EVIDENCE_LIMIT // max(len(failed), 1), 1024)
    for run in failed:
        name = str(run.get("name") or run.get("id"))
        output: Mapping[str, Any] = run.get("output") or {}
        annotations: list[dict[str, Any]] = []
        if output.get("annotations_count"):
            try:
                annotations = await forge.check_run_annotations(repo, int(run["id"]))
            except Exception as exc:
                missing.append(f"annotations of {name} ({type(exc).__name__})")
        text: str | None = None
        # an Actions check run's id is its job's id: the log is the job's
        if (run.get("app") or {}).get("slug") == ACTIONS_SLUG:
            try:
                text = await forge.job_log(repo, int(run["id"]), RAW_LOG_LIMIT)
            except Exception as exc:
                missing.append(f"the log of {name} ({type(exc).__name__})")
        conclusion = str(run.get("conclusion") or "failure")
        jobs.append(
            github_job(
                name, conclusion, output=output, annotations=annotations, log=text, limit=share
            )
        )
    note = "Not available: " + "; ".join(missing) + "." if missing else ""
    return CIEvidence("github-checks", tuple(jobs), note)


async def gitlab_evidence(forge: Any, repo: RepoRef, pipeline_id: int) -> CIEvidence:
    """The failed jobs of a pipeline and the tails of their traces."""
    failed = (await forge.failed_jobs(repo, pipeline_id))[:MAX_JOBS]
    share = max(EVIDENCE_LIMIT // max(len(failed), 1), 1024)
    jobs: list[FailedJob] = []
    missing: list[str] = []
    for job in failed:
        name = str(job.get("name") or job.get("id"))
        trace: str | None = None
        try:
            trace = await forge.job_trace(repo, int(job["id"]), RAW_LOG_LIMIT)
        except Exception as exc:
            missing.append(f"the trace of {name} ({type(exc).__name__})")
        jobs.append(
            gitlab_job(
                name, str(job.get("status") or "failed"), trace, str(job.get("stage") or ""), share
            )
        )
    note = "Not available: " + "; ".join(missing) + "." if missing else ""
    return CIEvidence("gitlab-ci", tuple(jobs), note)


def hook_evidence(failing: list[str], stage: str, log_tail: str) -> CIEvidence:
    """What report.sh sent to /webhooks/ci: the failing stage and its log tail (pure)."""
    names = failing or [stage or "ci"]
    jobs = [hook_job(names[0], stage, log_tail)]
    jobs += [FailedJob(n) for n in names[1:]]
    return CIEvidence("ci-hook", tuple(jobs))


def status_evidence(context: str, state: str, description: str) -> CIEvidence:
    """A failing commit status: its context and description are all there is (pure)."""
    return CIEvidence(
        "github-status",
        (
            FailedJob(
                context,
                state,
                description.strip(),
                (),
                "",
                (description.strip(),) if description.strip() else (),
            ),
        ),
    )
