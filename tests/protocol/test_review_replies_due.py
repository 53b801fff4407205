"""Which fix steps the reclaim cron answers for: pushed ones whose threads wait for a reply and
no job holds; stale entries (a gone run, a cancelled fix that never ran, garbage) leave the list."""

from __future__ import annotations

from bot.domain.states import StepStatus
from bot.jobs import actions
from bot.jobs.locks import LOCK_PREFIX
from bot.jobs.reclaim import reclaim_expired
from bot.jobs.review import REPLIES_DUE_KEY, replies_due
from bot.storage.runs import update_step
from engines.scripted import ScriptedEngine
from tests.protocol.conftest import Harness


async def members(harness: Harness) -> set[str]:
    raw = await harness.ctx["redis"].smembers(REPLIES_DUE_KEY)
    return {m.decode() if isinstance(m, bytes) else str(m) for m in raw}


async def test_replies_due_takes_pushed_steps_and_drops_stale_entries(harness: Harness) -> None:
    harness.use(ScriptedEngine())
    pushed = await harness.start("Pushed fix")
    cancelled = await harness.start("Cancelled fix")
    redis = harness.ctx["redis"]
    step = (await harness.state(pushed)).step(1)
    await update_step(
        harness.ctx["db"],
        step.id,
        status=StepStatus.NEEDS_QA,
        runtime_state={"commit_sha": "a" * 40},
    )
    await actions.cancel(harness.ctx, cancelled)
    await redis.sadd(REPLIES_DUE_KEY, f"{pushed}:1", f"{cancelled}:1", "9999:1", "not-a-member")

    # a job holds the protocol: it answers itself, or a later tick does
    await redis.set(LOCK_PREFIX + str(pushed), "live-worker", px=60_000)
    assert await replies_due(harness.ctx) == []
    assert await members(harness) == {f"{pushed}:1"}  # only the stale entries went
    await redis.delete(LOCK_PREFIX + str(pushed))
    assert await replies_due(harness.ctx) == [(pushed, 1)]

    # the reclaim queues the reply job; it finds no review on the step: nothing left to answer
    assert await reclaim_expired(harness.ctx) == 1
    await harness.drain()
    assert await members(harness) == set()
    assert await reclaim_expired(harness.ctx) == 0
