"""The JSON columns (bot/core/jsoncodec.py) on both databases: what a step keeps in its
runtime state comes back equal, exact integers beyond 64 bits included, and rows written by the
standard library's encoder before the change still read."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import text, update

from bot.core import jsoncodec
from bot.core.settings import Settings
from bot.storage.db import database_from_settings
from bot.storage.models import StepRun
from bot.storage.runs import load_run
from tests.protocol.run_support import project_and_run

STATE: dict[str, Any] = {
    "attempt": 2,
    "attempt_head": "0" * 40,
    "thread_usage": {"input": 2**70, "negative": -(2**65), "ratio": 0.125},
    "last_message": 'Überprüft ✓ — 完成 "quoted" \\ and \n newline',
    "changed_files": ["src/a.py", "docs/ß.md"],
    "feedback": [{"kind": "qa", "items": [None, True, False, 1.5e-300]}],
}


async def test_runtime_state_round_trips_exactly(db_url: str) -> None:
    db = database_from_settings(Settings(db_url=db_url))
    try:
        _, run = await project_and_run(db)
        async with db.sessions.begin() as session:
            session.add(
                StepRun(protocol_run_id=run.id, step_index=1, step_name="one", runtime_state=STATE)
            )
            session.add(StepRun(protocol_run_id=run.id, step_index=2, step_name="two"))
        async with db.sessions.begin() as session:
            # a key that is not a string is stored as one, as json.dumps did
            await session.execute(
                update(StepRun).where(StepRun.step_index == 2).values(runtime_state={7: "seven"})
            )
        state = await load_run(db, run.id)
        assert state.step(1).runtime_state == STATE
        assert isinstance(state.step(1).runtime_state["thread_usage"]["input"], int)
        assert state.step(2).runtime_state == {"7": "seven"}
    finally:
        await db.dispose()


async def test_rows_the_old_encoder_wrote_still_read(db_url: str) -> None:
    """json.dumps wrote spaces, `\\uXXXX` escapes and, on SQLite, a bare NaN."""
    db = database_from_settings(Settings(db_url=db_url))
    try:
        _, run = await project_and_run(db)
        async with db.sessions.begin() as session:
            session.add(StepRun(protocol_run_id=run.id, step_index=1, step_name="one"))
        old = '{"a": [1, 2], "s": "\\u00fc\\ud83d\\ude00"' + (
            ', "n": NaN}' if db.is_sqlite else "}"
        )
        async with db.engine.begin() as conn:
            await conn.execute(
                text("UPDATE step_runs SET runtime_state = :v WHERE step_index = 1"), {"v": old}
            )
        got = (await load_run(db, run.id)).step(1).runtime_state
        assert got is not None
        assert (got["a"], got["s"]) == ([1, 2], "ü😀")
        if db.is_sqlite:
            assert math.isnan(got["n"])
    finally:
        await db.dispose()


def test_what_the_fast_encoder_refuses_is_written_as_before() -> None:
    lone = {"s": "\ud800"}  # a lone surrogate, as a broken tool output may carry
    assert jsoncodec.loads(jsoncodec.dumps(lone)) == lone
    assert jsoncodec.loads(jsoncodec.dumps_text({True: 1})) == {"true": 1}
    assert jsoncodec.dumps_text([math.nan, math.inf]) == "[null,null]"
    assert jsoncodec.loads(memoryview(b'{"a": 1}')) == {"a": 1}
