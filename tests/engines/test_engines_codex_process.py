"""Tests for the codex engine's process handling, using a stand-in codex binary (no model)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from engines.base import EngineRequest, TokenUsage
from engines.codex import COMMAND_OUTPUT_LIMIT, CodexEngine

# A stand-in for `codex exec --json`: behaviour picked by FAKE_CODEX_MODE, facts written to
# FAKE_CODEX_DUMP so the test can see what the child received.
FAKE_CODEX = """\
import json, os, signal, subprocess, sys, time

mode = os.environ.get("FAKE_CODEX_MODE", "ok")
dump = os.environ.get("FAKE_CODEX_DUMP")
argv = sys.argv[1:]
out = argv[argv.index("-o") + 1] if "-o" in argv else None


def emit(event):
    print(json.dumps(event), flush=True)


def ok(text="scripted reply"):
    emit({"type": "thread.started", "thread_id": "t-123"})
    emit({"type": "turn.started"})
    emit({"type": "item.completed", "item": {"id": "i1", "type": "agent_message", "text": text}})
    emit({"type": "turn.completed", "usage": {"input_tokens": 40, "cached_input_tokens": 4,
                                               "output_tokens": 9, "reasoning_output_tokens": 1}})
    if out:
        open(out, "w").write(text + " (from -o)")


if mode == "envdump":
    stdin = sys.stdin.read()  # the prompt, then EOF
    schema = None
    if "--output-schema" in argv:
        schema = json.load(open(argv[argv.index("--output-schema") + 1]))
    json.dump({"env": dict(os.environ), "argv": argv, "stdin": stdin, "cwd": os.getcwd(),
               "schema": schema}, open(dump, "w"))
    ok('```json\\n{"answer": 42}\\n```')
elif mode == "ok":
    ok()
elif mode == "turn-failed":
    emit({"type": "thread.started", "thread_id": "t-9"})
    emit({"type": "turn.failed", "error": {"message": "unexpected status 401 Unauthorized"}})
    print("some stderr", file=sys.stderr)
    sys.exit(1)
elif mode == "stderr-fail":
    print("Error: config.toml: unknown field", file=sys.stderr)
    sys.exit(1)
elif mode == "usage":
    print("error: unexpected argument '--full-auto' found", file=sys.stderr)
    sys.exit(2)
elif mode == "sigterm":
    os.kill(os.getpid(), signal.SIGTERM)
elif mode == "bigline":
    emit({"type": "item.completed", "item": {"id": "c", "type": "command_execution",
          "command": "cat big", "aggregated_output": "y" * 300000, "exit_code": 0,
          "status": "completed"}})
    sys.stderr.write("z" * 50000)
    ok()
elif mode == "pieces":
    # lines cut across writes, a junk line, a line longer than the test's line limit, and a
    # last event with no newline after it
    line = json.dumps({"type": "item.completed",
                       "item": {"id": "m", "type": "agent_message", "text": "split"}})
    for part in (line[:10], line[10:30], line[30:] + "\\n" + '{"type": "turn.sta',
                 'rted"}\\nnot json\\n', "x" * 3000, "x" * 10 + "\\n"):
        sys.stdout.write(part)
        sys.stdout.flush()
        time.sleep(0.05)
    sys.stdout.write(json.dumps({"type": "turn.completed", "usage": {"input_tokens": 5}}))
    sys.stdout.flush()
elif mode in ("sleep", "stubborn"):
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "60"])
    open(dump, "w").write(json.dumps({"pid": os.getpid(), "child": child.pid}))
    emit({"type": "thread.started", "thread_id": "t-sleep"})
    time.sleep(60)
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    path = tmp_path / "fake-codex"
    path.write_text(f"#!{sys.executable}\n{FAKE_CODEX}")
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def make_request(workdir: Path, mode: str, dump: Path | None = None, **kw: object) -> EngineRequest:
    env = {"FAKE_CODEX_MODE": mode}
    if dump is not None:
        env["FAKE_CODEX_DUMP"] = str(dump)
    return EngineRequest(prompt="hello", workdir=workdir, phase="execute", env=env, **kw)  # type: ignore[arg-type]


