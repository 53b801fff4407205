"""`deksdenflow setup` locally and the project_onboard job on a forge (Local), with scripted
discovery."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from bot.cli.main import main
from bot.cli.onboard import local_setup
from bot.core.errors import ConfigError
from bot.forge.local import LocalForge
from bot.git.onboarding import GITHUB_WORKFLOW, GITLAB_CI, SETUP_BRANCH, starter_paths
from bot.jobs.local_runtime import local_runtime
from bot.jobs.onboard import project_onboard
from bot.storage.models import Event
from tests.gitutil import git
from tests.protocol.conftest import (
    Harness,
    commit_to_origin,
    origin_branches,
    origin_file,
    protocol_settings,
)

HOOKS = [f"scripts/ci/{h}.sh" for h in ("bootstrap", "lint", "typecheck", "test", "build")]


def is_exec(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IXUSR)


async def events_of(settings: object, prefix: str) -> list[Event]:
    async with local_runtime(settings) as ctx:  # type: ignore[arg-type]
        async with ctx["db"].sessions() as session:
            rows = (await session.execute(select(Event).order_by(Event.id))).scalars()
            return [e for e in rows if e.event_type.startswith(prefix)]


async def test_setup_on_an_empty_directory(tmp_path: Path) -> None:
    settings = protocol_settings(tmp_path)
    repo = tmp_path / "empty"
    repo.mkdir()
    with pytest.raises(ConfigError, match="--init-if-needed"):
        await local_setup(settings, repo)
    assert not (repo / ".git").exists() and list(repo.iterdir()) == []

    report = await local_setup(settings, repo, base="trunk", init_if_needed=True)
    assert report.initialized
    assert git("symbolic-ref", "--short", "HEAD", cwd=repo).strip() == "trunk"
    assert sorted(report.created) == sorted(starter_paths())
    assert report.kept == [] and report.overwritten == []
    for rel in starter_paths():
        assert (repo / rel).is_file(), rel
    for rel in [*HOOKS, "scripts/ci/report.sh"]:
        assert is_exec(repo / rel), rel
    assert not is_exec(repo / ".deksdenflow.yml")
    # both warnings: no origin, no base branch yet
    assert any("origin" in w for w in report.warnings)
    assert any("'trunk' does not exist" in w for w in report.warnings)
    # the config is valid YAML whose settings are all commented defaults
    assert yaml.safe_load((repo / ".deksdenflow.yml").read_text()) is None
    assert "# engine: codex" in (repo / ".deksdenflow.yml").read_text()
    events = await events_of(settings, "project.setup")
    assert events[-1].metadata_["created"] == report.created


def run_ci_steps(repo: Path) -> list[tuple[str, str]]:
    """Run the GitHub workflow's hook steps and the GitLab job's script like CI would."""
    workflow = yaml.safe_load((repo / GITHUB_WORKFLOW).read_text())
    outputs = []
    for step in workflow["jobs"]["ci"]["steps"]:
        command = step.get("run")
        if not command or "${{" in command:
            continue
        done = subprocess.run(
            ["bash", "-e", "-c", command], cwd=repo, capture_output=True, text=True
        )
        assert done.returncode == 0, (step["name"], done.stdout, done.stderr)
        outputs.append((step["name"], done.stdout.strip()))
    gitlab = yaml.safe_load((repo / GITLAB_CI).read_text())
    script = "\n".join(gitlab["deksdenflow-ci"]["script"])
    done = subprocess.run(["bash", "-e", "-c", script], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout, done.stderr)
    outputs.append(("gitlab", done.stdout.strip()))
    return outputs


async def test_ci_stays_green_with_missing_or_non_executable_hooks(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    await local_setup(protocol_settings(tmp_path), repo, init_if_needed=True)
    (repo / "scripts/ci/lint.sh").unlink()
    (repo / "scripts/ci/test.sh").chmod(0o644)
    out = dict(run_ci_steps(repo))
    assert out["lint"].startswith("skip: scripts/ci/lint.sh")
    assert out["test"].startswith("skip: scripts/ci/test.sh")
    assert out["bootstrap"] == "bootstrap: nothing configured yet"
    assert (
        "skip: scripts/ci/lint.sh" in out["gitlab"]
        and "build: nothing configured yet" in out["gitlab"]
    )
    # report.sh without its variables skips too, so CI outside a DeksdenFlow setup stays green
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")}
    done = await asyncio.to_thread(
        subprocess.run,
        ["scripts/ci/report.sh", "success"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0 and done.stdout.startswith("skip:")


async def test_setup_on_an_existing_repository_keeps_files_and_force_backs_up(
    tmp_path: Path,
) -> None:
    settings = protocol_settings(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / ".deksdenflow.yml").write_text("engine: scripted\n")
    (repo / "scripts/ci").mkdir(parents=True)
    (repo / "scripts/ci/test.sh").write_text("#!/bin/sh\npytest\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "init", cwd=repo)
    git("remote", "add", "origin", str(tmp_path / "nowhere.git"), cwd=repo)

    report = await local_setup(settings, repo)
    assert sorted(report.kept) == [".deksdenflow.yml", "scripts/ci/test.sh"]
    assert sorted(report.created) == sorted(set(starter_paths()) - set(report.kept))
    assert report.warnings == []  # origin and main exist
    assert (repo / ".deksdenflow.yml").read_text() == "engine: scripted\n"
    assert (repo / "scripts/ci/test.sh").read_text() == "#!/bin/sh\npytest\n"

    # a second run changes nothing
    again = await local_setup(settings, repo)
    assert again.created == [] and sorted(again.kept) == sorted(starter_paths())

    forced = await local_setup(settings, repo, force=True)
    assert sorted(forced.overwritten) == sorted(starter_paths())
    assert (repo / ".deksdenflow.yml.bak").read_text() == "engine: scripted\n"
    assert (repo / "scripts/ci/test.sh.bak").read_text() == "#!/bin/sh\npytest\n"
    assert "# engine: codex" in (repo / ".deksdenflow.yml").read_text()
    # forcing again keeps the user's original in the backup, not our own file
    await local_setup(settings, repo, force=True)
    assert (repo / ".deksdenflow.yml.bak").read_text() == "engine: scripted\n"


async def test_setup_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEKSDENFLOW_DB_URL", f"sqlite:///{tmp_path / 'db.sqlite3'}")
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path / "data"))
    repo = tmp_path / "cli-repo"
    assert await _main(["setup", "--repo", str(repo)]) == 1
    assert "--init-if-needed" in capsys.readouterr().err
    assert await _main(["setup", "--repo", str(repo), "--init-if-needed", "--base", "main"]) == 0
    captured = capsys.readouterr()
    assert "created   .deksdenflow.yml" in captured.out
    assert "warning: no `origin` remote" in captured.err


async def _main(argv: list[str]) -> int:
    # main() runs its own event loop: keep it off this test's loop
    return await asyncio.to_thread(main, argv)


async def test_local_discovery_commits_on_a_setup_branch(tmp_path: Path) -> None:
    settings = protocol_settings(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "init", cwd=repo)

    report = await local_setup(settings, repo, discovery=True)
    assert report.discovery_branch == SETUP_BRANCH
    assert sorted(report.discovery_changed or []) == sorted(HOOKS)
    # the checkout and its branch are untouched; the proposal is a branch to review
    assert git("status", "--porcelain", cwd=repo) == ""
    assert git("symbolic-ref", "--short", "HEAD", cwd=repo).strip() == "main"
    assert git("log", "--format=%s", "main", cwd=repo).splitlines() == ["init"]
    log = git("log", "--format=%s", SETUP_BRANCH, cwd=repo).splitlines()
    assert log[:2] == [
        "ci(setup): fill the CI hooks for the detected stack",
        "chore(setup): add DeksdenFlow configuration and CI hooks",
    ]
    test_hook = git("show", f"{SETUP_BRANCH}:scripts/ci/test.sh", cwd=repo)
    assert "python3 -m pytest -q" in test_hook
    mode = git("ls-tree", SETUP_BRANCH, "scripts/ci/test.sh", cwd=repo).split()[0]
    assert mode == "100755"
    with pytest.raises(ConfigError, match="already exists"):
        await local_setup(settings, repo, discovery=True)


# -- on a forge (the Local forge over a bare origin) ---------------------------------------


def branch_diff(origin: Path, base: str, branch: str) -> list[str]:
    return sorted(git("diff", "--name-only", f"{base}...{branch}", cwd=origin).split())


async def pulls(h: Harness) -> Sequence[object]:
    return await LocalForge(h.ctx["db"], h.project.id).records("pull")


async def test_onboard_job_opens_a_draft_pr_with_exactly_the_missing_files(
    harness: Harness,
) -> None:
    h = harness
    commit_to_origin(
        h.origin,
        "main",
        {
            ".gitlab-ci.yml": "test:\n  script: [make test]\n",
            "scripts/ci/lint.sh": "#!/bin/sh\nruff .\n",
        },
        "existing CI",
    )
    reply = {"number": 5, "kind": "issue", "comment_id": 77}
    assert await project_onboard(h.ctx, project_id=h.project.id, reply_to=reply) == "ok"
    expected = sorted(set(starter_paths()) - {".gitlab-ci.yml", "scripts/ci/lint.sh"})
    assert SETUP_BRANCH in origin_branches(h.origin)
    assert branch_diff(h.origin, "main", SETUP_BRANCH) == expected
    assert origin_file(h.origin, SETUP_BRANCH, ".gitlab-ci.yml") == "test:\n  script: [make test]\n"
    mode = git("ls-tree", SETUP_BRANCH, "scripts/ci/test.sh", cwd=h.origin).split()[0]
    assert mode == "100755"
    [pull] = await pulls(h)
    assert pull.key == SETUP_BRANCH and pull.data["draft"] and pull.data["base"] == "main"  # type: ignore[attr-defined]
    for path in expected:
        assert f"`{path}`" in pull.body  # type: ignore[attr-defined]
    assert "`.gitlab-ci.yml`" not in pull.body  # type: ignore[attr-defined]
    comments = await LocalForge(h.ctx["db"], h.project.id).records("comment")
    assert "Setup proposed in local://" in comments[-1].body

    # idempotent: a second /init proposes the same thing, in the same PR
    assert await project_onboard(h.ctx, project_id=h.project.id) == "ok"
    assert branch_diff(h.origin, "main", SETUP_BRANCH) == expected
    assert len(await pulls(h)) == 1

    # once merged, there is nothing left to propose
    git("update-ref", "refs/heads/main", f"refs/heads/{SETUP_BRANCH}", cwd=h.origin)
    assert await project_onboard(h.ctx, project_id=h.project.id) == "nothing"
    async with h.ctx["db"].sessions() as session:
        types = [e.event_type for e in (await session.execute(select(Event))).scalars()]
    assert types.count("project.onboarded") == 2 and "project.onboard_skipped" in types


async def test_onboard_job_with_scripted_discovery_adds_a_reviewable_commit(
    harness: Harness,
) -> None:
    h = harness
    commit_to_origin(h.origin, "main", {"package.json": '{"scripts": {"test": "jest"}}\n'}, "node")
    base_before = git("rev-parse", "main", cwd=h.origin).strip()
    assert await project_onboard(h.ctx, project_id=h.project.id, run_discovery=True) == "ok"
    assert git("rev-parse", "main", cwd=h.origin).strip() == base_before  # never the base branch
    log = git("log", "--format=%s", f"main..{SETUP_BRANCH}", cwd=h.origin).splitlines()
    assert log == [
        "ci(setup): fill the CI hooks for the detected stack",
        "chore(setup): add DeksdenFlow configuration and CI hooks",
    ]
    assert "npm test" in origin_file(h.origin, SETUP_BRANCH, "scripts/ci/test.sh")
    [pull] = await pulls(h)
    assert "CI discovery filled in the hooks" in pull.body  # type: ignore[attr-defined]
    async with h.ctx["db"].sessions() as session:
        types = [e.event_type for e in (await session.execute(select(Event))).scalars()]
    assert "discovery.completed" in types
