"""One job catalogue: every job the code enqueues is one the worker runs, under `arq
bot.jobs.worker.WorkerSettings` as under `deksdenflow worker`, with the crons and logging."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from arq.worker import get_kwargs

from bot.jobs import catalogue
from bot.jobs.worker import _WorkerSettings, worker_kwargs
from bot.storage.queue import delivery_job
from tests.conftest import make_settings

BOT = Path(__file__).resolve().parents[2] / "bot"
# enqueue_job("name", …), enqueue(ctx, "name", …) and JobSpec("name", …) anywhere in bot/
ENQUEUED = re.compile(
    r'(?:enqueue_job|enqueue)\(\s*(?:ctx,\s*)?"([a-z_]+)"|JobSpec\(\s*"([a-z_]+)"'
)


def enqueued_names() -> set[str]:
    names: set[str] = set()
    for path in BOT.rglob("*.py"):
        for match in ENQUEUED.finditer(path.read_text()):
            names.add(match.group(1) or match.group(2))
    return names


def test_every_enqueued_job_is_in_the_catalogue() -> None:
    found = enqueued_names()
    assert {"process_delivery", "execute_step", "run_quality", "codemachine_prepare"} <= found
    assert found <= catalogue.JOB_NAMES


def test_constructors_name_id_and_arguments() -> None:
    job = catalogue.execute_step(3, 2, "trig-1", depth=2)
    assert (job.function, job.job_id, job.kwargs) == (
        "execute_step",
        "exec:3:2:trig-1",
        {"protocol_run_id": 3, "step_index": 2, "depth": 2},
    )
    qa = catalogue.run_quality(3, 2, "ci-abc", reply_to={"number": 1})
    assert qa.job_id == "qa:3:2:ci-abc" and qa.kwargs["reply_to"] == {"number": 1}
    assert catalogue.process_delivery(9, "github", "d-1") == delivery_job(9, "github", "d-1")
    assert catalogue.plan_protocol(4).job_id == "plan:4:0"
    assert catalogue.project_setup(5, "d1").job_id == "setup:5:d1"
    assert catalogue.codemachine_prepare(6).kwargs == {"protocol_run_id": 6}
    assert {j.function for j in (job, qa)} <= catalogue.JOB_NAMES


def test_deksdenflow_worker_runs_every_job_and_the_crons(tmp_path: Path) -> None:
    kwargs = worker_kwargs(make_settings(tmp_path))
    assert {f.name for f in kwargs["functions"]} == catalogue.JOB_NAMES
    assert {c.name for c in kwargs["cron_jobs"]} == {
        "cron:relay_pending",
        "cron:prune_old_deliveries",
        "cron:reclaim_expired",
    }
    # a run lost with its killed worker is run again, not recorded as failed
    assert all(c.max_tries == 2 for c in kwargs["cron_jobs"])


def test_arq_worker_settings_load_at_start_not_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_REDIS_URL", "redis://127.0.0.1:6379/2")
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DEKSDENFLOW_LOG_JSON", "true")
    monkeypatch.setenv("DEKSDENFLOW_API_TOKEN", "a-secret-api-token-1234")
    root = logging.getLogger()
    before = list(root.handlers)
    settings = _WorkerSettings()  # what the module holds, before arq reads it
    assert dict.__len__(settings) == 0
    try:
        # exactly what `arq bot.jobs.worker.WorkerSettings` does (arq types the values oddly)
        kwargs: dict[str, Any] = dict(get_kwargs(settings))
        assert {f.name for f in kwargs["functions"]} == catalogue.JOB_NAMES
        assert len(kwargs["cron_jobs"]) == 3
        assert kwargs["redis_settings"].database == 2
        assert kwargs["ctx"]["settings"].log_json is True
        ours = [h for h in root.handlers if getattr(h, "_deksdenflow", False)]
        assert len(ours) == 1 and type(ours[0].formatter).__name__ == "JsonFormatter"
        record = logging.LogRecord(
            "x", logging.INFO, __file__, 1, "token a-secret-api-token-1234", (), None
        )
        assert ours[0].filter(record)
        assert "a-secret-api-token-1234" not in record.getMessage()
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)


def test_arq_worker_settings_refuse_the_memory_queue(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bot.core.errors import ConfigError

    monkeypatch.setenv("DEKSDENFLOW_REDIS_URL", "memory://")
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="memory://"):
        get_kwargs(_WorkerSettings())
