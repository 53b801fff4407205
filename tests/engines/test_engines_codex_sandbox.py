"""The real codex CLI, fenced in by our flags: what the agent's commands can see, write and cost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engines.base import EngineRequest, TokenUsage
from engines.codex import (
    CodexEngine,
    prepare_run_dirs,
    sandbox_overrides,
    save_sessions,
    usage_from_sessions,
)
from tests.fakes.codex_fixtures import FAKE_KEY_NAME, FakeCodex
from tests.fakes.fake_model import final, shell_call, tool_then

pytestmark = pytest.mark.codex

WORKER_SECRETS = {
    "CODEX_API_KEY": "sk-codex-key-never-for-the-agent",
    "DEKSDENFLOW_API_TOKEN": "api-token-never-for-the-agent",
    "GITHUB_TOKEN": "ghs_never_for_the_agent_0123456789",
}


def engine_with_worker_env(fake: FakeCodex) -> CodexEngine:
    """Like a deployment: the worker's environment holds secrets besides the provider key."""
    return CodexEngine(
        fake.codex_bin,
        codex_home=str(fake.home),
        env_allow=[FAKE_KEY_NAME],
        base_env={**os.environ, **fake.env, **WORKER_SECRETS},
    )


def run_request(workdir: Path, prompt: str = "go", **kw: object) -> EngineRequest:
    return EngineRequest(prompt=prompt, workdir=workdir, phase="execute", model="gpt-5.5",
                         timeout_s=kw.pop("timeout_s", 60), **kw)  # type: ignore[arg-type]  # fmt: skip


def test_sandbox_overrides_are_strict() -> None:
    out = sandbox_overrides([Path("/s/home"), Path("/s/tmp")])
    assert "sandbox_workspace_write.exclude_slash_tmp=true" in out
    assert "sandbox_workspace_write.exclude_tmpdir_env_var=true" in out
    assert 'sandbox_workspace_write.writable_roots=["/s/home","/s/tmp"]' in out
    include = next(o for o in out if o.startswith("shell_environment_policy.include_only="))
    assert "CODEX_API_KEY" not in include and '"PATH"' in include


