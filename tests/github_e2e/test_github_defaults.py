"""The GitHub world runs on the product's defaults: a setting that changes behaviour and is set
by the fixture (tests/conftest.py's make_settings) makes this fail, not the e2e tests quietly
test another product."""

from __future__ import annotations

import time

from bot.core.settings import Settings
from bot.domain.states import ProtocolStatus
from tests.conftest import PLUMBING_SETTINGS, behaviour_overrides
from tests.github_e2e.conftest import GitHubLoop


def test_the_world_has_the_product_defaults(gh: GitHubLoop) -> None:
    settings = gh.state.settings
    # only plumbing differs (the allow-list with its reasons is in tests/conftest.py)
    assert behaviour_overrides(settings) == {}
    assert set(PLUMBING_SETTINGS) <= set(Settings.model_fields)  # no stale name in the list
    # … and the embedded worker runs with them: the shipped poll delay, spare worktrees on
    worker = gh.state.extra["worker"]
    assert worker.poll_delay_s == Settings().worker_poll_delay_s
    deadline = time.monotonic() + 10  # its services are built when its task first runs
    while "git" not in worker.ctx and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.ctx["git"].warm_spares is Settings().warm_worktrees is True


def test_a_second_protocol_starts_in_the_spare_worktree(gh: GitHubLoop) -> None:
    """WARM_WORKTREES (on by default): the first protocol's start leaves a spare checkout of
    the base branch behind, and the next protocol of the repository is started in it."""
    gh.deliver("installation", gh.installation_created())
    gh.deliver("issue_comment", gh.comment("/plan", number=1))
    first = gh.run().run.protocol_name
    cache = gh.state.extra["worker"].ctx["git"]
    gh.call(cache.wait_spares)
    spare = cache.spare_path(str(gh.origin))
    spare_link = (spare / ".git").read_text()  # its registration in the mirror

    gh.deliver("issue_comment", gh.comment("/plan", number=2))
    state = gh.run()
    assert state.run.protocol_name != first and state.run.status == ProtocolStatus.PLANNED
    worktree = cache.worktree_path(str(gh.origin), state.run.protocol_name)
    # `worktree move` keeps the registration: the protocol's checkout is the spare, moved
    assert (worktree / ".git").read_text() == spare_link
    gh.call(cache.wait_spares)
    # … and a new spare (a registration of its own) is ready for the one after
    assert (spare / ".git").read_text() not in ("", spare_link)
