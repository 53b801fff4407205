"""GitLabForge against the fake server: each method's exact requests and their effects."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from bot.forge.base import CheckReport, CommentRef, Forge, IssueRef, PullRef, RepoFacts, RepoRef
from bot.forge.gitlab import (
    GitLabForge,
    commit_state,
    commit_status_payload,
    draft_title,
    find_status_note,
    git_basic_auth_header,
    permission_for,
    ready_title,
)
from bot.forge.gitlab_client import GitLabAPIError
from tests.gitlab.fake_gitlab import DEVELOPER, GUEST, MAINTAINER, OWNER, REPORTER, FakeGitLab

SHA = "a" * 40


def test_gitlab_forge_satisfies_the_forge_protocol(forge: GitLabForge) -> None:
    as_forge: Forge = forge
    assert as_forge.provider == "gitlab"


# -- reactions and notes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reaction", "emoji"),
    [("eyes", "eyes"), ("rocket", "rocket"), ("confused", "confused"), ("+1", "thumbsup")],
)
async def test_add_reaction_on_issue_note(
    fake_gitlab: FakeGitLab,
    forge: GitLabForge,
    project: dict[str, Any],
    repo: RepoRef,
    reaction: Any,
    emoji: str,
) -> None:
    issue = fake_gitlab.add_issue(project)
    note = fake_gitlab.add_note(project, "issues", issue["iid"], "/deksdenflow run")
    fake_gitlab.clear_requests()
    comment = CommentRef(IssueRef(repo, issue["iid"]), note["id"])
    await forge.add_reaction(comment, reaction)
    assert fake_gitlab.calls() == [("POST", f"/projects/7/issues/1/notes/{note['id']}/award_emoji")]
    assert fake_gitlab.requests[0].json == {"name": emoji}


async def test_add_reaction_on_mr_note_is_idempotent(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    mr = fake_gitlab.add_merge_request(project, source_branch="0001-x")
    note = fake_gitlab.add_note(project, "merge_requests", mr["iid"], "/deksdenflow qa")
    comment = CommentRef(IssueRef(repo, mr["iid"], kind="merge_request"), note["id"])
    await forge.add_reaction(comment, "eyes")
    await forge.add_reaction(comment, "eyes")  # GitLab answers 404 "already been taken"
    path = f"/projects/7/merge_requests/{mr['iid']}/notes/{note['id']}/award_emoji"
    assert fake_gitlab.calls() == [("POST", path), ("POST", path)]
    assert [r.status for r in fake_gitlab.requests] == [201, 404]
    assert len(fake_gitlab.state.award_emoji) == 1


async def test_post_comment(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    issue = fake_gitlab.add_issue(project)
    target = IssueRef(repo, issue["iid"])
    ref = await forge.post_comment(target, "Planning started.")
    assert fake_gitlab.calls() == [("POST", "/projects/7/issues/1/notes")]
    assert fake_gitlab.requests[0].json == {"body": "Planning started."}
    [note] = fake_gitlab.notes_of(project, "issues", issue["iid"])
    assert ref == CommentRef(target, note["id"])


async def test_project_path_is_used_without_forge_id(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any]
) -> None:
    issue = fake_gitlab.add_issue(project)
    by_path = RepoRef(provider="gitlab", full_name="acme/widgets")
    await forge.post_comment(IssueRef(by_path, issue["iid"]), "hi")
    assert fake_gitlab.calls() == [("POST", "/projects/acme%2Fwidgets/issues/1/notes")]


# -- the status note -------------------------------------------------------------------------

MARKER = "<!-- deksdenflow:status:0001-demo -->"


async def test_status_note_created_then_edited_in_place(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    issue = fake_gitlab.add_issue(project)
    target = IssueRef(repo, issue["iid"])

    first = await forge.upsert_status_comment(target, MARKER, f"{MARKER}\nplanning")
    assert fake_gitlab.calls() == [
        ("GET", "/user"),
        ("GET", "/projects/7/issues/1/notes"),
        ("POST", "/projects/7/issues/1/notes"),
    ]
    assert fake_gitlab.requests[1].query == {
        "sort": "asc",
        "order_by": "created_at",
        "per_page": "100",
        "page": "1",
    }
    fake_gitlab.clear_requests()

    second = await forge.upsert_status_comment(target, MARKER, f"{MARKER}\nrunning step 1")
    assert second == first
    # /user is asked once per forge, not per call.
    assert fake_gitlab.calls() == [
        ("GET", "/projects/7/issues/1/notes"),
        ("PUT", f"/projects/7/issues/1/notes/{first.comment_id}"),
    ]
    assert fake_gitlab.requests[1].json == {"body": f"{MARKER}\nrunning step 1"}
    [note] = fake_gitlab.notes_of(project, "issues", issue["iid"])
    assert note["body"].endswith("running step 1")


async def test_status_note_unchanged_body_sends_no_put(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    issue = fake_gitlab.add_issue(project)
    target = IssueRef(repo, issue["iid"])
    await forge.upsert_status_comment(target, MARKER, "same")
    fake_gitlab.clear_requests()
    await forge.upsert_status_comment(target, MARKER, "same")
    assert fake_gitlab.calls() == [("GET", "/projects/7/issues/1/notes")]


async def test_status_note_ignores_another_users_note_with_the_marker(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    mallory = fake_gitlab.add_user("mallory")
    mr = fake_gitlab.add_merge_request(project, source_branch="0001-demo")
    forged = fake_gitlab.add_note(
        project, "merge_requests", mr["iid"], f"{MARKER}\nall green!", author=mallory
    )
    target = IssueRef(repo, mr["iid"], kind="merge_request")

    ref = await forge.upsert_status_comment(target, MARKER, "real status")

    assert ref.comment_id != forged["id"]
    assert fake_gitlab.calls()[-1] == ("POST", f"/projects/7/merge_requests/{mr['iid']}/notes")
    assert fake_gitlab.requests[-1].json == {"body": f"{MARKER}\nreal status"}  # marker added
    notes = fake_gitlab.notes_of(project, "merge_requests", mr["iid"])
    assert [n["body"] for n in notes] == [f"{MARKER}\nall green!", f"{MARKER}\nreal status"]


async def test_status_note_found_beyond_the_first_page(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    issue = fake_gitlab.add_issue(project)
    human = fake_gitlab.add_user("alice")
    for n in range(100):
        fake_gitlab.add_note(project, "issues", issue["iid"], f"chatter {n}", author=human)
    ours = fake_gitlab.add_note(project, "issues", issue["iid"], f"{MARKER}\nold")
    fake_gitlab.clear_requests()
    ref = await forge.upsert_status_comment(IssueRef(repo, issue["iid"]), MARKER, "new")
    assert ref.comment_id == ours["id"]
    assert [r.query.get("page") for r in fake_gitlab.requests_to("GET", "*/notes")] == ["1", "2"]
    assert fake_gitlab.calls()[-1] == ("PUT", f"/projects/7/issues/1/notes/{ours['id']}")


def test_find_status_note_skips_system_notes_and_strangers() -> None:
    notes = [
        {"id": 1, "body": MARKER, "author": {"id": 9}, "system": False},
        {"id": 2, "body": MARKER, "author": {"id": 5}, "system": True},
        {"id": 3, "body": f"x {MARKER}", "author": {"id": 5}, "system": False},
    ]
    assert find_status_note(notes, MARKER, 5) == notes[2]
    assert find_status_note(notes, "<!-- other -->", 5) is None


# -- draft merge requests --------------------------------------------------------------------


async def test_open_draft_mr_creates_with_draft_title_then_is_idempotent(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    pull = await forge.open_draft_pr(
        repo, head="0001-demo", base="main", title="Protocol 0001: demo", body="plan"
    )
    assert fake_gitlab.calls() == [
        ("GET", "/projects/7/merge_requests"),
        ("POST", "/projects/7/merge_requests"),
    ]
    assert fake_gitlab.requests[0].query == {"state": "opened", "source_branch": "0001-demo"}
    assert fake_gitlab.requests[1].json == {
        "source_branch": "0001-demo",
        "target_branch": "main",
        "title": "Draft: Protocol 0001: demo",
        "description": "plan",
    }
    assert pull == PullRef(
        repo, 1, "https://gitlab.example.com/acme/widgets/-/merge_requests/1", "0001-demo"
    )
    mr = fake_gitlab.state.merge_requests[(7, 1)]
    assert mr["draft"] is True

    fake_gitlab.clear_requests()
    again = await forge.open_draft_pr(
        repo, head="0001-demo", base="main", title="Protocol 0001: demo", body="plan"
    )
    assert again == pull
    assert fake_gitlab.calls() == [("GET", "/projects/7/merge_requests")]
    assert len(fake_gitlab.state.merge_requests) == 1


async def test_open_draft_mr_ignores_closed_and_fork_mrs(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    fake_gitlab.add_merge_request(project, source_branch="0002-x", state="closed")
    fake_gitlab.add_merge_request(
        project, source_branch="0002-x", target_branch="dev", source_project_id=999
    )
    pull = await forge.open_draft_pr(repo, head="0002-x", base="main", title="T", body="")
    assert pull.number == 3
    assert fake_gitlab.requests[-1].json["title"] == "Draft: T"


async def test_open_draft_mr_race_returns_the_winner(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    # Another worker creates the MR between our lookup and our POST: GitLab answers 409.
    fake_gitlab.fail("/projects/7/merge_requests", method="GET", status=200, body=[])
    winner = fake_gitlab.add_merge_request(project, source_branch="0003-r", title="Draft: R")
    pull = await forge.open_draft_pr(repo, head="0003-r", base="main", title="R", body="")
    assert pull.number == winner["iid"]
    assert [r.status for r in fake_gitlab.requests] == [200, 409, 200]


async def test_update_pr_keeps_draft_prefix(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    pull = await forge.open_draft_pr(repo, head="0004-u", base="main", title="Old", body="b")
    fake_gitlab.clear_requests()
    await forge.update_pr(pull, title="New title", body="new body")
    assert fake_gitlab.calls() == [
        ("GET", "/projects/7/merge_requests/1"),
        ("PUT", "/projects/7/merge_requests/1"),
    ]
    assert fake_gitlab.requests[1].json == {"title": "Draft: New title", "description": "new body"}

    fake_gitlab.clear_requests()
    await forge.update_pr(pull, body="only body")
    assert fake_gitlab.calls() == [("PUT", "/projects/7/merge_requests/1")]
    assert fake_gitlab.requests[0].json == {"description": "only body"}

    fake_gitlab.clear_requests()
    await forge.update_pr(pull)
    assert fake_gitlab.calls() == []


async def test_update_pr_on_ready_mr_keeps_it_ready(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    mr = fake_gitlab.add_merge_request(project, source_branch="b", title="Ready")
    pull = PullRef(repo, mr["iid"], mr["web_url"], "b")
    await forge.update_pr(pull, title="Still ready")
    assert fake_gitlab.requests[-1].json == {"title": "Still ready"}


async def test_mark_ready_drops_the_prefix(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    pull = await forge.open_draft_pr(repo, head="0005-m", base="main", title="M", body="")
    await forge.mark_ready(pull)
    assert fake_gitlab.requests[-1].json == {"title": "M"}
    assert fake_gitlab.state.merge_requests[(7, pull.number)]["draft"] is False


def test_draft_title_forms() -> None:
    assert draft_title("X") == "Draft: X"
    assert draft_title("Draft: X") == "Draft: X"
    assert draft_title("[Draft] X") == "[Draft] X"
    assert ready_title("Draft: X") == "X"
    assert ready_title("(draft) X") == "X"
    assert ready_title("Drafting X") == "Drafting X"


# -- commit statuses -------------------------------------------------------------------------


def check(status: Any, conclusion: Any = None, **extra: Any) -> CheckReport:
    return CheckReport(
        name="deksdenflow/step-01", head_sha=SHA, status=status, conclusion=conclusion, **extra
    )


@pytest.mark.parametrize(
    ("status", "conclusion", "state"),
    [
        ("queued", None, "pending"),
        ("in_progress", None, "running"),
        ("completed", "success", "success"),
        ("completed", "failure", "failed"),
        ("completed", "cancelled", "canceled"),
        ("completed", "neutral", "success"),
        ("completed", "action_required", "failed"),
        ("completed", None, "failed"),
    ],
)
def test_commit_state_mapping(status: Any, conclusion: Any, state: str) -> None:
    assert commit_state(check(status, conclusion)) == state


def test_commit_status_payload_limits() -> None:
    long = CheckReport(
        name="deksdenflow/" + "x" * 400,
        head_sha=SHA,
        status="completed",
        conclusion="success",
        title="t " * 300,
        details_url="https://bot.example.com/runs/1",
    )
    payload = commit_status_payload(long, pipeline_id=None)
    assert len(payload["name"]) < 255
    assert len(payload["description"]) <= 255
    assert payload["target_url"] == "https://bot.example.com/runs/1"
    assert "pipeline_id" not in payload


async def test_report_check_attaches_to_the_commits_pipeline(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    pipeline = fake_gitlab.add_pipeline(project, SHA, ref="0001-demo")
    await forge.report_check(
        repo,
        check(
            "in_progress",
            title="Step 1: scaffold",
            details_url="https://bot.example.com/protocols/1",
        ),
    )
    assert fake_gitlab.calls() == [
        ("GET", f"/projects/7/repository/commits/{SHA}"),
        ("POST", f"/projects/7/statuses/{SHA}"),
    ]
    assert fake_gitlab.requests[1].json == {
        "state": "running",
        "name": "deksdenflow/step-01",
        "description": "Step 1: scaffold",
        "target_url": "https://bot.example.com/protocols/1",
        "pipeline_id": pipeline["id"],
    }
    [status] = fake_gitlab.state.statuses
    assert (status["status"], status["pipeline_id"]) == ("running", pipeline["id"])


async def test_report_check_without_pipeline_sends_no_pipeline_id(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    fake_gitlab.add_commit(project, SHA)
    await forge.report_check(repo, check("queued"))
    assert fake_gitlab.requests[1].json == {"state": "pending", "name": "deksdenflow/step-01"}


async def test_report_check_same_state_twice_is_success(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    fake_gitlab.add_pipeline(project, SHA)
    await forge.report_check(repo, check("in_progress"))
    await forge.report_check(repo, check("in_progress"))  # GitLab: 400 Cannot transition…
    await forge.report_check(repo, check("queued", None))
    await forge.report_check(repo, check("queued", None))
    await forge.report_check(repo, check("completed", "success"))
    posts = fake_gitlab.requests_to("POST", "/projects/7/statuses/*")
    assert [r.status for r in posts] == [201, 400, 201, 400, 201]
    assert [s["status"] for s in fake_gitlab.state.statuses] == ["success"]


async def test_report_check_other_400_raises(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    fake_gitlab.add_commit(project, SHA)
    fake_gitlab.fail(
        "/projects/7/statuses/*",
        status=400,
        body={"message": "Cannot transition status via :run from :success"},
    )
    with pytest.raises(GitLabAPIError) as caught:
        await forge.report_check(repo, check("in_progress"))
    assert caught.value.status_code == 400


async def test_report_check_retries_a_rate_limited_status(
    fake_gitlab: FakeGitLab,
    forge: GitLabForge,
    project: dict[str, Any],
    repo: RepoRef,
    sleeps: list[float],
) -> None:
    fake_gitlab.add_commit(project, SHA)
    fake_gitlab.fail("/projects/7/statuses/*", status=429, retry_after=1)
    await forge.report_check(repo, check("completed", "failure", summary="2 tests failed"))
    assert sleeps == [1.0]
    [status] = fake_gitlab.state.statuses
    assert (status["status"], status["description"]) == ("failed", "2 tests failed")


# -- permissions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "permission"),
    [
        (GUEST, "read"),
        (REPORTER, "read"),
        (DEVELOPER, "write"),
        (MAINTAINER, "admin"),
        (OWNER, "admin"),
    ],
)
async def test_permission_from_project_membership(
    fake_gitlab: FakeGitLab,
    forge: GitLabForge,
    project: dict[str, Any],
    repo: RepoRef,
    level: int,
    permission: str,
) -> None:
    user = fake_gitlab.add_user("alice")
    fake_gitlab.add_member(project, user, level)
    assert await forge.get_permission(repo, "alice") == permission
    assert fake_gitlab.calls() == [
        ("GET", "/users"),
        ("GET", f"/projects/7/members/all/{user['id']}"),
    ]
    assert fake_gitlab.requests[0].query == {"username": "alice"}


async def test_group_inherited_maintainer_is_admin(
    fake_gitlab: FakeGitLab, forge: GitLabForge
) -> None:
    top = fake_gitlab.add_group("acme")
    sub = fake_gitlab.add_group("acme/tools", parent_id=top["id"])
    project = fake_gitlab.add_project("acme/tools/bot", group=sub)
    bob = fake_gitlab.add_user("bob")
    fake_gitlab.add_member(project, bob, REPORTER)  # direct membership is lower
    fake_gitlab.add_group_member(top, bob, MAINTAINER)
    repo = RepoRef(provider="gitlab", full_name="acme/tools/bot")
    assert await forge.get_permission(repo, "bob") == "admin"
    assert fake_gitlab.calls()[-1] == (
        "GET",
        f"/projects/acme%2Ftools%2Fbot/members/all/{bob['id']}",
    )


async def test_non_member_and_unknown_user_are_none(
    fake_gitlab: FakeGitLab, forge: GitLabForge, repo: RepoRef
) -> None:
    fake_gitlab.add_user("stranger")
    assert await forge.get_permission(repo, "stranger") == "none"
    assert await forge.get_permission(repo, "ghost") == "none"
    assert fake_gitlab.calls()[-1] == ("GET", "/users")  # no member lookup for a ghost


async def test_blocked_user_is_none(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    user = fake_gitlab.add_user("eve", state="blocked")
    fake_gitlab.add_member(project, user, OWNER)
    assert await forge.get_permission(repo, "eve") == "none"


def test_permission_levels() -> None:
    assert [permission_for(x) for x in (None, 5, 10, 15, 20, 30, 40, 50, 60)] == [
        "none", "none", "read", "read", "read", "write", "admin", "admin", "admin",
    ]  # fmt: skip


# -- git auth and helpers --------------------------------------------------------------------


async def test_git_auth_header(fake_gitlab: FakeGitLab, forge: GitLabForge, repo: RepoRef) -> None:
    header = await forge.git_auth_header(repo)
    assert header == git_basic_auth_header(fake_gitlab.token)
    assert header is not None and header.startswith("Authorization: Basic ")
    decoded = base64.b64decode(header.removeprefix("Authorization: Basic ")).decode()
    assert decoded == f"oauth2:{fake_gitlab.token}"
    assert fake_gitlab.requests == []


async def test_get_project(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any]
) -> None:
    expected = {
        "id": 7,
        "path_with_namespace": "acme/widgets",
        "default_branch": "main",
        "http_url_to_repo": "https://gitlab.example.com/acme/widgets.git",
    }
    assert await forge.get_project("acme/widgets") == expected
    assert await forge.get_project(7) == expected
    assert fake_gitlab.calls() == [("GET", "/projects/acme%2Fwidgets"), ("GET", "/projects/7")]


async def test_has_file(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any]
) -> None:
    fake_gitlab.add_file(project, "main", ".gitlab-ci.yml", "test:\n  script: [pytest]\n")
    assert await forge.has_file(7, "main", ".gitlab-ci.yml") is True
    assert await forge.has_file(7, "dev", ".gitlab-ci.yml") is False
    assert await forge.has_file(7, "main", "ci/other.yml") is False
    assert fake_gitlab.calls() == [
        ("HEAD", "/projects/7/repository/files/.gitlab-ci.yml"),
        ("HEAD", "/projects/7/repository/files/.gitlab-ci.yml"),
        ("HEAD", "/projects/7/repository/files/ci%2Fother.yml"),
    ]
    assert fake_gitlab.requests[1].query == {"ref": "dev"}


async def test_create_project_hook_is_idempotent(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any]
) -> None:
    url = "https://bot.example.com/webhooks/gitlab"
    created = await forge.create_project_hook(7, url, "s3cret")
    assert fake_gitlab.calls() == [("GET", "/projects/7/hooks"), ("POST", "/projects/7/hooks")]
    assert fake_gitlab.requests[1].json == {
        "url": url,
        "token": "s3cret",
        "note_events": True,
        "confidential_note_events": True,
        "issues_events": True,
        "confidential_issues_events": True,
        "merge_requests_events": True,
        "pipeline_events": True,
        "push_events": False,
        "enable_ssl_verification": True,
    }
    assert "token" not in created

    fake_gitlab.clear_requests()
    updated = await forge.create_project_hook(7, url, "rotated")
    assert updated["id"] == created["id"]
    assert fake_gitlab.calls() == [
        ("GET", "/projects/7/hooks"),
        ("PUT", f"/projects/7/hooks/{created['id']}"),
    ]
    [hook] = fake_gitlab.state.hooks[7]
    assert hook["token"] == "rotated"


async def test_no_forge_request_carries_the_recursion_header(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    issue = fake_gitlab.add_issue(project)
    fake_gitlab.add_pipeline(project, SHA)
    target = IssueRef(repo, issue["iid"])
    ref = await forge.post_comment(target, "hello")
    await forge.add_reaction(ref, "rocket")
    await forge.upsert_status_comment(target, MARKER, "s")
    pull = await forge.open_draft_pr(repo, head="h", base="main", title="t", body="b")
    await forge.update_pr(pull, title="t2")
    await forge.report_check(repo, check("in_progress"))
    await forge.get_permission(repo, "deksdenflow-bot")
    await forge.get_project(7)
    await forge.has_file(7, "main", ".gitlab-ci.yml")
    await forge.create_project_hook(7, "https://x.example.com/h", "s")
    assert len(fake_gitlab.requests) >= 14
    assert all(r.header("X-Gitlab-Event-UUID") is None for r in fake_gitlab.requests)


async def test_describe_repo_clone_url_and_who_we_are(
    fake_gitlab: FakeGitLab, forge: GitLabForge, project: dict[str, Any], repo: RepoRef
) -> None:
    fallback = RepoFacts("old", "https://gitlab.example.com/x.git", None, None)
    facts = await forge.describe_repo(repo, fallback)
    assert facts == RepoFacts("main", "https://gitlab.example.com/acme/widgets.git", None, "7")
    fake_gitlab.add_file(project, "main", ".gitlab-ci.yml", "test:\n  script: [pytest]\n")
    assert (await forge.describe_repo(repo, fallback) or fallback).ci_provider == "gitlab-ci"
    assert await forge.clone_url(repo) == "https://gitlab.example.com/acme/widgets.git"
    me = await forge.client.get("/user")
    assert await forge.own_handles() == (me["username"],)
    assert await forge.is_self(author_id=int(me["id"]))
    assert not await forge.is_self(author_id=int(me["id"]) + 1)
    assert await forge.is_self(author=str(me["username"]).upper())  # GitLab names ignore case
    assert not await forge.is_self(author="someone-else") and not await forge.is_self(author="")
