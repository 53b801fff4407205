"""The scripted engine's `delay_s`: a call that waits like a model call, used by bench/scale.py."""

from __future__ import annotations

import time
from pathlib import Path

from engines.base import EngineRequest
from engines.scripted import ScriptedEngine


async def test_delay_applies_per_step_and_per_phase(tmp_path: Path) -> None:
    engine = ScriptedEngine(
        {
            "execute": {
                "default": {"message": "ok"},
                "steps": {2: {"message": "slow", "delay_s": 0.3}},
            },
            "qa": {"delay_s": 0.2, "default": {"verdicts": ["PASS"]}},
        }
    )

    async def timed(phase: str, index: int) -> tuple[float, str]:
        started = time.monotonic()
        request = EngineRequest(
            prompt="p",
            workdir=tmp_path,
            phase=phase,  # type: ignore[arg-type]
            context={"step_index": index},
        )
        result = await engine.run(request)
        return time.monotonic() - started, result.final_message

    fast, _ = await timed("execute", 1)
    slow, message = await timed("execute", 2)
    assert message == "slow" and slow >= 0.3 > fast
    qa, _ = await timed("qa", 1)
    assert qa >= 0.2


async def test_a_bad_delay_fails_the_call(tmp_path: Path) -> None:
    engine = ScriptedEngine({"execute": {"default": {"delay_s": "soon"}}})
    result = await engine.run(EngineRequest(prompt="p", workdir=tmp_path, phase="execute"))
    assert result.outcome == "failed" and "delay_s" in (result.error or "")
