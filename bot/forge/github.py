"""GitHubForge: the Forge interface over the GitHub REST API, with pure request-body builders."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import httpx

from bot.core.errors import ForgeError
from bot.forge.base import (
    AsyncClosing,
    CheckReport,
    CommentRef,
    IssueRef,
    Permission,
    PullKind,
    PullRef,
    Reaction,
    RepoFacts,
    RepoRef,
    remote_status_targets,
)
from bot.forge.github_client import (
    DEFAULT_API_URL,
    Clock,
    GitHubClient,
    GitHubHTTPError,
    basic_git_auth,
)

if TYPE_CHECKING:
    from bot.forge.base import Forge

log = logging.getLogger(__name__)

# GitHub answers 422 for an issue/PR comment or PR body over 65,536 characters; stay below it.
MAX_COMMENT_CHARS = 65_535
# Check-run output.summary and output.text are each capped at 65,535 characters.
MAX_CHECK_TEXT_CHARS = 65_535
# Check-run actions: at most 3, label ≤ 20, description ≤ 40, identifier ≤ 20 characters.
MAX_CHECK_ACTIONS = 3
TRUNCATION_NOTICE = "\n\n… (truncated)"


# --- pure builders ------------------------------------------------------------------------------


def truncate_text(text: str, limit: int, notice: str = TRUNCATION_NOTICE) -> str:
    """`text` cut to at most `limit` characters, ending with `notice` when cut."""
    if len(text) <= limit:
        return text
    if limit <= len(notice):
        return text[:limit]
    return text[: limit - len(notice)] + notice


def split_repo(full_name: str) -> tuple[str, str]:
    owner, sep, name = full_name.partition("/")
    if not sep or not owner or not name or "/" in name:
        raise ForgeError(f"not a GitHub owner/name: {full_name!r}")
    return owner, name


def repo_path(repo: RepoRef) -> str:
    owner, name = split_repo(repo.full_name)
    return f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}"


def with_query(path: str, params: Mapping[str, str | int]) -> str:
    return f"{path}?{urlencode(params)}"


def github_time(epoch: float) -> str:
    """Epoch seconds as the ISO 8601 UTC form the Checks API expects."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_reaction(reaction: Reaction) -> dict[str, str]:
    return {"content": reaction}


def build_comment(body: str) -> dict[str, str]:
    return {"body": truncate_text(body, MAX_COMMENT_CHARS)}


def build_status_comment_body(marker: str, body: str) -> str:
    """The status comment text: always holds `marker` (so the next upsert finds it), always fits.

    When the marker is missing or the text must be cut, the marker moves to the front, where
    truncation cannot remove it.
    """
    if marker in body and len(body) <= MAX_COMMENT_CHARS:
        return body
    rest = body.replace(marker, "") if marker else body
    return truncate_text(f"{marker}\n{rest}", MAX_COMMENT_CHARS)


def is_own_comment(comment: Mapping[str, Any], *, app_id: str | None, bot_login: str) -> bool:
    """True for a comment our app wrote: its bot user, or performed via our app."""
    via = comment.get("performed_via_github_app") or {}
    if app_id is not None and isinstance(via, Mapping) and str(via.get("id")) == app_id:
        return True
    user = comment.get("user") or {}
    return isinstance(user, Mapping) and user.get("login") == bot_login


def find_status_comment(
    comments: Iterable[Mapping[str, Any]], marker: str, *, app_id: str | None, bot_login: str
) -> Mapping[str, Any] | None:
    """The oldest comment of ours holding `marker`; anyone can quote the marker in theirs."""
    for comment in comments:
        if marker in str(comment.get("body") or "") and is_own_comment(
            comment, app_id=app_id, bot_login=bot_login
        ):
            return comment
    return None


def build_draft_pr(
    *, head: str, base: str, title: str, body: str, draft: bool = True
) -> dict[str, Any]:
    return {
        "title": title,
        "head": head,
        "base": base,
        "body": truncate_text(body, MAX_COMMENT_CHARS),
        "draft": draft,
    }


