"""`deksdenflow gitlab add` against the fake GitLab: the stored project and the created hook."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from bot.cli.main import main
from tests.conftest import GITLAB_SECRET
from tests.gitlab.fake_gitlab import FakeGitLab
from tests.intake.helpers import rows

HOOK_URL = "https://bot.example.com/webhooks/gitlab"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gitlab: FakeGitLab) -> str:
    db_url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    monkeypatch.setenv("DEKSDENFLOW_DB_URL", db_url)
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DEKSDENFLOW_GITLAB_URL", fake_gitlab.url)
    monkeypatch.setenv("DEKSDENFLOW_GITLAB_TOKEN", fake_gitlab.token)
    monkeypatch.setenv("DEKSDENFLOW_GITLAB_WEBHOOK_SECRET", GITLAB_SECRET)
    return db_url


def test_add_by_path_stores_the_project_without_a_hook(
    env: str, fake_gitlab: FakeGitLab, capsys: pytest.CaptureFixture[str]
) -> None:
    project = fake_gitlab.add_project("acme/sub/widgets", project_id=42, default_branch="trunk")
    fake_gitlab.add_file(project, "trunk", ".gitlab-ci.yml", "test: {script: [true]}\n")
    assert main(["gitlab", "add", "acme/sub/widgets"]) == 0
    assert (
        "registered GitLab project acme/sub/widgets (id 42, base trunk, CI: gitlab-ci)"
        in capsys.readouterr().out
    )
    assert [(r.method, r.path) for r in fake_gitlab.requests] == [
        ("GET", "/projects/acme%2Fsub%2Fwidgets"),
        ("HEAD", "/projects/42/repository/files/.gitlab-ci.yml"),
    ]
    stored = rows(
        env,
        "SELECT name, provider, forge_id, git_url, base_branch, ci_provider, enabled FROM projects",
    )
    assert [tuple(r) for r in stored] == [
        (
            "acme/sub/widgets",
            "gitlab",
            "42",
            "https://gitlab.example.com/acme/sub/widgets.git",
            "trunk",
            "gitlab-ci",
            1,
        )
    ]
    assert fake_gitlab.state.hooks[42] == []


def test_add_by_id_with_create_hook_is_idempotent(
    env: str, fake_gitlab: FakeGitLab, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_gitlab.add_project("acme/widgets", project_id=7)
    for _ in range(2):
        assert main(["gitlab", "add", "7", "--create-hook", "--hook-url", HOOK_URL]) == 0
    assert "project hook" in capsys.readouterr().out
    hooks = fake_gitlab.state.hooks[7]
    assert len(hooks) == 1  # the second run updated the hook instead of adding another
    hook = hooks[0]
    assert hook["url"] == HOOK_URL and hook["token"] == GITLAB_SECRET
    assert {
        k: hook[k]
        for k in ("note_events", "issues_events", "merge_requests_events", "pipeline_events")
    } == {
        "note_events": True,
        "issues_events": True,
        "merge_requests_events": True,
        "pipeline_events": True,
    }
    assert hook["push_events"] is False
    assert [r.method for r in fake_gitlab.requests_to(path="/projects/7/hooks*")] == [
        "GET",
        "POST",
        "GET",
        "PUT",
    ]
    stored = rows(env, "SELECT name, forge_id, ci_provider FROM projects")
    assert [tuple(r) for r in stored] == [("acme/widgets", "7", None)]


def test_create_hook_needs_a_url_and_a_secret(
    env: str,
    fake_gitlab: FakeGitLab,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_gitlab.add_project("acme/widgets", project_id=7)
    assert main(["gitlab", "add", "acme/widgets", "--create-hook"]) == 1
    assert "--hook-url" in capsys.readouterr().err
    monkeypatch.delenv("DEKSDENFLOW_GITLAB_WEBHOOK_SECRET")
    assert main(["gitlab", "add", "acme/widgets", "--create-hook", "--hook-url", HOOK_URL]) == 1
    assert "DEKSDENFLOW_GITLAB_WEBHOOK_SECRET" in capsys.readouterr().err
    assert fake_gitlab.requests == []  # refused before any call


def test_unknown_project_is_an_error(
    env: str, fake_gitlab: FakeGitLab, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["gitlab", "add", "nobody/nothing"]) == 1
    assert "404" in capsys.readouterr().err


def test_add_refuses_a_name_registered_on_another_forge(
    env: str, fake_gitlab: FakeGitLab, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_gitlab.add_project("acme/widgets", project_id=43)
    assert main(["gitlab", "add", "acme/widgets"]) == 0
    engine = create_engine(env)
    with engine.begin() as conn:  # the name now belongs to a GitHub project
        conn.execute(
            text("UPDATE projects SET provider = 'github', git_url = 'https://github.com/a/w.git'")
        )
    engine.dispose()
    capsys.readouterr()
    assert main(["gitlab", "add", "acme/widgets"]) == 1
    assert "a github project named acme/widgets is already registered" in capsys.readouterr().err
    # the guarded update left the other forge's project as it was
    stored = rows(env, "SELECT provider, git_url, forge_id FROM projects")
    assert [tuple(r) for r in stored] == [("github", "https://github.com/a/w.git", "43")]