async def test_child_env_is_scrubbed_and_the_prompt_comes_on_stdin(
    tmp_path: Path, fake_bin: Path
) -> None:
    base_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LC_ALL": "C.UTF-8",
        "CODEX_API_KEY": "sk-test",
        "DEKSDENFLOW_GITHUB_WEBHOOK_SECRET": "hook-secret",
        "DEKSDENFLOW_DATABASE_URL": "postgresql://u:p@db/x",
        "GITHUB_TOKEN": "ghs_secret",
        "GITLAB_TOKEN": "glpat_secret",
        "CI_JOB_TOKEN": "job",
        "REDIS_URL": "redis://x",
        "PROVIDER_KEY": "pk",
    }
    engine = CodexEngine(
        str(fake_bin),
        codex_home=str(tmp_path / "home"),
        base_env=base_env,
        env_allow=["PROVIDER_KEY"],
    )
    dump = tmp_path / "dump.json"
    request = EngineRequest(
        prompt="hello",
        workdir=tmp_path,
        phase="planning",
        model="gpt-5.5",
        output_schema={"type": "object", "required": ["answer"]},
        env={"FAKE_CODEX_MODE": "envdump", "FAKE_CODEX_DUMP": str(dump), "GH_TOKEN": "x",
             "DEKSDENFLOW_ANYTHING": "x"},
    )  # fmt: skip
    result = await engine.run(request)
    assert result.ok, result.error
    seen = json.loads(dump.read_text())
    child_env: dict[str, str] = seen["env"]
    leaked = {k for k in child_env if k.startswith("DEKSDENFLOW_") or k.endswith("_TOKEN")}
    assert leaked == set()
    assert "REDIS_URL" not in child_env
    assert child_env["CODEX_API_KEY"] == "sk-test"
    # a per-run CODEX_HOME, HOME and TMPDIR in the run's scratch dir, gone afterwards
    run_home = Path(child_env["CODEX_HOME"])
    assert run_home.name == "codex-home" and run_home != tmp_path / "home"
    assert Path(child_env["HOME"]) == run_home.parent / "home"
    assert Path(child_env["TMPDIR"]) == run_home.parent / "tmp"
    assert not run_home.parent.exists()
    assert (tmp_path / "home").is_dir()
    assert child_env["PROVIDER_KEY"] == "pk"
    assert child_env["LC_ALL"] == "C.UTF-8"
    assert seen["stdin"] == "hello"
    assert seen["argv"][-1] == "-"
    assert "sandbox_workspace_write.exclude_slash_tmp=true" in seen["argv"]
    assert "sandbox_workspace_write.exclude_tmpdir_env_var=true" in seen["argv"]
    assert Path(seen["cwd"]) == tmp_path
    assert seen["schema"] == {"type": "object", "required": ["answer"]}
    assert seen["argv"][seen["argv"].index("-m") + 1] == "gpt-5.5"
    # -o wins over the streamed message; the fenced JSON still parses.
    assert result.final_message.endswith("(from -o)")
    assert result.structured == {"answer": 42} and result.parse_error is None
    assert result.thread_id == "t-123"


async def test_completed_run_usage_and_resume_delta(tmp_path: Path, fake_bin: Path) -> None:
    engine = CodexEngine(str(fake_bin))
    fresh = await engine.run(make_request(tmp_path, "ok"))
    assert fresh.outcome == "completed" and fresh.exit_code == 0 and fresh.error is None
    assert fresh.final_message == "scripted reply (from -o)"
    assert fresh.usage == fresh.thread_usage == TokenUsage(40, 4, 9, 1)
    assert [e["type"] for e in fresh.events] == [
        "thread.started", "turn.started", "item.completed", "turn.completed",
    ]  # fmt: skip
    assert fresh.duration_s > 0
    resumed = await engine.run(
        make_request(
            tmp_path, "ok", resume_thread_id="t-123", previous_usage=TokenUsage(30, 4, 5, 0)
        )
    )
    assert resumed.thread_usage == TokenUsage(40, 4, 9, 1)
    assert resumed.usage == TokenUsage(10, 0, 4, 1)


@pytest.mark.parametrize(
    ("mode", "outcome", "code", "error_part"),
    [
        ("turn-failed", "failed", 1, "401 Unauthorized"),
        ("stderr-fail", "failed", 1, "config.toml: unknown field"),
        ("usage", "usage_error", 2, "--full-auto"),
        ("sigterm", "cancelled", -15, "signal"),
    ],
)
async def test_exit_code_mapping(
    tmp_path: Path, fake_bin: Path, mode: str, outcome: str, code: int, error_part: str
) -> None:
    result = await CodexEngine(str(fake_bin)).run(make_request(tmp_path, mode))
    assert result.outcome == outcome
    assert result.exit_code == code
    assert result.error is not None and error_part in result.error
    assert not result.ok


async def test_missing_binary_is_not_found(tmp_path: Path) -> None:
    result = await CodexEngine(str(tmp_path / "no-such-codex")).run(make_request(tmp_path, "ok"))
    assert result.outcome == "not_found"
    assert result.exit_code is None
    assert result.error is not None and "DEKSDENFLOW_CODEX_BIN" in result.error


