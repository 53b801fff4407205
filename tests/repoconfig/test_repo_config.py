"""`.deksdenflow.yml` is parsed strictly and read from the base branch only."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.core.errors import SpecError
from bot.git.cache import GitCache
from bot.storage.repo_config import merged_project_values, parse_repo_config, refresh_repo_config
from bot.storage.runs import get_or_create_project
from tests.gitutil import git, make_origin


def test_parse_keeps_known_keys_and_defaults() -> None:
    cfg = parse_repo_config(
        "engine: scripted\nmodels: {qa: small}\nlabels: {'ship it': auto}\n"
        "permissions: {plan: admin}\n"
        "policies: {qa_policy: light, allow_fork_commands: true}\nother: 1\n"
    )
    assert cfg["engine"] == "scripted"
    assert cfg["models"] == {"qa": "small"}
    assert cfg["labels"] == {"ship it": "auto"}
    assert cfg["permissions"] == {"plan": "admin"}
    assert cfg["policies"] == {"qa_policy": "light"}
    assert cfg["allow_fork_commands"] is True
    assert parse_repo_config("") == parse_repo_config("# only comments\n")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[1, 2]", "mapping"),
        ("engine: [x]", "engine"),
        ("permissions: {plan: everyone}", "permissions.plan"),
        ("labels: {x: deploy}", "labels.x"),
        ("policies: {qa_policy: sometimes}", "policies.qa_policy"),
        ("a: [unclosed", "not valid YAML"),
    ],
)
def test_bad_config_names_the_field(text: str, needle: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_repo_config(text)
    assert needle in str(err.value)


def test_merge_keeps_operator_models() -> None:
    values = merged_project_values({"x": 1}, parse_repo_config("engine: codex\nmodels: {qa: m}"))
    assert values["config"]["x"] == 1
    assert values["models"] == {"qa": "m", "engine": "codex"}


async def test_read_from_base_branch_only(tmp_path: Path, sqlite_url: str) -> None:
    from bot.core.settings import Settings
    from bot.storage.db import create_database

    origin = make_origin(tmp_path)
    work = tmp_path / "work"
    git("clone", "-q", str(origin), str(work), cwd=tmp_path)
    (work / ".deksdenflow.yml").write_text("permissions: {plan: admin}\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "config", cwd=work)
    git("push", "-q", "origin", "main", cwd=work)
    # a protocol branch that tries to open commands to everyone
    git("checkout", "-q", "-b", "0001-evil", cwd=work)
    (work / ".deksdenflow.yml").write_text("permissions: {plan: none}\n")
    git("commit", "-q", "-am", "widen", cwd=work)
    git("push", "-q", "origin", "0001-evil", cwd=work)

    db = create_database(Settings(db_url=sqlite_url).async_database_url)
    try:
        project = await get_or_create_project(
            db, name="o/r", provider="github", git_url=str(origin), base_branch="main"
        )
        mirror = await GitCache(tmp_path / "git").ensure_mirror(str(origin))
        await refresh_repo_config(db, project, mirror)
        assert project.config["permissions"] == {"plan": "admin"}
    finally:
        await db.dispose()