def build_pr_update(*, title: str | None, body: str | None) -> dict[str, str]:
    update: dict[str, str] = {}
    if title is not None:
        update["title"] = title
    if body is not None:
        update["body"] = truncate_text(body, MAX_COMMENT_CHARS)
    return update


def build_ready_mutation(node_id: str) -> dict[str, Any]:
    """The GraphQL request that marks a draft pull request ready for review."""
    return {
        "query": "mutation($id: ID!) { markPullRequestReadyForReview(input: {pullRequestId: $id}) "
        "{ pullRequest { isDraft } } }",
        "variables": {"id": node_id},
    }


REVIEW_THREADS_QUERY = (
    "query($owner: String!, $name: String!, $number: Int!) "
    "{ repository(owner: $owner, name: $name) "
    "{ pullRequest(number: $number) { reviewThreads(first: 100) { nodes { id isResolved "
    "comments(first: 100) { nodes { databaseId body } } } } } } }"
)
RESOLVE_THREAD_MUTATION = (
    "mutation($id: ID!) { resolveReviewThread(input: {threadId: $id}) "
    "{ thread { id isResolved } } }"
)


def build_review_threads_query(repo: RepoRef, number: int) -> dict[str, Any]:
    """The GraphQL request for a PR's review threads, with their comments' REST ids."""
    owner, _, name = repo.full_name.partition("/")
    return {
        "query": REVIEW_THREADS_QUERY,
        "variables": {"owner": owner, "name": name, "number": number},
    }


def build_resolve_thread_mutation(thread_id: str) -> dict[str, Any]:
    return {"query": RESOLVE_THREAD_MUTATION, "variables": {"id": thread_id}}


def threads_holding(answer: Any, comment_ids: Iterable[int]) -> list[str]:
    """The open review threads (GraphQL node ids) that hold any of `comment_ids`, in order.

    REST knows comments by number, GraphQL threads by node id: a thread's comments carry
    `databaseId`, the REST id. Anything malformed is skipped, never guessed at.
    """
    wanted = set(comment_ids)
    nodes = _dig_list(answer, "data", "repository", "pullRequest", "reviewThreads", "nodes")
    found: list[str] = []
    for node in nodes:
        if not isinstance(node, Mapping) or node.get("isResolved") is not False:
            continue
        ids = {
            c.get("databaseId")
            for c in _dig_list(node, "comments", "nodes")
            if isinstance(c, Mapping)
        }
        thread = node.get("id")
        if isinstance(thread, str) and thread and ids & wanted:
            found.append(thread)
    return found


def threads_with_text(answer: Any, text: str) -> set[int]:
    """The threads (by their first comment's REST id) that already hold a comment reading
    exactly `text`: a reply the bot sent before it could record it."""
    found: set[int] = set()
    for node in _dig_list(answer, "data", "repository", "pullRequest", "reviewThreads", "nodes"):
        comments = [c for c in _dig_list(node, "comments", "nodes") if isinstance(c, Mapping)]
        first = comments[0].get("databaseId") if comments else None
        if isinstance(first, int) and any(c.get("body") == text for c in comments[1:]):
            found.add(first)
    return found


def _dig_list(data: Any, *keys: str) -> list[Any]:
    for key in keys:
        data = data.get(key) if isinstance(data, Mapping) else None
    return data if isinstance(data, list) else []


def graphql_errors(answer: Any, what: str) -> None:
    """GraphQL answers 200 with its errors in the body: raise them as an HTTP error would."""
    errors = answer.get("errors") if isinstance(answer, Mapping) else None
    if errors:
        raise GitHubHTTPError(422, f"{what}: {errors}")


def pull_ref(repo: RepoRef, data: Mapping[str, Any]) -> PullRef:
    return PullRef(
        repo=repo,
        number=int(data["number"]),
        url=str(data.get("html_url") or ""),
        head=str(data["head"]["ref"]),
    )


