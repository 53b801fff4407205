"""DEKSDENFLOW_ENGINE_USER: codex and the agent's commands run as an unprivileged account."""

from __future__ import annotations

import os
import pwd
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.base import EngineRequest
from engines.codex import CodexEngine, EngineUser, chown_tree
from tests.fakes.codex_fixtures import FAKE_KEY_NAME, FakeCodex, init_git_repo
from tests.fakes.fake_model import final, shell_call, tool_then

pytestmark = [
    pytest.mark.codex,
    pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root"),
]
USER = "nobody"


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A DATA_DIR-like place the engine user can pass through (pytest's tmp_path is 0700)."""
    with tempfile.TemporaryDirectory(prefix="df-user-", dir="/var/tmp") as d:
        root = Path(d)
        root.chmod(0o711)
        yield root


def test_engine_user_lookup_and_prefix() -> None:
    user = EngineUser.lookup(USER)
    assert user.uid == pwd.getpwnam(USER).pw_uid
    assert user.argv_prefix()[:3] == ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}"]
    with pytest.raises(ValueError, match="does not exist"):
        EngineUser.lookup("no-such-user-df")


def test_chown_tree_never_follows_links(tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    target.write_text("x")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("y")
    (tree / "link").symlink_to(target)
    (tree / ".git").write_text("gitdir: /x\n")
    user = EngineUser.lookup(USER)
    chown_tree(tree, user.uid, user.gid, skip=frozenset({".git"}))
    assert (tree / "sub" / "f").stat().st_uid == user.uid
    assert target.stat().st_uid == 0 and (tree / ".git").stat().st_uid == 0
    chown_tree(tree, 0, 0)
    assert (tree / "sub" / "f").stat().st_uid == 0


async def test_the_agent_runs_unprivileged_and_cannot_read_the_worker_files(
    fake_codex: FakeCodex, shared_root: Path
) -> None:
    secret_file = shared_root / "deksdenflow.sqlite3"
    secret_file.write_text("worker-only-database-content")
    secret_file.chmod(0o600)
    repo_parent = shared_root / "worktrees"
    repo_parent.mkdir(mode=0o755)
    repo = init_git_repo(repo_parent / "repo")
    cmd = (
        f"id -u; cat {secret_file}; cat /root/.bashrc >/dev/null; echo hi > new.txt;"
        " git status --short"
    )
    fake_codex.server.enqueue(tool_then(shell_call(cmd)), final("done"))
    engine = CodexEngine(
        fake_codex.codex_bin,
        codex_home=str(fake_codex.home),
        env_allow=[FAKE_KEY_NAME],
        base_env={**os.environ, **fake_codex.env},
        run_as=USER,
    )
    result = await engine.run(
        EngineRequest(prompt="go", workdir=repo, phase="execute", model="gpt-5.5", timeout_s=60)
    )
    assert result.ok, result.error
    output = str(fake_codex.server.response_requests()[1].tool_outputs()["call_shell"])
    assert re.search(rf"^{pwd.getpwnam(USER).pw_uid}$", output, re.MULTILINE)
    assert "worker-only-database-content" not in output
    assert "Permission denied" in output
    assert "?? new.txt" in output  # the agent's own git works in its worktree
    # the worktree is the bot's again afterwards
    assert (repo / "new.txt").read_text() == "hi\n"
    assert (repo / "new.txt").stat().st_uid == os.geteuid()
    assert repo.stat().st_uid == os.geteuid()
