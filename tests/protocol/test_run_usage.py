"""record_usage (bot/storage/runs.py): an engine turn's tokens and cost go onto the run and its
step together with the turn's event, on Postgres as one statement, on SQLite as one transaction."""

from __future__ import annotations

from sqlalchemy import select

from bot.core.settings import Settings
from bot.storage.db import database_from_settings
from bot.storage.models import Event, StepRun
from bot.storage.runs import load_run, new_event, record_usage
from tests.protocol.run_support import project_and_run


async def test_usage_lands_on_run_step_and_event_together(db_url: str) -> None:
    db = database_from_settings(Settings(db_url=db_url))
    try:
        project, run = await project_and_run(db)
        async with db.sessions.begin() as session:
            step = StepRun(protocol_run_id=run.id, step_index=1, step_name="one")
            session.add(step)
        before = (await load_run(db, run.id)).run.updated_at
        for tokens, cost in ((150, 0.25), (50, 0.5), (0, 0.0)):  # the last: an event only
            event = new_event(
                "engine.ok",
                f"{tokens} tokens",
                project_id=project.id,
                protocol_run_id=run.id,
                step_run_id=step.id,
                metadata={"usage": {"total": tokens}},
            )
            await record_usage(db, run.id, step.id, tokens, cost, event)
        state = await load_run(db, run.id)
        assert (state.run.tokens_used, state.run.cost_usd) == (200, 0.75)
        assert (state.step(1).tokens_used, state.step(1).cost_usd) == (200, 0.75)
        assert state.run.updated_at >= before
        async with db.sessions() as session:
            events = (
                (
                    await session.execute(
                        select(Event).where(Event.event_type == "engine.ok").order_by(Event.id)
                    )
                )
                .scalars()
                .all()
            )
        assert [(e.message, e.metadata_, e.step_run_id) for e in events] == [
            ("150 tokens", {"usage": {"total": 150}}, step.id),
            ("50 tokens", {"usage": {"total": 50}}, step.id),
            ("0 tokens", {"usage": {"total": 0}}, step.id),
        ]
        # a turn outside a step (planning) adds to the run only
        await record_usage(db, run.id, None, 10, 0.0, new_event("engine.ok", "plan"))
        state = await load_run(db, run.id)
        assert (state.run.tokens_used, state.step(1).tokens_used) == (210, 200)
    finally:
        await db.dispose()