def test_run_dirs_copy_only_config_auth_and_the_resumed_session(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "sessions/2026/01/02").mkdir(parents=True)
    (source / "config.toml").write_text("model = 'x'\n")
    (source / "auth.json").write_text("{}")
    (source / "history.jsonl").write_text("old prompts\n")
    (source / "sessions/2026/01/02/rollout-1-thread-a.jsonl").write_text("{}\n")
    (source / "sessions/2026/01/02/rollout-1-thread-b.jsonl").write_text("{}\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    dirs = prepare_run_dirs(scratch, source, "thread-a")
    copied = sorted(str(p.relative_to(dirs.codex_home)) for p in dirs.codex_home.rglob("*.*"))
    assert copied == ["auth.json", "config.toml", "sessions/2026/01/02/rollout-1-thread-a.jsonl"]
    assert (dirs.codex_home / "auth.json").stat().st_mode & 0o777 == 0o600
    assert dirs.home.stat().st_mode & 0o777 == 0o700 and not any(dirs.home.iterdir())
    # a new thread's session goes back to the configured home for later resumes
    new = dirs.codex_home / "sessions/2026/01/03/rollout-2-thread-c.jsonl"
    new.parent.mkdir(parents=True)
    new.write_text(json.dumps({"type": "token_usage_record", "payload": {
        "thread_token_usage": {"input_tokens": 7, "output_tokens": 3}}}) + "\n")  # fmt: skip
    save_sessions(dirs.codex_home, source, "thread-c")
    assert (source / "sessions/2026/01/03/rollout-2-thread-c.jsonl").is_file()
    assert usage_from_sessions(dirs.codex_home, "thread-c") == TokenUsage(7, 0, 3, 0)
    assert usage_from_sessions(dirs.codex_home, "thread-x") is None


async def test_agent_commands_see_no_key_and_a_private_home(
    fake_codex: FakeCodex, git_repo: Path
) -> None:
    fake_codex.server.enqueue(
        tool_then(shell_call("env; ls -a $HOME; cat $HOME/.codex/auth.json 2>&1")), final("ok")
    )
    result = await engine_with_worker_env(fake_codex).run(run_request(git_repo))
    assert result.ok, result.error
    output = str(fake_codex.server.response_requests()[1].tool_outputs()["call_shell"])
    for value in [*WORKER_SECRETS.values(), *fake_codex.env.values()]:
        assert value not in output
    assert "DEKSDENFLOW_" not in output and "CODEX_API_KEY" not in output
    assert str(fake_codex.home) not in output  # neither the configured CODEX_HOME
    assert f"HOME={Path.home()}\n" not in output


async def test_agent_cannot_write_tmp_or_the_worker_tmpdir(
    fake_codex: FakeCodex, tmp_path: Path, git_repo: Path
) -> None:
    # git_repo is under /tmp (pytest's tmp_path): the workdir stays writable, the rest does not
    outside = tmp_path / "outside-marker"
    worker_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"df-worker-tmp-marker-{os.getpid()}"
    cmd = (
        f"touch in-workdir.txt; touch {outside}; touch {worker_tmp}; "
        "touch /tmp/df-slash-tmp-marker; "
        "touch $TMPDIR/run-tmp && echo TMP-WRITABLE; touch $HOME/run-home && echo HOME-WRITABLE"
    )
    fake_codex.server.enqueue(tool_then(shell_call(cmd)), final("ok"))
    result = await engine_with_worker_env(fake_codex).run(run_request(git_repo))
    assert result.ok, result.error
    output = str(fake_codex.server.response_requests()[1].tool_outputs()["call_shell"])
    assert (git_repo / "in-workdir.txt").exists()
    assert not outside.exists() and not worker_tmp.exists()
    assert not Path("/tmp/df-slash-tmp-marker").exists()
    assert "TMP-WRITABLE" in output and "HOME-WRITABLE" in output  # the run's own dirs are


async def test_a_300_kb_prompt_goes_through_stdin(fake_codex: FakeCodex, git_repo: Path) -> None:
    prompt = "Read all of this. " + "x" * (300 * 1024) + " END-OF-PROMPT"
    fake_codex.server.enqueue(final("read it"))
    result = await fake_codex.engine().run(
        EngineRequest(prompt=prompt, workdir=git_repo, phase="execute", model="gpt-5.5",
                      env=fake_codex.env, timeout_s=60)
    )  # fmt: skip
    assert result.ok, result.error
    assert prompt in fake_codex.server.response_requests()[0].user_texts()
    # and a resume turn takes its prompt the same way
    fake_codex.server.enqueue(final("again"))
    again = await fake_codex.engine().run(
        EngineRequest(prompt=prompt + " 2", workdir=git_repo, phase="execute", model="gpt-5.5",
                      env=fake_codex.env, timeout_s=60, resume_thread_id=result.thread_id,
                      previous_usage=result.thread_usage)
    )  # fmt: skip
    assert again.ok, again.error
    assert fake_codex.server.response_requests()[-1].user_texts()[-1] == prompt + " 2"


async def test_a_timed_out_turn_counts_the_tokens_billed_before_the_kill(
    fake_codex: FakeCodex, git_repo: Path
) -> None:
    fake_codex.server.enqueue(
        tool_then(shell_call("sleep 60"), input_tokens=1000, output_tokens=288), final("never")
    )
    result = await fake_codex.engine(kill_grace_s=1).run(
        EngineRequest(prompt="go", workdir=git_repo, phase="execute", model="gpt-5.5",
                      env=fake_codex.env, timeout_s=4)
    )  # fmt: skip
    assert result.outcome == "timeout"
    assert result.usage == TokenUsage(1000, 0, 288, 0)
    assert result.usage.total == 1288
