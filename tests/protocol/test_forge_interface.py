"""The Forge interface is the whole truth: every forge has every member, and Local answers honestly.

Jobs and handlers call these members on whatever forge they hold, never asking which one it is,
so a member missing from one forge would be an AttributeError in production on that forge only.
"""

from __future__ import annotations

import inspect

import pytest
from sqlalchemy import text

from bot.core.errors import NotFound
from bot.core.settings import Settings
from bot.forge.base import (
    CheckReport,
    Forge,
    IssueRef,
    PullRef,
    RepoFacts,
    RepoRef,
    remote_status_targets,
)
from bot.forge.github import GitHubForge
from bot.forge.gitlab import GitLabForge
from bot.forge.local import LocalForge
from bot.jobs.feedback import recall, remember
from bot.storage.db import database_from_settings
from bot.storage.runs import get_or_create_project
from tests.protocol.conftest import Harness

FORGES = (GitHubForge, GitLabForge, LocalForge)


def _members() -> dict[str, object]:
    methods = {
        name: member
        for name, member in vars(Forge).items()
        if callable(member) and not name.startswith("_")
    }
    attributes = {name: None for name in Forge.__annotations__}
    return {**attributes, **methods}


@pytest.mark.parametrize("forge", FORGES, ids=lambda f: f.__name__)
def test_every_forge_has_every_member_with_the_same_parameters(forge: type) -> None:
    for name, member in _members().items():
        assert hasattr(forge, name), f"{forge.__name__} lacks {name}"
        if member is None:
            continue
        wanted = list(inspect.signature(member).parameters)  # type: ignore[arg-type]
        found = list(inspect.signature(getattr(forge, name)).parameters)
        assert found == wanted, f"{forge.__name__}.{name}{found} is not {wanted}"
        assert inspect.iscoroutinefunction(getattr(forge, name)) == inspect.iscoroutinefunction(
            member
        )


def test_pull_words_and_kinds() -> None:
    assert (GitHubForge.pull_kind, GitHubForge.pull_word) == ("pull", "pull request")
    assert (GitLabForge.pull_kind, GitLabForge.pull_word) == ("merge_request", "merge request")
    assert (LocalForge.pull_kind, LocalForge.pull_word) == ("pull", "pull request")
    assert "assign" in GitLabForge.quick_actions and not GitHubForge.quick_actions


def test_remote_status_targets_are_the_issue_and_the_pull_that_exist() -> None:
    repo = RepoRef("gitlab", "g/p")
    assert remote_status_targets(repo, None, None, "merge_request") == []
    assert remote_status_targets(repo, 4, None, "merge_request") == [IssueRef(repo, 4, "issue")]
    assert remote_status_targets(repo, None, 9, "merge_request") == [
        IssueRef(repo, 9, "merge_request")
    ]


async def test_local_forge_answers_from_its_records(harness: Harness) -> None:
    forge = LocalForge(harness.ctx["db"], harness.project.id)
    repo = RepoRef("local", str(harness.origin))
    # a local run has no issue: its status lives on thread 0
    assert forge.status_targets(repo, None, None) == [IssueRef(repo, 0, "issue")]
    assert forge.status_targets(repo, 3, 7) == [
        IssueRef(repo, 3, "issue"),
        IssueRef(repo, 7, "pull"),
    ]
    assert await forge.describe_repo(repo, RepoFacts("main", str(harness.origin), None)) is None
    assert await forge.clone_url(repo) == str(harness.origin)
    assert await forge.own_handles() == ()
    assert not await forge.is_self(author="me", author_id=1)
    assert not await forge.pull_is_fork(repo, 1)
    assert (
        await forge.review_comments(repo, 1, 2) == [] and await forge.review_state(repo, 1, 2) == ""
    )

    pull = await forge.open_draft_pr(repo, head="0001-task", base="main", title="t", body="b")
    assert await forge.pull_branches(repo, pull.number) == ("0001-task", "main")
    with pytest.raises(NotFound):
        await forge.pull_branches(repo, pull.number + 1000)
    assert await forge.mark_ready(pull)
    (record,) = await forge.records("pull")
    assert record.data["draft"] is False
    assert not await forge.mark_ready(PullRef(repo, pull.number + 1000, "", "x"))

    check = CheckReport(
        name="deksdenflow/step-01", head_sha="a" * 40, status="completed", conclusion="success"
    )
    assert await forge.put_check(repo, check, run_id=5, lookup=False) is None
    assert [r.data["name"] for r in await forge.records("check")] == ["deksdenflow/step-01"]

    await forge.reply_in_thread(IssueRef(repo, pull.number, "pull"), "t-1", "fixed", resolve=True)
    (reply,) = await forge.records("reply")
    assert (reply.body, reply.data["resolve"]) == ("fixed", True)


async def test_local_forge_upsert_replaces_the_body_and_merges_the_data(db_url: str) -> None:
    """One record per (kind, key): a second post keeps its id, replaces its body and merges
    the new data keys over the old ones (on Postgres that is one statement)."""
    db = database_from_settings(Settings(db_url=db_url))
    try:
        project = await get_or_create_project(
            db, name="p", provider="local", git_url="/x", base_branch="main"
        )
        forge = LocalForge(db, project.id)
        first = await forge._upsert("check", "k", "one", {"a": 1, "b": {"x": 1}, "c": None})
        again = await forge._upsert("check", "k", "two", {"b": {"y": 2}, "d": "new"})
        other = await forge._upsert("check", "other")
        assert again == first != other
        records = {r.key: r for r in await forge.records("check")}
        assert records["k"].body == "two"
        assert records["k"].data == {"a": 1, "b": {"y": 2}, "c": None, "d": "new"}
        assert (records["other"].body, records["other"].data) == ("", {})
        assert records["k"].updated_at >= records["k"].created_at
    finally:
        await db.dispose()


async def test_one_statement_sessions_commit_on_their_own(db_url: str) -> None:
    """`Database.single`: autocommit on Postgres (no BEGIN, no ROLLBACK round trip for a read or
    an upsert), the usual sessions on SQLite; either way a statement's write is kept."""
    db = database_from_settings(Settings(db_url=db_url))
    try:
        assert (db.single is db.sessions) == db.is_sqlite
        async with db.single() as session:
            await session.execute(text("SELECT 1"))
            raw = await (await session.connection()).get_raw_connection()
            # psycopg's own flag; aiosqlite's connection has none
            autocommit = getattr(raw.driver_connection, "autocommit", False)
        assert autocommit != db.is_sqlite
        async with db.sessions() as session:  # the pool's connection is back in transactions
            raw = await (await session.connection()).get_raw_connection()
            assert not getattr(raw.driver_connection, "autocommit", False)
        project = await get_or_create_project(
            db, name="p", provider="local", git_url="/x", base_branch="main"
        )
        await remember(db, project.id, "memo:check", "k", {"id": 1})
        assert await recall(db, project.id, "memo:check", "k") == {"id": 1}
    finally:
        await db.dispose()
