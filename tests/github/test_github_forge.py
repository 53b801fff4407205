"""GitHubForge: the exact requests each Forge method makes, and the pure builders behind them."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import respx

from bot.core.errors import ForgeError
from bot.forge.base import (
    CheckAction,
    CheckReport,
    CommentRef,
    Forge,
    IssueRef,
    PullRef,
    RepoRef,
)
from bot.forge.github import (
    MAX_COMMENT_CHARS,
    GitHubForge,
    build_check_run,
    build_status_comment_body,
    convert_manifest,
    find_status_comment,
    map_permission,
    split_repo,
    truncate_text,
)
from bot.forge.github_client import GitHubClient, GitHubHTTPError

APP_ID = 4242
INSTALLATION_ID = 77
NOW = 1_700_000_000.0
NOW_ISO = "2023-11-14T22:13:20Z"
TOKEN = "ghs_installationtokenSECRET1"
MARKER = "<!-- deksdenflow:status 0001-task -->"
SHA = "a" * 40

REPO = RepoRef(provider="github", full_name="octo/app", installation_id=INSTALLATION_ID)
ISSUE = IssueRef(repo=REPO, number=12)

MakeToken = Callable[..., httpx.Response]


def body_of(route: respx.Route, index: int = 0) -> Any:
    return json.loads(route.calls[index].request.content)


def our_comment(comment_id: int, body: str) -> dict[str, Any]:
    return {
        "id": comment_id,
        "body": body,
        "user": {"login": "deksdenflow[bot]", "type": "Bot"},
        "performed_via_github_app": None,
    }


def their_comment(comment_id: int, body: str) -> dict[str, Any]:
    return {"id": comment_id, "body": body, "user": {"login": "mallory", "type": "User"}}


@pytest.fixture(autouse=True)
def _token(token_route: respx.Route) -> respx.Route:
    return token_route


def test_github_forge_is_a_forge(forge: GitHubForge) -> None:
    as_forge: Forge = forge
    assert as_forge.provider == "github"


# --- reactions and comments ---------------------------------------------------------------------


@pytest.mark.parametrize("reaction", ["eyes", "rocket", "confused", "+1"])
async def test_add_reaction(forge: GitHubForge, mock: respx.MockRouter, reaction: Any) -> None:
    route = mock.post("/repos/octo/app/issues/comments/555/reactions").mock(
        return_value=httpx.Response(201, json={"id": 1, "content": reaction})
    )
    await forge.add_reaction(CommentRef(target=ISSUE, comment_id=555), reaction)
    assert route.call_count == 1
    assert body_of(route) == {"content": reaction}
    assert route.calls[0].request.headers["authorization"] == f"token {TOKEN}"


async def test_post_comment(forge: GitHubForge, mock: respx.MockRouter) -> None:
    route = mock.post("/repos/octo/app/issues/12/comments").mock(
        return_value=httpx.Response(201, json={"id": 901})
    )
    ref = await forge.post_comment(ISSUE, "hello")
    assert ref == CommentRef(target=ISSUE, comment_id=901)
    assert body_of(route) == {"body": "hello"}


async def test_post_comment_truncates(forge: GitHubForge, mock: respx.MockRouter) -> None:
    route = mock.post("/repos/octo/app/issues/12/comments").mock(
        return_value=httpx.Response(201, json={"id": 901})
    )
    await forge.post_comment(ISSUE, "x" * 100_000)
    sent = body_of(route)["body"]
    assert len(sent) == MAX_COMMENT_CHARS < 65_536
    assert sent.endswith("(truncated)")


def _comments_route(mock: respx.MockRouter, comments: list[dict[str, Any]]) -> respx.Route:
    return mock.get("/repos/octo/app/issues/12/comments").mock(
        return_value=httpx.Response(200, json=comments)
    )


async def test_upsert_posts_when_no_comment_of_ours(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    listed = _comments_route(mock, [their_comment(1, "hi")])
    posted = mock.post("/repos/octo/app/issues/12/comments").mock(
        return_value=httpx.Response(201, json={"id": 77})
    )
    ref = await forge.upsert_status_comment(ISSUE, MARKER, f"{MARKER}\nplanning")
    assert ref.comment_id == 77
    assert listed.call_count == 1
    assert listed.calls[0].request.url.params["per_page"] == "100"
    assert body_of(posted) == {"body": f"{MARKER}\nplanning"}


async def test_upsert_ignores_marker_quoted_by_someone_else(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    _comments_route(
        mock,
        [
            their_comment(1, f"> {MARKER}\n> old status"),
            our_comment(2, "a comment of ours without the marker"),
            our_comment(3, f"{MARKER}\nrunning step 1"),
        ],
    )
    patched = mock.patch("/repos/octo/app/issues/comments/3").mock(
        return_value=httpx.Response(200, json={"id": 3})
    )
    posted = mock.post("/repos/octo/app/issues/12/comments")
    ref = await forge.upsert_status_comment(ISSUE, MARKER, f"{MARKER}\nrunning step 2")
    assert ref == CommentRef(target=ISSUE, comment_id=3)
    assert patched.call_count == 1
    assert body_of(patched) == {"body": f"{MARKER}\nrunning step 2"}
    assert not posted.called


async def test_upsert_matches_performed_via_our_app(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    comment = their_comment(5, f"{MARKER} x")
    comment["performed_via_github_app"] = {"id": APP_ID, "slug": "deksdenflow"}
    _comments_route(mock, [comment])
    patched = mock.patch("/repos/octo/app/issues/comments/5").mock(
        return_value=httpx.Response(200, json={"id": 5})
    )
    await forge.upsert_status_comment(ISSUE, MARKER, f"{MARKER} y")
    assert patched.call_count == 1


async def test_upsert_unchanged_body_sends_nothing(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    _comments_route(mock, [our_comment(3, f"{MARKER}\nsame")])
    patched = mock.patch("/repos/octo/app/issues/comments/3")
    posted = mock.post("/repos/octo/app/issues/12/comments")
    await forge.upsert_status_comment(ISSUE, MARKER, f"{MARKER}\nsame")
    assert not patched.called and not posted.called


async def test_upsert_paginates(forge: GitHubForge, mock: respx.MockRouter) -> None:
    page2 = "https://api.github.com/repositories/1/issues/12/comments?per_page=100&page=2"
    mock.get("/repos/octo/app/issues/12/comments").mock(
        return_value=httpx.Response(
            200, json=[their_comment(1, "a")], headers={"link": f'<{page2}>; rel="next"'}
        )
    )
    mock.get(page2).mock(return_value=httpx.Response(200, json=[our_comment(200, MARKER)]))
    patched = mock.patch("/repos/octo/app/issues/comments/200").mock(
        return_value=httpx.Response(200, json={"id": 200})
    )
    ref = await forge.upsert_status_comment(ISSUE, MARKER, f"{MARKER} new")
    assert ref.comment_id == 200 and patched.called


async def test_upsert_truncates_and_keeps_marker(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    _comments_route(mock, [])
    posted = mock.post("/repos/octo/app/issues/12/comments").mock(
        return_value=httpx.Response(201, json={"id": 1})
    )
    await forge.upsert_status_comment(ISSUE, MARKER, "log line\n" * 20_000 + MARKER)
    sent = body_of(posted)["body"]
    assert len(sent) < 65_536
    assert sent.startswith(MARKER)
    assert sent.count(MARKER) == 1


async def test_bot_login_fetched_from_app_when_slug_unknown(
    client: GitHubClient, mock: respx.MockRouter
) -> None:
    forge = GitHubForge(client)
    app = mock.get("/app").mock(return_value=httpx.Response(200, json={"slug": "my-flow"}))
    assert await forge.bot_login() == "my-flow[bot]"
    assert await forge.bot_login() == "my-flow[bot]"
    assert app.call_count == 1
    assert app.calls[0].request.headers["authorization"].startswith("bearer ")


# --- pull requests ------------------------------------------------------------------------------


def _pull(number: int = 7) -> dict[str, Any]:
    return {
        "number": number,
        "html_url": f"https://github.com/octo/app/pull/{number}",
        "head": {"ref": "0001-task"},
    }


async def test_open_draft_pr_creates(forge: GitHubForge, mock: respx.MockRouter) -> None:
    listed = mock.get("/repos/octo/app/pulls").mock(return_value=httpx.Response(200, json=[]))
    created = mock.post("/repos/octo/app/pulls").mock(
        return_value=httpx.Response(201, json=_pull())
    )
    pull = await forge.open_draft_pr(
        REPO, head="0001-task", base="main", title="Protocol 0001", body="plan"
    )
    assert pull == PullRef(
        repo=REPO, number=7, url="https://github.com/octo/app/pull/7", head="0001-task"
    )
    assert dict(listed.calls[0].request.url.params) == {"head": "octo:0001-task", "state": "open"}
    assert body_of(created) == {
        "title": "Protocol 0001",
        "head": "0001-task",
        "base": "main",
        "body": "plan",
        "draft": True,
    }


async def test_open_draft_pr_is_idempotent(forge: GitHubForge, mock: respx.MockRouter) -> None:
    listed = mock.get("/repos/octo/app/pulls").mock(
        return_value=httpx.Response(200, json=[_pull(9)])
    )
    created = mock.post("/repos/octo/app/pulls")
    pull = await forge.open_draft_pr(REPO, head="0001-task", base="main", title="t", body="b")
    assert pull.number == 9
    assert listed.call_count == 1 and not created.called


async def test_open_draft_pr_race_returns_the_other(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    mock.get("/repos/octo/app/pulls").mock(
        side_effect=[httpx.Response(200, json=[]), httpx.Response(200, json=[_pull(11)])]
    )
    mock.post("/repos/octo/app/pulls").mock(
        return_value=httpx.Response(
            422,
            json={
                "message": "Validation Failed",
                "errors": [
                    {
                        "resource": "PullRequest",
                        "code": "custom",
                        "message": "A pull request already exists for octo:0001-task.",
                    }
                ],
            },
        )
    )
    pull = await forge.open_draft_pr(REPO, head="0001-task", base="main", title="t", body="b")
    assert pull.number == 11


async def test_update_pr_patches_given_fields(forge: GitHubForge, mock: respx.MockRouter) -> None:
    route = mock.patch("/repos/octo/app/pulls/7").mock(
        return_value=httpx.Response(200, json=_pull())
    )
    pull = PullRef(repo=REPO, number=7, url="u", head="0001-task")
    await forge.update_pr(pull, body="new body")
    await forge.update_pr(pull, title="T", body="B")
    await forge.update_pr(pull)  # nothing to change: no request
    assert route.call_count == 2
    assert body_of(route, 0) == {"body": "new body"}
    assert body_of(route, 1) == {"title": "T", "body": "B"}


# --- check runs ---------------------------------------------------------------------------------


def _check(**overrides: Any) -> CheckReport:
    values: dict[str, Any] = {
        "name": "deksdenflow/step-01",
        "head_sha": SHA,
        "status": "in_progress",
        "title": "Step 1",
        "summary": "running",
    }
    values.update(overrides)
    return CheckReport(**values)


async def test_check_run_create_then_update(forge: GitHubForge, mock: respx.MockRouter) -> None:
    lookup = mock.get(f"/repos/octo/app/commits/{SHA}/check-runs").mock(
        return_value=httpx.Response(200, json={"total_count": 0, "check_runs": []})
    )
    created = mock.post("/repos/octo/app/check-runs").mock(
        return_value=httpx.Response(201, json={"id": 3001})
    )
    patched = mock.patch("/repos/octo/app/check-runs/3001").mock(
        return_value=httpx.Response(200, json={"id": 3001})
    )
    await forge.report_check(REPO, _check())
    await forge.report_check(
        REPO, _check(status="completed", conclusion="success", summary="done", text="details")
    )
    assert lookup.call_count == 1  # the second report used the id cache
    assert dict(lookup.calls[0].request.url.params) == {
        "per_page": "100",
        "check_name": "deksdenflow/step-01",
        "filter": "latest",
        "app_id": str(APP_ID),
    }
    assert body_of(created) == {
        "head_sha": SHA,
        "name": "deksdenflow/step-01",
        "status": "in_progress",
        "started_at": NOW_ISO,
        "output": {"title": "Step 1", "summary": "running"},
    }
    assert created.call_count == 1 and patched.call_count == 1
    assert body_of(patched) == {
        "name": "deksdenflow/step-01",
        "status": "completed",
        "conclusion": "success",
        "completed_at": NOW_ISO,
        "output": {"title": "Step 1", "summary": "done", "text": "details"},
    }


async def test_check_run_found_by_lookup_is_patched(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    # Another worker created the run: only the listing knows it.
    mock.get(f"/repos/octo/app/commits/{SHA}/check-runs").mock(
        return_value=httpx.Response(
            200,
            json={
                "total_count": 1,
                "check_runs": [{"id": 3002, "status": "queued", "app": {"id": APP_ID}}],
            },
        )
    )
    created = mock.post("/repos/octo/app/check-runs")
    patched = mock.patch("/repos/octo/app/check-runs/3002").mock(
        return_value=httpx.Response(200, json={"id": 3002})
    )
    await forge.report_check(REPO, _check())
    assert patched.call_count == 1 and not created.called


async def test_completed_check_run_rerun_creates_new(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    mock.get(f"/repos/octo/app/commits/{SHA}/check-runs").mock(
        return_value=httpx.Response(
            200,
            json={"check_runs": [{"id": 3003, "status": "completed", "app": {"id": APP_ID}}]},
        )
    )
    created = mock.post("/repos/octo/app/check-runs").mock(
        return_value=httpx.Response(201, json={"id": 3004})
    )
    patched = mock.patch("/repos/octo/app/check-runs/3003")
    await forge.report_check(REPO, _check(status="queued"))
    assert created.call_count == 1 and not patched.called


def test_build_check_run_limits() -> None:
    actions = tuple(
        CheckAction(label="L" * 30, description="D" * 50, identifier=f"id-{i}-" + "x" * 30)
        for i in range(5)
    )
    run = build_check_run(
        _check(status="completed", summary="s" * 70_000, text="t" * 70_000, actions=actions),
        now=NOW,
    )
    assert run["conclusion"] == "neutral"  # completed needs a conclusion
    assert len(run["output"]["summary"]) == 65_535
    assert len(run["output"]["text"]) == 65_535
    assert len(run["actions"]) == 3
    for action in run["actions"]:
        assert len(action["label"]) <= 20
        assert len(action["description"]) <= 40
        assert len(action["identifier"]) <= 20
    bare = build_check_run(
        CheckReport(name="n", head_sha=SHA, status="queued", details_url="https://x/y"), now=NOW
    )
    assert bare == {"head_sha": SHA, "name": "n", "status": "queued", "details_url": "https://x/y"}


# --- permissions, git auth, helpers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("admin", "admin"),
        ("maintain", "write"),
        ("write", "write"),
        ("triage", "read"),
        ("read", "read"),
        ("none", "none"),
        ("something-new", "none"),
    ],
)
async def test_get_permission(
    forge: GitHubForge, mock: respx.MockRouter, answer: str, expected: str
) -> None:
    route = mock.get("/repos/octo/app/collaborators/alice/permission").mock(
        return_value=httpx.Response(200, json={"permission": answer, "role_name": answer})
    )
    assert await forge.get_permission(REPO, "alice") == expected
    assert route.call_count == 1


async def test_get_permission_404_is_none(forge: GitHubForge, mock: respx.MockRouter) -> None:
    mock.get("/repos/octo/app/collaborators/ghost/permission").mock(
        return_value=httpx.Response(404, json={"message": "Not Found"})
    )
    assert await forge.get_permission(REPO, "ghost") == "none"


async def test_get_permission_other_errors_raise(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    mock.get("/repos/octo/app/collaborators/alice/permission").mock(
        return_value=httpx.Response(403, json={"message": "Resource not accessible by integration"})
    )
    with pytest.raises(GitHubHTTPError):
        await forge.get_permission(REPO, "alice")


def test_map_permission() -> None:
    assert map_permission({}) == "none"
    assert map_permission({"permission": "maintain"}) == "write"


async def test_git_auth_header(forge: GitHubForge) -> None:
    header = await forge.git_auth_header(REPO)
    assert header is not None and header.startswith("Authorization: Basic ")
    encoded = header.removeprefix("Authorization: Basic ")
    assert base64.b64decode(encoded).decode() == f"x-access-token:{TOKEN}"


async def test_installation_looked_up_when_repo_has_none(
    forge: GitHubForge, mock: respx.MockRouter
) -> None:
    lookup = mock.get("/repos/octo/bare/installation").mock(
        return_value=httpx.Response(200, json={"id": INSTALLATION_ID})
    )
    mock.get("/repos/octo/bare").mock(
        return_value=httpx.Response(200, json={"default_branch": "x"})
    )
    bare = RepoRef(provider="github", full_name="octo/bare")
    assert (await forge.get_repo(bare))["default_branch"] == "x"
    await forge.get_repo(bare)
    assert lookup.call_count == 1
    assert lookup.calls[0].request.headers["authorization"].startswith("bearer ")


async def test_get_repo(forge: GitHubForge, mock: respx.MockRouter) -> None:
    mock.get("/repos/octo/app").mock(
        return_value=httpx.Response(200, json={"default_branch": "trunk", "full_name": "octo/app"})
    )
    assert (await forge.get_repo(REPO))["default_branch"] == "trunk"


async def test_has_path(forge: GitHubForge, mock: respx.MockRouter) -> None:
    route = mock.get("/repos/octo/app/contents/.github/workflows").mock(
        side_effect=[
            httpx.Response(200, json=[{"name": "ci.yml"}]),
            httpx.Response(404, json={"message": "Not Found"}),
        ]
    )
    assert await forge.has_path(REPO, "0001-task", ".github/workflows")
    assert not await forge.has_path(REPO, "main", ".github/workflows")
    assert route.calls[0].request.url.params["ref"] == "0001-task"
    assert route.calls[1].request.url.params["ref"] == "main"


async def test_list_check_suites_and_runs(forge: GitHubForge, mock: respx.MockRouter) -> None:
    mock.get(f"/repos/octo/app/commits/{SHA}/check-suites").mock(
        return_value=httpx.Response(
            200, json={"total_count": 1, "check_suites": [{"id": 1, "conclusion": "success"}]}
        )
    )
    mock.get(f"/repos/octo/app/commits/{SHA}/check-runs").mock(
        return_value=httpx.Response(200, json={"total_count": 1, "check_runs": [{"id": 2}]})
    )
    assert await forge.list_check_suites(REPO, SHA) == [{"id": 1, "conclusion": "success"}]
    assert await forge.list_check_runs(REPO, SHA) == [{"id": 2}]


async def test_convert_manifest_is_unauthenticated(mock: respx.MockRouter) -> None:
    answer = {
        "id": 99,
        "slug": "my-flow",
        "pem": "-----BEGIN RSA PRIVATE KEY-----\n...",
        "webhook_secret": "whsec",
        "client_id": "Iv1.x",
    }
    route = mock.post("/app-manifests/abc123/conversions").mock(
        return_value=httpx.Response(201, json=answer)
    )
    assert await convert_manifest("abc123") == answer
    assert "authorization" not in route.calls[0].request.headers
    assert route.calls[0].request.content == b""


async def test_forge_from_app_on_enterprise(
    private_key: str, make_token: MakeToken, clock: Any
) -> None:
    with respx.mock(base_url="https://ghe.example.com/api/v3") as ghe:
        ghe.post(f"/app/installations/{INSTALLATION_ID}/access_tokens").mock(
            return_value=make_token()
        )
        route = ghe.post("/repos/octo/app/issues/12/comments").mock(
            return_value=httpx.Response(201, json={"id": 1})
        )
        async with GitHubForge.from_app(
            app_id=APP_ID,
            private_key=private_key,
            api_url="https://ghe.example.com/api/v3",
            installation_id=INSTALLATION_ID,
            app_slug="deksdenflow",
            clock=clock,
        ) as forge:
            bare = RepoRef(provider="github", full_name="octo/app")  # default installation
            await forge.post_comment(IssueRef(repo=bare, number=12), "hi")
        assert route.call_count == 1


def test_pure_helpers() -> None:
    assert truncate_text("abc", 5) == "abc"
    assert len(truncate_text("a" * 100, 50)) == 50
    assert build_status_comment_body(MARKER, "plain") == f"{MARKER}\nplain"
    assert build_status_comment_body(MARKER, f"x {MARKER}") == f"x {MARKER}"
    assert find_status_comment([], MARKER, app_id="1", bot_login="b[bot]") is None


def test_bad_repo_name() -> None:
    with pytest.raises(ForgeError):
        split_repo("no-slash")


async def test_listing_401_renews_token_and_restarts(
    forge: GitHubForge, mock: respx.MockRouter, make_token: MakeToken
) -> None:
    tokens = mock.post(f"/app/installations/{INSTALLATION_ID}/access_tokens").mock(
        side_effect=[make_token("ghs_old"), make_token("ghs_new")]
    )
    listed = mock.get("/repos/octo/app/issues/12/comments").mock(
        side_effect=[
            httpx.Response(401, json={"message": "Bad credentials"}),
            httpx.Response(200, json=[our_comment(3, MARKER)]),
        ]
    )
    mock.patch("/repos/octo/app/issues/comments/3").mock(
        return_value=httpx.Response(200, json={"id": 3})
    )
    await forge.upsert_status_comment(ISSUE, MARKER, f"{MARKER} v2")
    assert tokens.call_count == 2
    assert [c.request.headers["authorization"] for c in listed.calls] == [
        "token ghs_old",
        "token ghs_new",
    ]