async def test_missing_workdir_fails_clearly(tmp_path: Path, fake_bin: Path) -> None:
    result = await CodexEngine(str(fake_bin)).run(make_request(tmp_path / "gone", "ok"))
    assert result.outcome == "failed"
    assert result.error is not None and "does not exist" in result.error


async def test_huge_output_is_streamed_and_truncated(tmp_path: Path, fake_bin: Path) -> None:
    result = await CodexEngine(str(fake_bin)).run(make_request(tmp_path, "bigline"))
    assert result.ok
    command = result.events[0]["item"]
    assert command["type"] == "command_execution"
    assert len(command["aggregated_output"]) < COMMAND_OUTPUT_LIMIT + 100


class _Sinks:
    """Both sinks of one consumer, in the order the engine called them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def event(self, event: dict[str, Any], raw: bytes | None = None) -> None:
        self.calls.append(("event", event))

    def lines(self, data: bytes, lines: int) -> None:
        assert data.count(b"\n") == lines and (data.endswith(b"\n") or data == b"")
        self.calls.append(("lines", data) if data else ("end", None))

    def stream(self) -> list[Any]:
        """Every event in order: blocks split into their lines, events as they came."""
        out: list[Any] = []
        assert self.calls[-1] == ("end", None)  # the end of the stream is said, once
        for kind, value in self.calls[:-1]:
            out += value.decode().splitlines() if kind == "lines" else [value]
        return out


async def test_a_lines_sink_gets_whole_lines_and_long_lines_come_as_events(
    tmp_path: Path, fake_bin: Path
) -> None:
    sinks = _Sinks()
    request = make_request(tmp_path, "bigline", sink=sinks.event, lines_sink=sinks.lines)
    result = await CodexEngine(str(fake_bin)).run(request)
    assert result.ok
    stream = sinks.stream()
    # the 300 kB command line reaches the event sink, compacted; the rest as bytes, in order
    assert stream[0] == result.events[0]
    assert len(stream[0]["item"]["aggregated_output"]) < COMMAND_OUTPUT_LIMIT + 100
    assert [json.loads(line) for line in stream[1:]] == result.events[1:]
    assert all(kind == "lines" for kind, _ in sinks.calls[1:-1])
    assert len(sinks.calls) < len(result.events)  # blocks, not an event each


async def test_lines_cut_across_reads_and_overlong_lines(
    tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engines.codex

    monkeypatch.setattr(engines.codex, "_LINE_LIMIT", 1000)
    sinks = _Sinks()
    request = make_request(tmp_path, "pieces", sink=sinks.event, lines_sink=sinks.lines)
    result = await CodexEngine(str(fake_bin)).run(request)
    assert result.ok, result.error
    assert [e["type"] for e in result.events] == [
        "item.completed",
        "turn.started",
        "turn.completed",
    ]
    assert result.final_message == "split" and result.usage.input_tokens == 5
    # the junk line is kept (a reader skips it); the 3,010 x's over the limit are dropped
    stream = sinks.stream()
    assert [json.loads(line) for line in stream[:2]] == result.events[:2]
    assert stream[2] == "not json"
    assert json.loads(stream[3]) == result.events[2]  # the last line, newline added
    assert len(stream) == 4


@pytest.mark.parametrize("mode", ["sleep", "stubborn"])
async def test_timeout_kills_the_process_group(tmp_path: Path, fake_bin: Path, mode: str) -> None:
    dump = tmp_path / "pids.json"
    engine = CodexEngine(str(fake_bin), kill_grace_s=0.5)
    started = time.monotonic()
    result = await engine.run(make_request(tmp_path, mode, dump, timeout_s=0.8))
    assert time.monotonic() - started < 10
    assert result.outcome == "timeout"
    assert result.exit_code is None
    assert result.error is not None and "0.8 s" in result.error
    assert result.thread_id == "t-sleep"
    pids = json.loads(dump.read_text())
    for _ in range(50):
        if not alive(pids["pid"]) and not alive(pids["child"]):
            break
        await asyncio.sleep(0.1)
    assert not alive(pids["pid"])
    assert not alive(pids["child"])


async def test_cancelling_the_task_kills_codex(tmp_path: Path, fake_bin: Path) -> None:
    dump = tmp_path / "pids.json"
    engine = CodexEngine(str(fake_bin), kill_grace_s=0.5)
    task = asyncio.create_task(engine.run(make_request(tmp_path, "sleep", dump, timeout_s=60)))
    for _ in range(100):
        if dump.exists() and dump.read_text():
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pids = json.loads(dump.read_text())
    for _ in range(50):
        if not alive(pids["pid"]) and not alive(pids["child"]):
            break
        await asyncio.sleep(0.1)
    assert not alive(pids["pid"]) and not alive(pids["child"])
