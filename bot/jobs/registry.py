"""The protocol and forge jobs the worker runs, beside process_delivery."""

from __future__ import annotations

from typing import Any

from arq.worker import func

from bot.jobs.common import MAX_TRIES
from bot.jobs.projects import project_setup
from bot.jobs.protocol import execute_step, plan_protocol, run_quality
from bot.jobs.setup import codemachine_prepare, project_onboard
from bot.settings import Settings


def protocol_functions(settings: Settings) -> list[Any]:
    # engine calls can be long: the job timeout is the engine timeout plus git and forge time
    timeout = int(settings.engine_timeout_s * 3 + settings.git_timeout_s * 2)
    # arq's Retry counts as a try: lock waits need room beyond the 3 real attempts
    tries = MAX_TRIES + 30
    return [
        func(plan_protocol, name="plan_protocol", timeout=timeout, max_tries=tries),
        func(execute_step, name="execute_step", timeout=timeout, max_tries=tries),
        func(run_quality, name="run_quality", timeout=timeout, max_tries=tries),
        func(project_setup, name="project_setup", timeout=120, max_tries=MAX_TRIES),
        func(project_onboard, name="project_onboard", timeout=timeout, max_tries=MAX_TRIES),
        func(codemachine_prepare, name="codemachine_prepare", timeout=timeout, max_tries=tries),
    ]
