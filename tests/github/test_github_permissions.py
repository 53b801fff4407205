"""app.yml asks for exactly what the code needs: every request the GitHub adapter sends is mapped
to a permission (bot/forge/github_permissions.py), and the union must equal the manifest's."""

from __future__ import annotations

import inspect
import re

import httpx
import respx

from bot.forge import github_permissions as ghp
from bot.forge.base import CheckReport, CommentRef, IssueRef, PullRef, RepoFacts, RepoRef
from bot.forge.github import GitHubForge, github_time
from bot.forge.github_client import GitHubClient
from bot.handlers.routes import build_router

API = "https://api.github.com"
# Events every App receives without asking; a manifest may not list them.
UNASKED_EVENTS = {"installation", "installation_repositories"}
PULL = {
    "id": 9,
    "node_id": "PR_kw9",
    "draft": True,
    "number": 3,
    "html_url": "https://github.com/o/r/pull/3",
    "head": {"ref": "0001-task", "sha": "a" * 40, "repo": {"full_name": "o/r"}},
    "base": {"ref": "main", "repo": {"full_name": "o/r"}},
}


def answer(request: httpx.Request) -> httpx.Response:
    """Plausible answers for every endpoint the adapter uses; records nothing itself."""
    method, path = request.method, request.url.path
    if re.fullmatch(r"/app/installations/\d+/access_tokens", path):
        return httpx.Response(201, json={"token": "ghs_x", "expires_at": github_time(4e9)})
    if path == "/app":
        return httpx.Response(200, json={"id": 1, "slug": "deksdenflow"})
    if path.endswith("/installation"):
        return httpx.Response(200, json={"id": 77})
    if path.startswith("/app-manifests/"):
        return httpx.Response(201, json={"id": 1, "slug": "new", "pem": "k"})
    if method == "GET" and path.endswith(("/comments", "/pulls")):
        return httpx.Response(200, json=[])
    if method == "GET" and path.endswith("/check-runs"):
        return httpx.Response(200, json={"total_count": 0, "check_runs": []})
    if method == "GET" and path.endswith("/check-suites"):
        return httpx.Response(200, json={"total_count": 0, "check_suites": []})
    if path.endswith("/permission"):
        return httpx.Response(200, json={"permission": "write"})
    if method == "GET" and "/contents/" in path:
        return httpx.Response(200, json={"type": "dir"})
    if method == "GET" and re.fullmatch(r"/repos/[^/]+/[^/]+", path):
        return httpx.Response(200, json={"default_branch": "main", "full_name": "o/r"})
    return httpx.Response(201 if method == "POST" else 200, json=PULL)


