"""The GitLab world runs on the product's defaults: a setting that changes behaviour and is set
by the fixture (tests/conftest.py's make_settings) makes this fail, not the e2e tests quietly
test another product."""

from __future__ import annotations

import time

from bot.core.settings import Settings
from bot.web.app import AppState
from tests.conftest import PLUMBING_SETTINGS, behaviour_overrides
from tests.gitlab_e2e.conftest import World


def test_the_world_has_the_product_defaults(world: World) -> None:
    state: AppState = world.client.app.state.df  # type: ignore[attr-defined]
    # only plumbing differs (the allow-list with its reasons is in tests/conftest.py)
    assert behaviour_overrides(state.settings) == {}
    assert set(PLUMBING_SETTINGS) <= set(Settings.model_fields)  # no stale name in the list
    # … and the embedded worker runs with them: the shipped poll delay, spare worktrees on
    worker = state.extra["worker"]
    assert worker.poll_delay_s == Settings().worker_poll_delay_s
    deadline = time.monotonic() + 10  # its services are built when its task first runs
    while "git" not in worker.ctx and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.ctx["git"].warm_spares is Settings().warm_worktrees is True
