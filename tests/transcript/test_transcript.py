"""The step transcript: engine events → redacted items in batches; cost per step and run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bot.domain.pricing import DEFAULT_PRICES, cost_usd
from bot.jobs.steps import execute_step
from bot.storage.transcript import (
    REDACTED,
    TranscriptRecorder,
    redact,
    secret_values,
    transcript_entry,
    transcript_page,
)
from engines.base import TokenUsage
from engines.scripted import ScriptedEngine
from tests.protocol.conftest import Harness, scripted_script


def test_entries_for_each_kind_of_codex_event() -> None:
    wd = Path("/w")
    cmd = {
        "type": "item.completed",
        "item": {"type": "command_execution", "command": "pytest -q", "exit_code": 1,
                 "aggregated_output": "x" * 5000 + "1 failed", "status": "failed"},
    }  # fmt: skip
    entry = transcript_entry(cmd, wd)
    assert entry is not None and entry["kind"] == "command" and entry["text"] == "pytest -q"
    assert entry["data"]["exit_code"] == 1 and entry["data"]["output"].endswith("1 failed")
    assert len(entry["data"]["output"]) < 2100
    change = {"type": "item.completed", "item": {"type": "file_change",
              "changes": [{"path": "/w/a/b.py", "kind": "add"}]}}  # fmt: skip
    assert transcript_entry(change, wd) == {
        "kind": "file_change", "text": "add a/b.py",
        "data": {"changes": [{"path": "a/b.py", "kind": "add"}]},
    }  # fmt: skip
    usage = {"type": "turn.completed", "usage": {"input_tokens": 1200, "output_tokens": 30}}
    assert transcript_entry(usage) == {
        "kind": "usage", "text": "tokens: 1,200 in (0 cached), 30 out",
        "data": {"usage": {"input_tokens": 1200, "output_tokens": 30}},
    }  # fmt: skip
    failed = {"type": "turn.failed", "error": {"message": "unexpected status 401"}}
    assert transcript_entry(failed) == {
        "kind": "error",
        "text": "unexpected status 401",
        "data": {},
    }
    assert transcript_entry({"type": "thread.started", "thread_id": "t"}) is None
    started_msg = {"type": "item.started", "item": {"type": "agent_message", "text": ""}}
    assert transcript_entry(started_msg) is None


def test_redaction_reaches_nested_values_and_env_keys() -> None:
    secrets = secret_values(
        ["whsec-0123456789"],
        {"DEPLOY": "project-secret-42"},
        {"CODEX_API_KEY": "sk-live-abcdef", "PATH": "/usr/bin", "SHORT_TOKEN": "abc"},
    )
    assert set(secrets) == {"whsec-0123456789", "project-secret-42", "sk-live-abcdef"}
    value = {"text": "key sk-live-abcdef!", "data": {"output": ["project-secret-42 here"]}}
    assert redact(value, secrets) == {
        "text": f"key {REDACTED}!", "data": {"output": [f"{REDACTED} here"]},
    }  # fmt: skip


async def test_recorder_batches_redacts_and_pages(harness: Harness) -> None:
    db = harness.ctx["db"]
    recorder = TranscriptRecorder(
        db, protocol_run_id=7, step_run_id=3, phase="execute",
        secrets=("sk-secret-value", 'quote"secret'), interval_s=0.05,
    )  # fmt: skip
    for n in range(1200):
        event = {
            "type": "item.completed",
            "item": {"type": "agent_message", "text": f'm{n} sk-secret-value quote"secret'},
        }
        # the engine's own bytes when it has them (codex), else the recorder encodes (scripted)
        recorder.add(event, json.dumps(event).encode() + b"\n" if n % 2 else None)
    recorder.add({"type": "thread.started", "thread_id": "t"})  # stored, never shown
    await recorder.close()
    assert recorder.stored == 1201
    items = await transcript_page(db, step_run_id=3, limit=5000)
    assert len(items) == 1200
    assert all(
        "sk-secret-value" not in i["text"] and 'quote"secret' not in i["text"] for i in items
    )
    assert items[0]["text"] == f"m0 {REDACTED} {REDACTED}"
    assert [i["text"].split()[0] for i in items[:3]] == ["m0", "m1", "m2"]
    ids = [i["id"] for i in items]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # paging: the newest page before an id, oldest first; and a tail after an id
    last = await transcript_page(db, step_run_id=3, before=ids[-1] + 1, limit=10)
    assert [i["text"].split()[0] for i in last] == [f"m{n}" for n in range(1190, 1200)]
    middle = await transcript_page(db, step_run_id=3, before=ids[700], limit=3)
    assert [i["id"] for i in middle] == ids[697:700]
    tail = await transcript_page(db, step_run_id=3, after=ids[1195], limit=100)
    assert [i["id"] for i in tail] == ids[1196:]


async def test_blocks_of_lines_are_chunked_redacted_and_kept_in_order(harness: Harness) -> None:
    from sqlalchemy import select

    from bot.storage.models import TranscriptChunk
    from bot.storage.transcript import CHUNK_LINES

    db = harness.ctx["db"]
    recorder = TranscriptRecorder(
        db, protocol_run_id=7, step_run_id=4, phase="execute",
        secrets=("sk-secret-value", 'quote"secret'), interval_s=0.05,
    )  # fmt: skip

    def line(n: int) -> bytes:
        event = {
            "type": "item.completed",
            "item": {"type": "agent_message", "text": f'm{n} sk-secret-value quote"secret'},
        }
        return json.dumps(event).encode() + b"\n"

    # what codex's reader hands over: one block of more lines than a chunk holds, an event
    # with no bytes of its own, then blocks that fill chunks a few at a time
    recorder.add_lines(b"".join(line(n) for n in range(700)), 700)
    recorder.add({"type": "item.completed", "item": {"type": "agent_message", "text": "m700"}})
    for start in range(701, 1301, 200):
        recorder.add_lines(b"".join(line(n) for n in range(start, start + 200)), 200)
    await recorder.close()
    assert recorder.stored == 1301
    items = await transcript_page(db, step_run_id=4, limit=5000)
    assert [i["text"].split()[0] for i in items] == [f"m{n}" for n in range(1301)]
    assert items[0]["text"] == f"m0 {REDACTED} {REDACTED}"
    assert not any("sk-secret-value" in i["text"] or 'quote"secret' in i["text"] for i in items)
    ids = [i["id"] for i in items]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    async with db.sessions() as session:
        counts = list((await session.execute(
            select(TranscriptChunk.lines).where(TranscriptChunk.step_run_id == 4)
            .order_by(TranscriptChunk.id))).scalars())  # fmt: skip
    assert sum(counts) == 1301 and max(counts) <= CHUNK_LINES


async def test_a_scripted_step_stores_its_transcript_and_cost(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODEX_API_KEY", "sk-from-the-worker-env")
    script = scripted_script(
        execute={"default": {
            "reasoning": "Thinking about {title}",
            "commands": ["echo key=sk-from-the-worker-env", "exit 3"],
            "files": [{"path": "NOTES.md", "append": "- {slug}\n"}],
            "message": "Done with {slug}",
            "usage": {"input_tokens": 2000, "cached_input_tokens": 500, "output_tokens": 300},
        }},
    )  # fmt: skip
    harness.use(ScriptedEngine(script))
    run_id = await harness.start()
    await execute_step(harness.ctx, protocol_run_id=run_id, step_index=1)
    state = await harness.state(run_id)
    step = state.step(1)
    workdir = Path(state.run.worktree_path)
    rows = [SimpleNamespace(**i) for i in await transcript_page(
        harness.ctx["db"], step_run_id=step.id, limit=500, workdir=workdir)]  # fmt: skip
    kinds = [(r.phase, r.kind) for r in rows]
    assert kinds[:8] == [
        ("execute", "turn"), ("execute", "reasoning"), ("execute", "file_change"),
        ("execute", "command"), ("execute", "command"), ("execute", "command"),
        ("execute", "command"), ("execute", "message"),
    ]  # fmt: skip
    echo = rows[4]
    assert echo.data["exit_code"] == 0
    assert echo.data["output"] == f"key={REDACTED}\n"
    assert rows[6].data["exit_code"] == 3
    assert rows[2].text == "add TASK.md"  # step 1 (record-task) writes its own file
    # the planning turns are stored too, on the run without a step
    planning = await transcript_page(harness.ctx["db"], protocol_run_id=run_id, limit=500)
    assert any(i["step_run_id"] is None and i["phase"] == "planning" for i in planning)
    # cost: the execute turn at gpt-5.5's default price (+ the QA turn, if any ran)
    expected = cost_usd(
        TokenUsage(input_tokens=2000, cached_input_tokens=500, output_tokens=300),
        DEFAULT_PRICES["gpt-5.5"],
    )
    assert step.cost_usd == pytest.approx(expected)
    assert state.run.cost_usd > step.cost_usd  # planning and decomposition cost too


async def test_recorder_on_sqlite_and_postgres(db_url: str, tmp_path: Path) -> None:
    from bot.core.settings import Settings
    from bot.storage.db import create_database

    db = create_database(Settings(db_url=db_url, data_dir=tmp_path).async_database_url)
    try:
        recorder = TranscriptRecorder(db, protocol_run_id=1, step_run_id=9, phase="qa",
                                      secrets=("sk-xyz-123456",))  # fmt: skip
        for n in range(3):
            event = {"type": "item.completed",
                     "item": {"type": "reasoning", "text": f"r{n} sk-xyz-123456"}}  # fmt: skip
            recorder.add(event, json.dumps(event).encode())
        await recorder.close()
        items = await transcript_page(db, step_run_id=9)
        assert [i["text"] for i in items] == [f"r{n} {REDACTED}" for n in range(3)]
        assert items[0]["phase"] == "qa" and items[0]["created_at"]
        # a protocol-level turn (planning): no step
        planning = TranscriptRecorder(db, protocol_run_id=2, step_run_id=None, phase="plan")
        event = {"type": "item.completed", "item": {"type": "agent_message", "text": "plan"}}
        planning.add(event, json.dumps(event).encode())
        await planning.close()
        items = await transcript_page(db, protocol_run_id=2)
        assert [(i["text"], i["step_run_id"]) for i in items] == [("plan", None)]
    finally:
        await db.dispose()


async def test_a_locked_database_sends_the_write_to_the_thread(tmp_path: Path) -> None:
    import asyncio
    import sqlite3

    from bot.storage.db import create_database
    from bot.storage.migrate import upgrade_head

    path = tmp_path / "locked.sqlite3"
    upgrade_head(f"sqlite:///{path}")
    db = create_database(f"sqlite+aiosqlite:///{path}")
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        recorder = TranscriptRecorder(db, protocol_run_id=1, step_run_id=5, phase="execute")
        recorder.add({"type": "item.completed", "item": {"type": "agent_message", "text": "hi"}})
        closing = asyncio.create_task(recorder.close())
        await asyncio.sleep(0.3)
        assert not closing.done()  # waiting on its thread, not blocking this loop
        blocker.execute("COMMIT")
        await asyncio.wait_for(closing, timeout=10)
        assert [i["text"] for i in await transcript_page(db, step_run_id=5)] == ["hi"]
    finally:
        blocker.close()
        await db.dispose()


async def test_a_slow_stream_is_stored_before_the_turn_ends(tmp_path: Path) -> None:
    import asyncio

    from bot.storage.db import create_database
    from bot.storage.migrate import upgrade_head

    path = tmp_path / "slow.sqlite3"
    upgrade_head(f"sqlite:///{path}")
    db = create_database(f"sqlite+aiosqlite:///{path}")
    try:
        recorder = TranscriptRecorder(db, protocol_run_id=1, step_run_id=6, phase="execute",
                                      interval_s=0.05)  # fmt: skip
        event = {"type": "item.completed", "item": {"type": "agent_message", "text": "one line"}}
        recorder.add(event, json.dumps(event).encode() + b"\n")
        # a lone event, far from a chunk's worth: the batch window hands it over, not close()
        for _ in range(100):
            if await transcript_page(db, step_run_id=6):
                break
            await asyncio.sleep(0.05)
        assert [i["text"] for i in await transcript_page(db, step_run_id=6)] == ["one line"]
        await recorder.close()
        assert recorder.stored == 1
    finally:
        await db.dispose()


async def test_finish_hands_the_last_batch_over_without_waiting_for_it(tmp_path: Path) -> None:
    import asyncio

    from bot.storage.db import create_database
    from bot.storage.migrate import upgrade_head

    path = tmp_path / "end.sqlite3"
    upgrade_head(f"sqlite:///{path}")
    db = create_database(f"sqlite+aiosqlite:///{path}")
    try:
        # a batch window far longer than the test: only finish() can hand the line over
        recorder = TranscriptRecorder(db, protocol_run_id=1, step_run_id=8, phase="execute",
                                      interval_s=600)  # fmt: skip
        event = {"type": "item.completed", "item": {"type": "agent_message", "text": "last"}}
        recorder.add_lines(json.dumps(event).encode() + b"\n", 1)
        # what codex's reader says at EOF: the engine is still wrapping up the turn, and the
        # writer does not compete with it
        recorder.add_lines(b"", 0)
        await asyncio.sleep(0.2)
        assert await transcript_page(db, step_run_id=8) == []
        recorder.finish()  # returns at once: the runner records the turn meanwhile
        for _ in range(100):
            if await transcript_page(db, step_run_id=8):
                break
            await asyncio.sleep(0.05)
        assert [i["text"] for i in await transcript_page(db, step_run_id=8)] == ["last"]
        await recorder.wait_stored()
        assert recorder.stored == 1
        await recorder.close()  # after finish: nothing more to do, and no second end marker
        assert recorder.stored == 1
    finally:
        await db.dispose()


async def test_a_burst_is_one_batch_in_chunks_and_a_long_one_is_cut_by_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a stream faster than the batch window: nothing is written beside the reading until the
    # window ends or the batch holds MAX_PENDING_BYTES; chunks keep at most CHUNK_LINES lines
    import asyncio

    from sqlalchemy import select

    from bot.storage import transcript
    from bot.storage.db import create_database
    from bot.storage.migrate import upgrade_head
    from bot.storage.models import TranscriptChunk

    path = tmp_path / "burst.sqlite3"
    upgrade_head(f"sqlite:///{path}")
    db = create_database(f"sqlite+aiosqlite:///{path}")

    def block(start: int, count: int) -> bytes:
        return b"".join(
            json.dumps({"type": "item.completed",
                        "item": {"type": "agent_message", "text": f"m{n}"}}).encode() + b"\n"
            for n in range(start, start + count)
        )  # fmt: skip

    try:
        recorder = TranscriptRecorder(db, protocol_run_id=1, step_run_id=10, phase="execute",
                                      interval_s=600)  # fmt: skip
        for start in range(0, 1200, 100):
            recorder.add_lines(block(start, 100), 100)
        await asyncio.sleep(0.2)
        assert await transcript_page(db, step_run_id=10) == []  # two full chunks wait too
        await recorder.close()
        async with db.sessions() as session:
            counts = list((await session.execute(
                select(TranscriptChunk.lines).where(TranscriptChunk.step_run_id == 10)
                .order_by(TranscriptChunk.id))).scalars())  # fmt: skip
        assert counts == [500, 500, 200]

        monkeypatch.setattr(transcript, "MAX_PENDING_BYTES", len(block(0, 100)) * 3)
        recorder = TranscriptRecorder(db, protocol_run_id=1, step_run_id=11, phase="execute",
                                      interval_s=600)  # fmt: skip
        for start in range(0, 300, 100):
            recorder.add_lines(block(start, 100), 100)
        for _ in range(100):  # the size cap handed the batch over: no window, no finish
            if len(await transcript_page(db, step_run_id=11, limit=1000)) == 300:
                break
            await asyncio.sleep(0.05)
        assert len(await transcript_page(db, step_run_id=11, limit=1000)) == 300
        await recorder.close()
        assert recorder.stored == 300
    finally:
        await db.dispose()


async def test_the_writer_keeps_a_small_page_cache_and_stores_chunks_larger_than_it(
    tmp_path: Path,
) -> None:
    # a turn writes megabytes: the writer's SQLite page cache stays a few pages (fewer page
    # faults per turn), and chunks many times its size are stored whole all the same
    import sqlite3
    from contextlib import closing

    from bot.storage.db import create_database
    from bot.storage.migrate import upgrade_head
    from bot.storage.transcript import CHUNK_LINES, WRITER_CACHE_KIB, _borrow_connection

    path = tmp_path / "cache.sqlite3"
    upgrade_head(f"sqlite:///{path}")
    db = create_database(f"sqlite+aiosqlite:///{path}")
    try:
        recorder = TranscriptRecorder(db, protocol_run_id=1, step_run_id=2, phase="execute")

        def line(n: int) -> bytes:
            event = {"type": "item.completed",
                     "item": {"type": "agent_message", "text": f"m{n} " + "x" * 2000}}  # fmt: skip
            return json.dumps(event).encode() + b"\n"

        for start in range(0, 2 * CHUNK_LINES, 100):  # two chunks of ~1 MB each
            recorder.add_lines(b"".join(line(n) for n in range(start, start + 100)), 100)
        await recorder.close()
        items = await transcript_page(db, step_run_id=2, limit=5000)
        assert [i["text"].split()[0] for i in items] == [f"m{n}" for n in range(2 * CHUNK_LINES)]
        conn = _borrow_connection(str(path))  # the one the writer returned to the pool
        try:
            assert conn.execute("PRAGMA cache_size").fetchone()[0] == -WRITER_CACHE_KIB
        finally:
            conn.close()
        with closing(sqlite3.connect(path)) as check:
            assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        await db.dispose()


async def test_a_writer_started_before_a_turn_without_events_ends_with_it(tmp_path: Path) -> None:
    from bot.storage.db import create_database
    from bot.storage.migrate import upgrade_head

    path = tmp_path / "idle.sqlite3"
    upgrade_head(f"sqlite:///{path}")
    db = create_database(f"sqlite+aiosqlite:///{path}")
    try:
        recorder = TranscriptRecorder(db, protocol_run_id=1, step_run_id=12, phase="execute")
        recorder.start()  # as the step runner does before the engine runs
        thread = recorder._thread
        assert thread is not None and thread.is_alive()
        recorder.finish()
        await recorder.wait_stored()
        thread.join(timeout=10)
        assert not thread.is_alive() and recorder.stored == 0
        assert await transcript_page(db, step_run_id=12) == []
    finally:
        await db.dispose()
