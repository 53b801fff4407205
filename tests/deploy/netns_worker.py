"""`deksdenflow worker` whose engine logs each call's start and end with the worker's id.

Run by the cross-host test inside a network namespace. The log ($STEP_LOG, one JSON object a
line, outside DATA_DIR) is how the test proves that no step ran on two workers at once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from bot.core.observability import configure_logging
from bot.core.settings import load_settings
from bot.jobs.worker import build_worker
from engines.base import EngineRequest, EngineResult
from engines.registry import EngineRegistry
from engines.scripted import ScriptedEngine


class LoggingEngine:
    engine_id = "scripted"

    def __init__(self, inner: ScriptedEngine, worker: str, log: Path) -> None:
        self.inner = inner
        self.worker = worker
        self.log = log

    def _write(self, event: str, request: EngineRequest) -> None:
        line = {
            "worker": self.worker,
            "event": event,
            "phase": request.phase,
            "protocol": request.context.get("protocol"),
            "step": request.context.get("step_index"),
            "t": time.time(),
        }
        with self.log.open("a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    async def run(self, request: EngineRequest) -> EngineResult:
        self._write("start", request)
        try:
            return await self.inner.run(request)
        finally:
            # also when the call is cancelled (SIGTERM hand-back): the step stopped here
            self._write("end", request)


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_json, settings.secret_values())
    if settings.log_level == "DEBUG":  # arq's own lines too, when a run is being debugged
        for name in ("arq.worker", "arq.jobs"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    assert settings.scripted_script is not None
    engine = LoggingEngine(
        ScriptedEngine(settings.scripted_script),
        os.environ["WORKER_NAME"],
        Path(os.environ["STEP_LOG"]),
    )
    build_worker(settings, ctx={"engines": EngineRegistry([engine])}, handle_signals=True).run()


if __name__ == "__main__":
    main()
