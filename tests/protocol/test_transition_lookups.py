"""A status transition whose caller does not hold the row (bot/storage/runs.py `transition`):
one look-up gives the status and the ids its event needs, on both databases; a conflict and a
missing row still say so."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, select

from bot.core.errors import NotFound, TransitionConflict
from bot.core.settings import Settings
from bot.storage.db import database_from_settings
from bot.storage.models import Event, StepRun
from bot.storage.runs import set_protocol_status, set_step_status
from tests.protocol.run_support import project_and_run


async def test_transitions_write_their_event_with_the_ids_in_three_statements(db_url: str) -> None:
    db = database_from_settings(Settings(db_url=db_url))
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.split()[0].upper())

    try:
        project, run = await project_and_run(db)
        async with db.sessions.begin() as session:
            step = StepRun(protocol_run_id=run.id, step_index=1, step_name="one")
            session.add(step)
        event.listen(db.engine.sync_engine, "before_cursor_execute", count)
        try:
            assert await set_step_status(db, step.id, "running") == "pending"
            step_statements = list(statements)
            statements.clear()
            assert await set_protocol_status(db, run.id, "planning") == "pending"
            run_statements = list(statements)
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", count)
        # the look-up (status and ids together), the compare-and-set, the event
        assert step_statements == ["SELECT", "UPDATE", "INSERT"]
        assert run_statements == ["SELECT", "UPDATE", "INSERT"]
        async with db.sessions() as session:
            events = (await session.execute(select(Event).order_by(Event.id))).scalars().all()
        moves = [e for e in events if e.event_type in ("step.running", "protocol.planning")]
        assert [(e.event_type, e.project_id, e.protocol_run_id, e.step_run_id) for e in moves] == [
            ("step.running", project.id, run.id, step.id),
            ("protocol.planning", project.id, run.id, None),
        ]
        assert moves[0].metadata_ == {"from": "pending", "to": "running"}

        with pytest.raises(TransitionConflict) as conflict:
            await set_step_status(db, step.id, "running")
        assert (conflict.value.kind, conflict.value.entity_id) == ("step", 1)
        with pytest.raises(NotFound):
            await set_step_status(db, step.id + 1000, "running")
        with pytest.raises(NotFound):
            await set_protocol_status(db, run.id + 1000, "planning")
    finally:
        await db.dispose()