def build_check_run_update(check: CheckReport, *, now: float) -> dict[str, Any]:
    """The PATCH body for a check run (everything but `head_sha`)."""
    run: dict[str, Any] = {"name": check.name, "status": check.status}
    if check.details_url:
        run["details_url"] = check.details_url
    if check.status == "in_progress":
        run["started_at"] = github_time(now)
    if check.status == "completed":
        # GitHub rejects a completed run without a conclusion.
        run["conclusion"] = check.conclusion or "neutral"
        run["completed_at"] = github_time(now)
    if check.title or check.summary or check.text:
        # output.title and output.summary are both required once output is sent.
        output: dict[str, str] = {
            "title": check.title or check.name,
            "summary": truncate_text(
                check.summary or check.title or check.name, MAX_CHECK_TEXT_CHARS
            ),
        }
        if check.text:
            output["text"] = truncate_text(check.text, MAX_CHECK_TEXT_CHARS)
        run["output"] = output
    if check.actions:
        run["actions"] = [
            {
                "label": action.label[:20],
                "description": action.description[:40],
                "identifier": action.identifier[:20],
            }
            for action in check.actions[:MAX_CHECK_ACTIONS]
        ]
    return run


def build_check_run(check: CheckReport, *, now: float) -> dict[str, Any]:
    """The POST body creating a check run."""
    return {"head_sha": check.head_sha, **build_check_run_update(check, now=now)}


# Repository roles as our four levels: maintain can push (write), triage cannot (read).
_PERMISSIONS: dict[str, Permission] = {
    "admin": "admin",
    "maintain": "write",
    "write": "write",
    "triage": "read",
    "read": "read",
    "none": "none",
}


def map_permission(data: Mapping[str, Any]) -> Permission:
    """GitHub's collaborator permission answer as ours; anything unknown is `none`."""
    return _PERMISSIONS.get(str(data.get("permission") or "none"), "none")


def is_fork_pull(pull: Mapping[str, Any], full_name: str) -> bool:
    """A pull whose head repository is not the base one; a deleted head repository (null) too."""
    head = (pull.get("head") or {}).get("repo")
    if not isinstance(head, Mapping):
        return True
    base = (pull.get("base") or {}).get("repo")
    base_name = str(base.get("full_name")) if isinstance(base, Mapping) else full_name
    return str(head.get("full_name") or "").lower() != base_name.lower()


# --- the forge ----------------------------------------------------------------------------------


