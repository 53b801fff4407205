"""The one catalogue of jobs: a typed constructor per job (name, job id, arguments), and the
worker's function and cron lists built from the same table, so no job can be enqueued that
the worker does not run (`arq bot.jobs.worker.WorkerSettings` and `deksdenflow worker` alike).

Job ids are arq's dedupe keys: a job (or its kept result) with the same id is not queued
again, so each constructor's id names exactly what must not run twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from arq import cron
from arq.cron import CronJob
from arq.worker import Function, func

from bot.core.settings import Settings
from bot.jobs.common import MAX_TRIES
from bot.jobs.deliveries import prune_old_deliveries, relay_pending
from bot.jobs.reclaim import reclaim_expired
from bot.storage.queue import JobSpec, delivery_job

Reply = dict[str, Any] | None


# -- constructors ------------------------------------------------------------------------------


def process_delivery(delivery_id: int, provider: str, key: str, attempt: int = 0) -> JobSpec:
    # the intake batches these through its Lua enqueue (bot/storage/queue.py), with the same
    # constructor;
    # the id comes from the delivery's key, never the row id (ids repeat across databases)
    return delivery_job(delivery_id, provider, key, attempt)


def plan_protocol(run_id: int, attempt: str = "0", reply_to: Reply = None) -> JobSpec:
    return JobSpec(
        "plan_protocol",
        f"plan:{run_id}:{attempt}",
        {"protocol_run_id": run_id, "reply_to": reply_to},
    )


def execute_step(
    run_id: int, step_index: int, key: str, *, depth: int = 0, reply_to: Reply = None
) -> JobSpec:
    """`key` tells attempts apart (the step's retry count, a CI sha, a trigger's time)."""
    kwargs: dict[str, Any] = {"protocol_run_id": run_id, "step_index": step_index}
    if depth:
        kwargs["depth"] = depth
    if reply_to is not None:
        kwargs["reply_to"] = reply_to
    return JobSpec("execute_step", f"exec:{run_id}:{step_index}:{key}", kwargs)


def run_quality(run_id: int, step_index: int, key: str, *, reply_to: Reply = None) -> JobSpec:
    kwargs: dict[str, Any] = {"protocol_run_id": run_id, "step_index": step_index}
    if reply_to is not None:
        kwargs["reply_to"] = reply_to
    return JobSpec("run_quality", f"qa:{run_id}:{step_index}:{key}", kwargs)


def project_setup(project_id: int, key: str) -> JobSpec:
    return JobSpec("project_setup", f"setup:{project_id}:{key}", {"project_id": project_id})


def project_onboard(project_id: int, key: str, *, run_discovery: bool, reply_to: Reply) -> JobSpec:
    return JobSpec(
        "project_onboard",
        f"onboard:{project_id}:{key}",
        {"project_id": project_id, "run_discovery": run_discovery, "reply_to": reply_to},
    )


def codemachine_prepare(run_id: int) -> JobSpec:
    return JobSpec("codemachine_prepare", f"cm-prepare:{run_id}", {"protocol_run_id": run_id})


async def submit(redis: Any, job: JobSpec) -> bool:
    """Enqueue one job; False when a job (or its kept result) with that id already exists."""
    found = await redis.enqueue_job(job.function, _job_id=job.job_id, **job.kwargs)
    return found is not None


# -- what the worker runs --------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One job the worker runs: the coroutine (imported late), its timeout and tries."""

    name: str
    load: Callable[[], Callable[..., Any]]
    timeout: Callable[[Settings], float | None]
    tries: Callable[[Settings], int]


def _engine_timeout(settings: Settings) -> float:
    # engine calls can be long: the job timeout is the engine timeout plus git and forge time
    return float(settings.engine_timeout_s * 3 + settings.git_timeout_s * 2)


def _lock_tries(settings: Settings) -> int:
    # arq's Retry counts as a try: lock waits need room beyond the real attempts
    return MAX_TRIES + 30


def _tries(settings: Settings) -> int:
    return MAX_TRIES


def _default(settings: Settings) -> None:
    return None


def _load(module: str, name: str) -> Callable[[], Callable[..., Any]]:
    def load() -> Callable[..., Any]:
        import importlib

        found: Callable[..., Any] = getattr(importlib.import_module(module), name)
        return found

    return load


JOBS: tuple[Entry, ...] = (
    Entry("process_delivery", _load("bot.jobs.deliveries", "process_delivery"), _default, _tries),
    Entry("plan_protocol", _load("bot.jobs.steps", "plan_protocol"), _engine_timeout, _lock_tries),
    Entry("execute_step", _load("bot.jobs.steps", "execute_step"), _engine_timeout, _lock_tries),
    Entry("run_quality", _load("bot.jobs.steps", "run_quality"), _engine_timeout, _lock_tries),
    Entry("project_setup", _load("bot.jobs.projects", "project_setup"), lambda s: 120.0, _tries),
    Entry("project_onboard", _load("bot.jobs.onboard", "project_onboard"), _engine_timeout, _tries),
    # review feedback → a fix step: git and forge work only, waits for the protocol's lease
    Entry(
        "review_fix",
        _load("bot.jobs.review", "review_fix"),
        lambda s: s.git_timeout_s * 3,
        _lock_tries,
    ),
    # the thread replies of a fix step whose worker died after its push (reclaim_expired)
    Entry(
        "review_replies",
        _load("bot.jobs.review", "review_replies"),
        lambda s: s.git_timeout_s * 3,
        _tries,
    ),
    Entry(
        "codemachine_prepare",
        _load("bot.jobs.onboard", "codemachine_prepare"),
        _engine_timeout,
        _lock_tries,
    ),
)

JOB_NAMES = frozenset(entry.name for entry in JOBS)


def functions(settings: Settings) -> list[Function]:
    """arq Functions for every job in the catalogue."""
    return [
        func(
            entry.load(),
            name=entry.name,
            timeout=entry.timeout(settings),
            max_tries=entry.tries(settings),
        )
        for entry in JOBS
    ]


CRON_TRIES = 2


def _relay_seconds(settings: Settings) -> set[int]:
    step = max(1, min(59, int(settings.relay_interval_s)))
    return set(range(0, 60, step))


def cron_jobs(settings: Settings) -> list[CronJob]:
    """The outbox relay (every RELAY_INTERVAL_S, and at start-up), hourly delivery retention,
    and the reclaim of steps whose worker's lease expired."""
    # Two tries: a cron run whose worker was killed is run again by another worker once its
    # in-progress key expires. With arq's default of one, that second start was recorded as a
    # failed job ("max 1 retries exceeded"; seen in tests/deploy/test_cross_host.py), though
    # every cron here is idempotent and the run simply had not happened.
    return [
        cron(
            relay_pending,
            second=_relay_seconds(settings),
            run_at_startup=True,
            unique=True,
            max_tries=CRON_TRIES,
        ),
        # hourly, at an odd minute so it does not meet other hourly work
        cron(prune_old_deliveries, minute={17}, second={30}, unique=True, max_tries=CRON_TRIES),
        # twice a minute: with a 60 s lease a dead worker's step moves on within 2 minutes
        cron(reclaim_expired, second={7, 37}, unique=True, max_tries=CRON_TRIES),
    ]