async def drive_every_method(forge: GitHubForge) -> set[str]:
    """Call each public coroutine of the adapter once (twice where the path differs)."""
    repo = RepoRef("github", "o/r")  # no installation id: the adapter looks it up
    issue = IssueRef(repo, 1, "issue")
    check = CheckReport(name="deksdenflow/step-01", head_sha="a" * 40, status="in_progress")
    pull = PullRef(repo, 3, "https://github.com/o/r/pull/3", "0001-task")
    await forge.bot_login()
    await forge.installation_id(repo)
    await forge.add_reaction(CommentRef(issue, 5), "eyes")
    await forge.post_comment(issue, "hi")
    await forge.upsert_status_comment(issue, "<!-- m -->", "body")
    await forge.upsert_status_comment(issue, "<!-- m -->", "body", comment_id=5)
    await forge.open_draft_pr(repo, head="0001-task", base="main", title="t", body="b")
    await forge.update_pr(pull, title="t2")
    await forge.report_check(repo, check)
    await forge.put_check(repo, check, run_id=12)
    await forge.get_permission(repo, "someone")
    await forge.pull_is_fork(repo, 3)
    await forge.git_auth_header(repo)
    await forge.get_repo(repo)
    await forge.has_path(repo, "main", ".github/workflows")
    await forge.list_check_suites(repo, "a" * 40)
    await forge.list_check_runs(repo, "a" * 40)
    await forge.check_run_annotations(repo, 12)
    await forge.job_log(repo, 12, 1000)
    await forge.convert_manifest("code123")
    await forge.review_comments(repo, 3, 700)
    await forge.reply_in_thread(IssueRef(repo, 3, "pull"), "9001", "fixed")
    await forge.mark_ready(pull)  # a GET of the PR, then the GraphQL mutation
    await forge.resolve_review_threads(repo, 3, {9001})  # the GraphQL reviewThreads query
    await forge.threads_answered_with(repo, 3, "fixed")  # the same query
    await forge.answered_threads(IssueRef(repo, 3, "pull"), {"9001"}, "fixed")  # the same query
    await forge.resolve_threads(IssueRef(repo, 3, "pull"), {"9001"})  # as resolve_review_threads
    await forge.pull_branches(repo, 3)
    await forge.review_state(repo, 3, 700)
    await forge.own_handles()
    await forge.clone_url(repo)
    await forge.is_self(author="someone")
    await forge.describe_repo(repo, RepoFacts("main", "https://github.com/o/r.git", None))
    return {
        "bot_login",
        "installation_id",
        "add_reaction",
        "post_comment",
        "upsert_status_comment",
        "open_draft_pr",
        "update_pr",
        "report_check",
        "put_check",
        "get_permission",
        "pull_is_fork",
        "git_auth_header",
        "get_repo",
        "has_path",
        "list_check_suites",
        "list_check_runs",
        "convert_manifest",
        "review_comments",
        "reply_in_thread",
        "mark_ready",
        "pull_branches",
        "review_state",
        "check_run_annotations",
        "job_log",
        "resolve_review_threads",
        "threads_answered_with",
        "answered_threads",
        "resolve_threads",
        "own_handles",
        "is_self",
        "describe_repo",
        "clone_url",
    }


async def test_every_request_is_mapped_and_the_manifest_asks_for_exactly_that(
    private_key: str,
) -> None:
    with respx.mock(assert_all_called=False) as router:
        router.route(host="api.github.com").mock(side_effect=answer)
        async with GitHubClient(app_id=1, private_key=private_key) as client:
            forge = GitHubForge(client)
            called = await drive_every_method(forge)
        sent = [(c.request.method, c.request.url.path) for c in router.calls]

    public = {
        name
        for name, member in inspect.getmembers(GitHubForge, inspect.iscoroutinefunction)
        if not name.startswith("_") and name not in ("aclose", "__aexit__", "__aenter__")
    }
    assert public == called, "a new adapter method: drive it here and map its requests"

    unmapped = [req for req in sent if ghp.need_for(*req) is None]
    assert not unmapped, f"requests without an entry in github_permissions.REQUESTS: {unmapped}"
    needs = {ghp.need_for(*req) for req in sent}
    assert None not in needs
    used = ghp.required_permissions([n for n in needs if n is not None])

    manifest = ghp.load_manifest()
    assert manifest["default_permissions"] == used
    # and the table holds no entry the adapter no longer needs
    assert ghp.required_permissions() == used
    assert manifest["default_permissions"]["workflows"] == "write"


def test_manifest_events_are_the_ones_handled() -> None:
    manifest = ghp.load_manifest()
    handled = {event for provider, event in build_router().events() if provider == "github"}
    assert set(manifest["default_events"]) == handled - UNASKED_EVENTS
    assert tuple(manifest["default_events"]) == ghp.EVENTS


def test_missing_permissions_compares_levels() -> None:
    required = {"contents": "write", "metadata": "read"}
    assert ghp.missing_permissions(required, {"contents": "read", "metadata": "read"}) == {
        "contents": "write"
    }
    assert ghp.missing_permissions(required, {"contents": "admin", "metadata": "write"}) == {}
    assert ghp.missing_events(["a", "b"], ["b"]) == ["a"]