class GitHubForge(AsyncClosing):
    """The Forge operations for one GitHub App (on github.com or an Enterprise Server).

    Check runs: an in-process cache of (repo, sha, name) → run id, falling back to listing the
    sha's runs filtered by name and our app id; the lookup keeps stateless workers correct,
    the cache saves a request per update within one worker.
    """

    provider: str = "github"

    def __init__(
        self,
        client: GitHubClient,
        *,
        installation_id: int | None = None,
        app_slug: str | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.client = client
        self._default_installation = installation_id
        self._app_slug = app_slug
        self._clock = clock
        self._installations: dict[str, int] = {}
        self._check_runs: dict[tuple[str, str, str], tuple[int, str]] = {}

    @classmethod
    def from_app(
        cls,
        *,
        app_id: int | str,
        private_key: str | bytes,
        api_url: str = DEFAULT_API_URL,
        installation_id: int | None = None,
        app_slug: str | None = None,
        http: httpx.AsyncClient | None = None,
        **client_options: Any,
    ) -> GitHubForge:
        """A forge with its own client; `client_options` go to `GitHubClient`."""
        client = GitHubClient(
            app_id=app_id, private_key=private_key, api_url=api_url, http=http, **client_options
        )
        return cls(client, installation_id=installation_id, app_slug=app_slug)

    async def aclose(self) -> None:
        await self.client.aclose()

    # who we are / where we are installed

    pull_kind: PullKind = "pull"
    pull_word = "pull request"
    quick_actions: frozenset[str] = frozenset()

    def status_targets(
        self, repo: RepoRef, issue_number: int | None, pull_number: int | None
    ) -> list[IssueRef]:
        return remote_status_targets(repo, issue_number, pull_number, self.pull_kind)

    async def clone_url(self, repo: RepoRef) -> str | None:
        answer = (await self.get_repo(repo)).get("clone_url")
        return answer if isinstance(answer, str) else None

    async def own_handles(self) -> tuple[str, ...]:
        return (await self.bot_login(),)

    async def is_self(self, *, author: str = "", author_id: int | None = None) -> bool:
        # an App's comments carry `[bot]` and the sender type, which the events already check
        return False

    async def describe_repo(self, repo: RepoRef, fallback: RepoFacts) -> RepoFacts | None:
        info = await self.get_repo(repo)
        base = info.get("default_branch") or fallback.base_branch
        has_ci = await self.has_path(repo, base, ".github/workflows")
        return RepoFacts(
            base_branch=base,
            git_url=info.get("clone_url") or fallback.git_url,
            ci_provider="github-actions" if has_ci else None,
        )

    async def bot_login(self) -> str:
        """`<app-slug>[bot]`, the login our comments carry; the slug is fetched once if unknown."""
        if self._app_slug is None:
            app = await self.client.request("GET", "/app", auth="app")
            self._app_slug = str(app["slug"])
        return f"{self._app_slug}[bot]"

    async def installation_id(self, repo: RepoRef) -> int:
        if repo.installation_id is not None:
            return repo.installation_id
        if self._default_installation is not None:
            return self._default_installation
        cached = self._installations.get(repo.full_name)
        if cached is None:
            data = await self.client.request("GET", f"{repo_path(repo)}/installation", auth="app")
            cached = int(data["id"])
            self._installations[repo.full_name] = cached
        return cached

    async def _request(self, repo: RepoRef, method: str, path: str, data: Any = b"") -> Any:
        return await self.client.request(
            method, path, data=data, installation_id=await self.installation_id(repo)
        )

    async def _get_all(
        self, repo: RepoRef, path: str, iterable_key: str | None = None
    ) -> list[Any]:
        return await self.client.get_all(
            path, iterable_key=iterable_key, installation_id=await self.installation_id(repo)
        )

    # Forge

    async def add_reaction(self, comment: CommentRef, reaction: Reaction) -> None:
        # GitHub answers 200 instead of 201 for a reaction we already left: idempotent as is.
        path = f"{repo_path(comment.target.repo)}/issues/comments/{comment.comment_id}/reactions"
        await self._request(comment.target.repo, "POST", path, build_reaction(reaction))

    async def post_comment(self, target: IssueRef, body: str) -> CommentRef:
        path = f"{repo_path(target.repo)}/issues/{target.number}/comments"
        data = await self._request(target.repo, "POST", path, build_comment(body))
        return CommentRef(target=target, comment_id=int(data["id"]))

    async def upsert_status_comment(
        self, target: IssueRef, marker: str, body: str, *, comment_id: int | None = None
    ) -> CommentRef:
        """Edit our status comment; `comment_id` (remembered by the caller) saves the lookup."""
        text = build_status_comment_body(marker, body)
        base = repo_path(target.repo)
        if comment_id is not None:
            try:
                await self._request(
                    target.repo, "PATCH", f"{base}/issues/comments/{comment_id}", {"body": text}
                )
                return CommentRef(target=target, comment_id=comment_id)
            except GitHubHTTPError as exc:
                if exc.status_code != 404:  # deleted by someone: find or post it again
                    raise
        comments = await self._get_all(
            target.repo, with_query(f"{base}/issues/{target.number}/comments", {"per_page": 100})
        )
        found = find_status_comment(
            comments, marker, app_id=self.client.app_id, bot_login=await self.bot_login()
        )
        if found is None:
            data = await self._request(
                target.repo, "POST", f"{base}/issues/{target.number}/comments", {"body": text}
            )
            return CommentRef(target=target, comment_id=int(data["id"]))
        comment_id = int(found["id"])
        if found.get("body") != text:
            await self._request(
                target.repo, "PATCH", f"{base}/issues/comments/{comment_id}", {"body": text}
            )
        return CommentRef(target=target, comment_id=comment_id)

    async def _open_pull_for(self, repo: RepoRef, head: str) -> PullRef | None:
        owner, _ = split_repo(repo.full_name)
        path = with_query(f"{repo_path(repo)}/pulls", {"head": f"{owner}:{head}", "state": "open"})
        pulls = await self._request(repo, "GET", path)
        return pull_ref(repo, pulls[0]) if pulls else None

    async def open_draft_pr(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str
    ) -> PullRef:
        existing = await self._open_pull_for(repo, head)
        if existing is not None:
            return existing
        path = f"{repo_path(repo)}/pulls"
        try:
            data = await self._request(
                repo, "POST", path, build_draft_pr(head=head, base=base, title=title, body=body)
            )
        except GitHubHTTPError as exc:
            if exc.status_code != 422:
                raise
            message = str(exc).lower()
            if "already exists" in message:
                # Another worker opened it between our GET and POST.
                raced = await self._open_pull_for(repo, head)
                if raced is not None:
                    return raced
                raise
            if "draft" in message and "not supported" in message:
                # Draft PRs need a paid plan on private repositories; a ready PR beats none.
                log.warning("%s does not support draft PRs; opening a regular one", repo.full_name)
                data = await self._request(
                    repo,
                    "POST",
                    path,
                    build_draft_pr(head=head, base=base, title=title, body=body, draft=False),
                )
            else:
                raise
        return pull_ref(repo, data)

    async def update_pr(
        self, pull: PullRef, *, title: str | None = None, body: str | None = None
    ) -> None:
        update = build_pr_update(title=title, body=body)
        if update:
            await self._request(
                pull.repo, "PATCH", f"{repo_path(pull.repo)}/pulls/{pull.number}", update
            )

    # review feedback (issue 12)

    async def review_comments(
        self, repo: RepoRef, number: int, review_id: int
    ) -> list[dict[str, Any]]:
        """Every line comment of one submitted review (the review event does not carry them)."""
        path = f"{repo_path(repo)}/pulls/{number}/reviews/{review_id}/comments"
        return [c for c in await self._get_all(repo, path) if isinstance(c, dict)]

    async def review_state(self, repo: RepoRef, number: int, review_id: int) -> str:
        """`approved`, `changes_requested`, `commented`, … of one review (lower case)."""
        data = await self._request(
            repo, "GET", f"{repo_path(repo)}/pulls/{number}/reviews/{review_id}"
        )
        return str(data.get("state") or "").lower()

    async def reply_in_thread(
        self, target: IssueRef, thread: str, body: str, *, resolve: bool = False
    ) -> None:
        """Answer in a review comment's thread (GitHub replies to the thread's first comment).

        REST cannot resolve a thread, so `resolve` is not acted on here.
        """
        repo = target.repo
        path = f"{repo_path(repo)}/pulls/{target.number}/comments/{int(thread)}/replies"
        await self._request(repo, "POST", path, build_comment(body))

    async def pull_branches(self, repo: RepoRef, number: int) -> tuple[str, str]:
        """(head branch, base branch) of a pull request."""
        data = await self._request(repo, "GET", f"{repo_path(repo)}/pulls/{number}")
        return str(data["head"]["ref"]), str(data["base"]["ref"])

    async def mark_ready(self, pull: PullRef) -> bool:
        """Take a draft PR out of draft: REST cannot, GraphQL's mutation can (by the node id)."""
        data = await self._request(pull.repo, "GET", f"{repo_path(pull.repo)}/pulls/{pull.number}")
        if not data.get("draft"):
            return True
        answer = await self._request(
            pull.repo, "POST", "/graphql", build_ready_mutation(str(data["node_id"]))
        )
        graphql_errors(answer, "markPullRequestReadyForReview")
        return True

    async def threads_answered_with(self, repo: RepoRef, number: int, text: str) -> set[int]:
        """The review threads (by first comment id) that already hold a reply reading `text`."""
        answer = await self._request(
            repo, "POST", "/graphql", build_review_threads_query(repo, number)
        )
        graphql_errors(answer, "reviewThreads")
        return threads_with_text(answer, text)

    async def answered_threads(
        self, target: IssueRef, threads: Collection[str], text: str
    ) -> set[str]:
        """A thread is named by its first comment's id: the PR's review threads (one GraphQL
        query) show which of them already hold `text`."""
        asked = {t for t in threads if t.isdigit()}
        if not asked:
            return set()
        there = await self.threads_answered_with(target.repo, target.number, text)
        return {t for t in asked if int(t) in there}

    async def resolve_threads(
        self, target: IssueRef, threads: Collection[str], comment_ids: Collection[int] = ()
    ) -> int:
        """Through GraphQL: the threads holding the threads' first comments or `comment_ids`."""
        ids = {int(t) for t in threads if t.isdigit()} | set(comment_ids)
        return len(await self.resolve_review_threads(target.repo, target.number, ids))

    async def resolve_review_threads(
        self, repo: RepoRef, number: int, comment_ids: Iterable[int]
    ) -> list[str]:
        """Resolve the open review threads holding any of `comment_ids` (REST cannot: GraphQL's
        `resolveReviewThread` takes the thread's node id, found through the PR's reviewThreads).
        Returns the threads resolved; the first 100 threads of the PR are looked at."""
        answer = await self._request(
            repo, "POST", "/graphql", build_review_threads_query(repo, number)
        )
        graphql_errors(answer, "reviewThreads")
        resolved: list[str] = []
        for thread in threads_holding(answer, comment_ids):
            done = await self._request(
                repo, "POST", "/graphql", build_resolve_thread_mutation(thread)
            )
            graphql_errors(done, "resolveReviewThread")
            resolved.append(thread)
        return resolved

    async def _find_check_run(self, repo: RepoRef, check: CheckReport) -> tuple[int, str] | None:
        key = (repo.full_name, check.head_sha, check.name)
        cached = self._check_runs.get(key)
        if cached is not None:
            return cached
        params: dict[str, str | int] = {"check_name": check.name, "filter": "latest"}
        if self.client.app_id is not None:
            params["app_id"] = self.client.app_id
        runs = await self.list_check_runs(repo, check.head_sha, params=params)
        for run in runs:
            app = run.get("app") or {}
            if self.client.app_id is None or str(app.get("id")) == self.client.app_id:
                found = (int(run["id"]), str(run.get("status") or ""))
                self._check_runs[key] = found
                return found
        return None

    async def report_check(self, repo: RepoRef, check: CheckReport) -> None:
        await self.put_check(repo, check)

    async def put_check(
        self, repo: RepoRef, check: CheckReport, *, run_id: int | None = None, lookup: bool = True
    ) -> int:
        """Create or update a check run and return its id.

        A known open `run_id` is updated without a lookup; `lookup=False` (the caller keeps the
        ids itself) creates a new run when no id is given.
        """
        key = (repo.full_name, check.head_sha, check.name)
        now = self._clock()
        existing: tuple[int, str] | None = None
        if run_id is not None:
            existing = (run_id, "in_progress")
        elif lookup:
            existing = await self._find_check_run(repo, check)
        # A finished run is not reopened: a re-run gets a new run, which GitHub shows as latest.
        if existing is not None and not (
            existing[1] == "completed" and check.status != "completed"
        ):
            run_id = existing[0]
            await self._request(
                repo,
                "PATCH",
                f"{repo_path(repo)}/check-runs/{run_id}",
                build_check_run_update(check, now=now),
            )
        else:
            data = await self._request(
                repo, "POST", f"{repo_path(repo)}/check-runs", build_check_run(check, now=now)
            )
            run_id = int(data["id"])
        self._check_runs[key] = (run_id, check.status)
        return run_id

    async def get_permission(self, repo: RepoRef, username: str) -> Permission:
        path = f"{repo_path(repo)}/collaborators/{quote(username, safe='')}/permission"
        try:
            data = await self._request(repo, "GET", path)
        except GitHubHTTPError as exc:
            if exc.status_code == 404:  # not a collaborator (or no such user)
                return "none"
            raise
        return map_permission(data)

    async def pull_is_fork(self, repo: RepoRef, number: int) -> bool:
        """Whether pull request `number` comes from another repository (a deleted fork too).

        An issue_comment on a PR carries `issue.pull_request` but not the head repository, so
        the pull itself is asked for.
        """
        data = await self._request(repo, "GET", f"{repo_path(repo)}/pulls/{number}")
        return is_fork_pull(data, repo.full_name)

    async def git_auth_header(self, repo: RepoRef) -> str | None:
        # The whole header line: git takes it as `http.extraheader` (see bot/git/runner.py).
        token = await self.client.installation_token(await self.installation_id(repo))
        return f"Authorization: {basic_git_auth(token.token)}"

    # helpers for jobs

    async def get_repo(self, repo: RepoRef) -> dict[str, Any]:
        data = await self._request(repo, "GET", repo_path(repo))
        return dict(data)

    async def has_path(self, repo: RepoRef, ref: str, path: str) -> bool:
        url = with_query(f"{repo_path(repo)}/contents/{quote(path.strip('/'))}", {"ref": ref})
        try:
            await self._request(repo, "GET", url)
        except GitHubHTTPError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    async def list_check_suites(self, repo: RepoRef, sha: str) -> list[dict[str, Any]]:
        path = with_query(f"{repo_path(repo)}/commits/{sha}/check-suites", {"per_page": 100})
        return await self._get_all(repo, path, "check_suites")

    async def list_check_runs(
        self, repo: RepoRef, sha: str, *, params: Mapping[str, str | int] | None = None
    ) -> list[dict[str, Any]]:
        query = {"per_page": 100, **(params or {})}
        path = with_query(f"{repo_path(repo)}/commits/{sha}/check-runs", query)
        return await self._get_all(repo, path, "check_runs")

    async def check_run_annotations(self, repo: RepoRef, check_run_id: int) -> list[dict[str, Any]]:
        """A check run's annotations (file, line, level, message): the first page is plenty."""
        path = with_query(
            f"{repo_path(repo)}/check-runs/{int(check_run_id)}/annotations", {"per_page": 50}
        )
        found = await self._request(repo, "GET", path)
        return [a for a in found if isinstance(a, dict)] if isinstance(found, list) else []

    async def job_log(self, repo: RepoRef, job_id: int, limit: int) -> str:
        """The plain-text log of a GitHub Actions job (its last `limit` bytes)."""
        return await self.client.download_text(
            f"{repo_path(repo)}/actions/jobs/{int(job_id)}/logs",
            installation_id=await self.installation_id(repo),
            limit=limit,
        )

    async def convert_manifest(self, code: str) -> dict[str, Any]:
        """Exchange a manifest-flow `code` for the new app's id, slug, pem, webhook_secret…"""
        return await _convert(self.client, code)


async def _convert(client: GitHubClient, code: str) -> dict[str, Any]:
    # The code is a bearer credential for the new app's key: pass it as a template variable so
    # logs and errors show only the template.
    data = await client.request(
        "POST", "/app-manifests/{code}/conversions", {"code": code}, data=b"", auth="none"
    )
    return dict(data)


async def convert_manifest(
    code: str, *, api_url: str = DEFAULT_API_URL, http: httpx.AsyncClient | None = None
) -> dict[str, Any]:
    """The manifest conversion before any app credentials exist (an unauthenticated request)."""
    async with GitHubClient(api_url=api_url, http=http) as client:
        return await _convert(client, code)


if TYPE_CHECKING:

    def _implements_forge(forge: GitHubForge) -> Forge:
        return forge
