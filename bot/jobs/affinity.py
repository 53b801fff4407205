"""Worktree affinity: a protocol's next job goes to the worker that already holds its worktree.

Any worker can run any job: a worker without the protocol's worktree fetches the branch and
builds one. That costs more than the step's own bookkeeping: on the scale bench a step that
lands on another worker than the one before it costs about 40 % more CPU (the fetch brings the
other worker's commits, then a worktree is added and reset), and on a real repository checking
out every file of a fresh worktree takes seconds. So a worker that starts a protocol's job marks
the protocol as warm here (a Redis key with its id), and the other workers leave that
protocol's queued jobs alone for a short grace after they become ready, long enough for the
owner's next poll to take them. After the grace anyone takes them, as before: an owner that is
busy, dead or gone never holds a job up for longer than that.

Only the order in which queued jobs are picked changes; arq still claims each job (its
in-progress key), and the protocol's lease still keeps one job of a protocol running at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

WARM_KEY_PREFIX = "deksdenflow:warm:"
# Other workers wait this long after a warm protocol's job becomes ready: the owner polls every
# WORKER_POLL_DELAY_S (0.05 s by default), so its next look comes well within it.
GRACE_MS = 500
# A job that has waited this long is taken in queue order, before a worker's own protocols: the
# preference for warm worktrees never keeps a job queued for longer than this.
FAIR_MS = 30_000
# How long a mark lasts without a new job of the protocol: a worker's worktree outlives this
# only on a quiet protocol, where one cold start is not worth remembering it for.
WARM_TTL_MS = 3_600_000
# the jobs that work in a protocol's worktree, by the first part of their id
# (bot/jobs/catalogue.py and the places that enqueue them: `<kind>:<run id>:...`)
_RUN_JOB_KINDS = frozenset({"exec", "qa", "plan", "replies", "review"})

# Deletes each mark that is still this worker's (another may have taken the protocol since).
RELEASE_LUA = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end
end
return n
"""


def warm_key(run_id: int) -> str:
    return f"{WARM_KEY_PREFIX}{run_id}"


def run_of(job_id: str) -> int | None:
    """The protocol run a job works on, from its id; None for a job of no protocol (a delivery,
    a cron, a project's setup)."""
    kind, _, rest = job_id.partition(":")
    if kind not in _RUN_JOB_KINDS:
        return None
    head = rest.partition(":")[0]
    return int(head) if head.isdigit() else None


@dataclass(frozen=True, slots=True)
class Queued:
    job_id: str
    run_id: int | None
    ready_ms: float | None  # the job's score in the queue: when it may run; None if gone


def pickable(
    queued: Sequence[Queued], owners: Mapping[int, str], me: str, now_ms: float
) -> list[str]:
    """The job ids this worker may try to start now, in the order to try them.

    Left out: jobs of a protocol another worker holds warm that became ready less than
    GRACE_MS ago. The rest in three groups, each in queue order: jobs waiting for FAIR_MS or
    more, then jobs of the protocols this worker holds, then everything else (protocols nobody
    holds or whose grace is over, and jobs that left the queue meanwhile, which arq's own claim
    then skips).
    """
    overdue: list[str] = []
    own: list[str] = []
    rest: list[str] = []
    for job in queued:
        owner = owners.get(job.run_id) if job.run_id is not None else None
        age = now_ms - job.ready_ms if job.ready_ms is not None else None
        if age is not None and age >= FAIR_MS:
            overdue.append(job.job_id)
        elif owner is None:
            rest.append(job.job_id)
        elif owner == me:
            own.append(job.job_id)
        elif age is None or age >= GRACE_MS:
            rest.append(job.job_id)
    return overdue + own + rest


def runs_of(job_ids: Iterable[str]) -> list[int]:
    """The distinct protocol runs of these jobs, in first-seen order."""
    seen: dict[int, None] = {}
    for job_id in job_ids:
        run = run_of(job_id)
        if run is not None:
            seen.setdefault(run, None)
    return list(seen)
