"""A `deksdenflow worker` process with two extra test jobs, for the SIGTERM test (run as a script).

`short` finishes within the grace period; `engine` runs the real CodexEngine on a stand-in
`codex` that never ends (its first attempt), so only cancellation can stop it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from arq.worker import func

from bot.core.settings import load_settings
from bot.jobs.worker import build_worker
from engines.base import EngineRequest
from engines.codex import CodexEngine

FAKE_CODEX = """#!/bin/sh
# a stand-in engine: a process group with a grandchild, like codex and the commands it runs
sleep 300 &
echo $! > "$MARKS/grandchild.pid"
echo $$ > "$MARKS/engine.pid"
wait
"""


async def short(ctx: dict[str, Any]) -> str:
    await ctx["redis"].set("t:short:started", b"1")
    await asyncio.sleep(1.5)
    await ctx["redis"].set("t:short:done", b"1")
    return "short-done"


async def engine(ctx: dict[str, Any], *, marks: str) -> str:
    attempt = await ctx["redis"].incr("t:engine:attempts")
    await ctx["redis"].rpush("t:engine:workers", os.environ["WORKER_NAME"])
    if attempt > 1:
        return "engine-done"
    script = Path(marks) / "codex"
    script.write_text(FAKE_CODEX)
    script.chmod(0o755)
    codex = CodexEngine(str(script), base_env={"PATH": os.environ["PATH"], "MARKS": marks},
                        env_allow=("MARKS",), kill_grace_s=1.0)  # fmt: skip
    await ctx["redis"].set("t:engine:started", b"1")
    result = await codex.run(EngineRequest(prompt="step", workdir=Path(marks), phase="execute"))
    return f"engine-ended-{result.outcome}"


def main() -> None:
    worker = build_worker(load_settings(), handle_signals=True)
    worker.functions["short"] = func(short, name="short")
    worker.functions["engine"] = func(engine, name="engine")
    worker.run()


if __name__ == "__main__":
    main()
