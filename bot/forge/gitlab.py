"""The GitLab Forge: notes, award emoji, draft MRs, commit statuses and access levels."""

from __future__ import annotations

import base64
import re
from collections.abc import Collection, Mapping
from contextlib import aclosing
from typing import Any, Literal
from urllib.parse import quote

from bot.core.errors import ForgeError
from bot.domain.commands import GITLAB_QUICK_ACTIONS
from bot.forge.base import (
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
from bot.forge.gitlab_client import GitLabAPIError, GitLabClient, project_path

GitLabState = Literal["pending", "running", "success", "failed", "canceled"]

# GitLab names the thumbs-up emoji "thumbsup"; GitHub's reaction is "+1".
EMOJI_NAMES: Mapping[str, str] = {
    "eyes": "eyes",
    "rocket": "rocket",
    "confused": "confused",
    "+1": "thumbsup",
}

# Access levels (GitLab's Gitlab::Access): 5 minimal, 10 guest, 15 planner, 20 reporter,
# 30 developer, 40 maintainer, 50 owner, 60 admin.
ADMIN_LEVEL = 40
WRITE_LEVEL = 30
READ_LEVEL = 10

STATUS_NAME_MAX = 254  # GitLab rejects a commit status name of 255 characters or more
STATUS_DESCRIPTION_MAX = 255

DRAFT_PREFIX = "Draft: "
_DRAFT_TITLE = re.compile(r"^\s*(\[draft\]|\(draft\)|draft:|draft\s*-)", re.IGNORECASE)
# 400 answer for a status posted twice, e.g. "Cannot transition status via :run from :running".
_SAME_STATE = re.compile(r"Cannot transition status via :(\w+) from :(\w+)")


# -- pure builders ------------------------------------------------------------------------------


def project_id(repo: RepoRef) -> str:
    """The `:id` segment for a repo: the numeric id when we know it, else the encoded path."""
    return project_path(int(repo.forge_id) if repo.forge_id else repo.full_name)


def noteable_path(target: IssueRef) -> str:
    """`/projects/:id/issues/:iid` or `/projects/:id/merge_requests/:iid`."""
    collection = "issues" if target.kind == "issue" else "merge_requests"
    return f"/projects/{project_id(target.repo)}/{collection}/{target.number}"


def award_emoji_payload(reaction: Reaction) -> dict[str, Any]:
    return {"name": EMOJI_NAMES[reaction]}


def note_payload(body: str) -> dict[str, Any]:
    return {"body": body}


def status_note_body(marker: str, body: str) -> str:
    """The status note text; the marker is added when the body lacks it, or we'd never find it."""
    return body if marker in body else f"{marker}\n{body}"


def find_status_note(
    notes: list[dict[str, Any]], marker: str, own_user_id: int
) -> dict[str, Any] | None:
    """Our status note: holds the marker AND was written by us (anyone can paste a marker)."""
    for note in notes:
        if note.get("system"):
            continue
        if (note.get("author") or {}).get("id") != own_user_id:
            continue
        if marker in (note.get("body") or ""):
            return note
    return None


def draft_title(title: str) -> str:
    """A merge request title that GitLab reads as draft."""
    return title if _DRAFT_TITLE.match(title) else f"{DRAFT_PREFIX}{title}"


def ready_title(title: str) -> str:
    """The title without its draft prefix (GitLab marks an MR ready by its title)."""
    return _DRAFT_TITLE.sub("", title, count=1).lstrip()


def merge_request_payload(*, head: str, base: str, title: str, body: str) -> dict[str, Any]:
    return {
        "source_branch": head,
        "target_branch": base,
        "title": draft_title(title),
        "description": body,
    }


def merge_request_update_payload(
    *, title: str | None, body: str | None, is_draft: bool
) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if title is not None:
        # GitHub keeps draft state apart from the title; on GitLab a new title without the prefix
        # would silently mark the MR ready, so keep it draft unless it was ready already.
        payload["title"] = draft_title(title) if is_draft else title
    if body is not None:
        payload["description"] = body
    return payload


def pull_ref(repo: RepoRef, mr: Mapping[str, Any]) -> PullRef:
    return PullRef(
        repo=repo, number=int(mr["iid"]), url=str(mr["web_url"]), head=str(mr["source_branch"])
    )


def commit_state(check: CheckReport) -> GitLabState:
    """Map a check's status/conclusion onto GitLab's commit status states."""
    if check.status == "queued":
        return "pending"
    if check.status == "in_progress":
        return "running"
    if check.conclusion == "cancelled":
        return "canceled"
    if check.conclusion in ("success", "neutral"):
        # neutral is GitHub's "don't block"; GitLab has no such state, success is closest.
        return "success"
    # failure, action_required, or a completed check without a conclusion: never show green.
    return "failed"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def commit_status_payload(check: CheckReport, *, pipeline_id: int | None) -> dict[str, Any]:
    """The body of `POST /projects/:id/statuses/:sha` for a check."""
    payload: dict[str, Any] = {
        "state": commit_state(check),
        "name": _clip(check.name, STATUS_NAME_MAX),
    }
    description = check.title or check.summary
    if description:
        payload["description"] = _clip(" ".join(description.split()), STATUS_DESCRIPTION_MAX)
    if check.details_url:
        payload["target_url"] = check.details_url
    if pipeline_id is not None:
        payload["pipeline_id"] = pipeline_id
    return payload


def is_same_state_error(exc: GitLabAPIError, state: str) -> bool:
    """A 400 saying the status already is `state`: the update we wanted has happened."""
    if exc.status_code != 400:
        return False
    match = _SAME_STATE.search(exc.message)
    return match is not None and match.group(2) == state


def permission_for(access_level: int | None) -> Permission:
    if access_level is None:
        return "none"
    if access_level >= ADMIN_LEVEL:
        return "admin"
    if access_level >= WRITE_LEVEL:
        return "write"
    if access_level >= READ_LEVEL:
        return "read"
    return "none"  # minimal access (5) cannot even read the code


def git_basic_auth_header(token: str) -> str:
    """`Authorization: Basic base64("oauth2:<token>")` for git over HTTPS.

    GitLab accepts any access token (personal, project, group, OAuth) as the password of an
    HTTP Basic login; the user name is only checked for OAuth tokens, where it must be "oauth2",
    so "oauth2" works for all of them.
    """
    raw = base64.b64encode(f"oauth2:{token}".encode()).decode("ascii")
    return f"Authorization: Basic {raw}"


def project_hook_payload(
    url: str,
    secret: str,
    *,
    note_events: bool = True,
    issues_events: bool = True,
    merge_requests_events: bool = True,
    pipeline_events: bool = True,
    push_events: bool = False,
    enable_ssl_verification: bool = True,
) -> dict[str, Any]:
    # Confidential issues and their notes come as their own events ("Confidential Issue Hook",
    # "Confidential Note Hook") behind their own flags: without them such issues are silent.
    # Review feedback needs no flag of its own: diff and discussion notes are note events, an MR
    # approval is a merge request event (action "approved").
    return {
        "url": url,
        "token": secret,
        "note_events": note_events,
        "confidential_note_events": note_events,
        "issues_events": issues_events,
        "confidential_issues_events": issues_events,
        "merge_requests_events": merge_requests_events,
        "pipeline_events": pipeline_events,
        "push_events": push_events,
        "enable_ssl_verification": enable_ssl_verification,
    }


def project_summary(project: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("id", "path_with_namespace", "default_branch", "http_url_to_repo")
    return {key: project.get(key) for key in keys}


# -- the adapter ----------------------------------------------------------------------------------


class GitLabForge:
    """Forge over one GitLab instance and token; senders are thin, payloads come from builders."""

    provider = "gitlab"
    pull_kind: PullKind = "merge_request"
    pull_word = "merge request"
    # GitLab runs its own quick actions (/assign, /label, …): never answered as our typos
    quick_actions: frozenset[str] = GITLAB_QUICK_ACTIONS

    def __init__(self, client: GitLabClient) -> None:
        self._client = client
        self._own_user_id: int | None = None
        self._own_username: str | None = None

    @property
    def client(self) -> GitLabClient:
        return self._client

    async def own_user_id(self) -> int:
        """Our own user id (`GET /user`, once): a project/group token is a bot user too."""
        if self._own_user_id is None:
            user = await self._client.get("/user")
            self._own_user_id = int(user["id"])
            self._own_username = str(user.get("username") or "") or None
        return self._own_user_id

    def status_targets(
        self, repo: RepoRef, issue_number: int | None, pull_number: int | None
    ) -> list[IssueRef]:
        return remote_status_targets(repo, issue_number, pull_number, self.pull_kind)

    async def clone_url(self, repo: RepoRef) -> str | None:
        answer = (await self.get_project(repo.forge_id or repo.full_name)).get("http_url_to_repo")
        return answer if isinstance(answer, str) else None

    async def own_handles(self) -> tuple[str, ...]:
        return (await self.own_username(),)

    async def is_self(self, *, author: str = "", author_id: int | None = None) -> bool:
        # a token of an ordinary user account is us too, though its notes do not say "bot"
        if author_id is not None:
            return author_id == await self.own_user_id()
        return bool(author) and author.casefold() == (await self.own_username()).casefold()

    async def pull_is_fork(self, repo: RepoRef, number: int) -> bool:
        # a note event carries the MR's source project, which the handler checks itself
        return False

    async def put_check(
        self, repo: RepoRef, check: CheckReport, *, run_id: int | None = None, lookup: bool = True
    ) -> int | None:
        await self.report_check(repo, check)  # a commit status has no id to remember
        return None

    async def review_comments(
        self, repo: RepoRef, number: int, review_id: int
    ) -> list[dict[str, Any]]:
        return []  # GitLab has no submitted reviews: each note is its own event

    async def review_state(self, repo: RepoRef, number: int, review_id: int) -> str:
        return ""

    async def describe_repo(self, repo: RepoRef, fallback: RepoFacts) -> RepoFacts | None:
        info = await self.get_project(fallback.forge_id or repo.full_name)
        base = info.get("default_branch") or fallback.base_branch
        forge_id = str(info.get("id") or fallback.forge_id)
        has_ci = await self.has_file(forge_id, base, ".gitlab-ci.yml")
        return RepoFacts(
            base_branch=base,
            git_url=info.get("http_url_to_repo") or fallback.git_url,
            ci_provider="gitlab-ci" if has_ci else None,
            forge_id=forge_id,
        )

    async def add_reaction(self, comment: CommentRef, reaction: Reaction) -> None:
        path = f"{noteable_path(comment.target)}/notes/{comment.comment_id}/award_emoji"
        try:
            await self._client.post(path, award_emoji_payload(reaction))
        except GitLabAPIError as exc:
            # GitLab answers an emoji we already awarded with 404 "Name has already been taken".
            if exc.status_code == 404 and "already been taken" in exc.message:
                return
            raise

    async def post_comment(self, target: IssueRef, body: str) -> CommentRef:
        note = await self._client.post(f"{noteable_path(target)}/notes", note_payload(body))
        return CommentRef(target=target, comment_id=int(note["id"]))

    async def upsert_status_comment(
        self, target: IssueRef, marker: str, body: str, *, comment_id: int | None = None
    ) -> CommentRef:
        """Edit our status note; `comment_id` (remembered by the caller) saves listing the notes."""
        text = status_note_body(marker, body)
        notes_path = f"{noteable_path(target)}/notes"
        if comment_id is not None:
            try:
                await self._client.put(f"{notes_path}/{comment_id}", note_payload(text))
                return CommentRef(target=target, comment_id=comment_id)
            except GitLabAPIError as exc:
                if exc.status_code != 404:  # deleted by someone: find or post it again
                    raise
        user_id = await self.own_user_id()
        found: dict[str, Any] | None = None
        # Oldest first: our status note is usually among the first notes of the thread.
        pages = self._client.paginate(notes_path, {"sort": "asc", "order_by": "created_at"})
        async with aclosing(pages) as notes:
            async for note in notes:
                found = find_status_note([note], marker, user_id)
                if found is not None:
                    break
        if found is None:
            note = await self._client.post(notes_path, note_payload(text))
            return CommentRef(target=target, comment_id=int(note["id"]))
        if found.get("body") != text:
            await self._client.put(f"{notes_path}/{found['id']}", note_payload(text))
        return CommentRef(target=target, comment_id=int(found["id"]))

    async def open_draft_pr(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str
    ) -> PullRef:
        existing = await self._open_merge_request(repo, head)
        if existing is not None:
            return pull_ref(repo, existing)
        payload = merge_request_payload(head=head, base=base, title=title, body=body)
        try:
            mr = await self._client.post(f"/projects/{project_id(repo)}/merge_requests", payload)
        except GitLabAPIError as exc:
            # 409: another worker opened it between our lookup and our create.
            if exc.status_code != 409:
                raise
            raced = await self._open_merge_request(repo, head)
            if raced is None:
                raise
            return pull_ref(repo, raced)
        return pull_ref(repo, mr)

    async def update_pr(
        self, pull: PullRef, *, title: str | None = None, body: str | None = None
    ) -> None:
        if title is None and body is None:
            return
        path = f"/projects/{project_id(pull.repo)}/merge_requests/{pull.number}"
        is_draft = False
        if title is not None:
            current = await self._client.get(path)
            is_draft = bool(current.get("draft") or current.get("work_in_progress"))
        payload = merge_request_update_payload(title=title, body=body, is_draft=is_draft)
        await self._client.put(path, payload)

    async def mark_ready(self, pull: PullRef) -> bool:
        """Take the MR out of draft (GitLab: drop the title prefix)."""
        path = f"/projects/{project_id(pull.repo)}/merge_requests/{pull.number}"
        current = await self._client.get(path)
        title = str(current["title"])
        if ready_title(title) != title:
            await self._client.put(path, {"title": ready_title(title)})
        return True

    async def own_username(self) -> str:
        """Our own username (`GET /user`, once): the handle `@<bot> <command>` mentions."""
        if self._own_username is None:
            user = await self._client.get("/user")
            self._own_user_id, self._own_username = int(user["id"]), str(user["username"])
        return self._own_username

    async def pull_branches(self, repo: RepoRef, number: int) -> tuple[str, str]:
        """(source branch, target branch) of a merge request."""
        mr = await self._client.get(f"/projects/{project_id(repo)}/merge_requests/{number}")
        return str(mr["source_branch"]), str(mr["target_branch"])

    async def reply_in_thread(
        self, target: IssueRef, thread: str, body: str, *, resolve: bool = False
    ) -> None:
        """A note in merge request discussion `thread`; `resolve` then marks it resolved."""
        path = f"{noteable_path(target)}/discussions/{quote(thread, safe='')}"
        await self._client.post(f"{path}/notes", note_payload(body))
        if resolve:
            await self.resolve_discussion(target, thread)

    async def answered_threads(
        self, target: IssueRef, threads: Collection[str], text: str
    ) -> set[str]:
        """Not asked: reading every discussion back costs more than a reply sent twice."""
        return set()

    async def resolve_threads(
        self, target: IssueRef, threads: Collection[str], comment_ids: Collection[int] = ()
    ) -> int:
        """One discussion at a time (a thread is a discussion id; the comments are not needed)."""
        for thread in threads:
            await self.resolve_discussion(target, thread)
        return len(threads)

    async def resolve_discussion(self, target: IssueRef, discussion_id: str) -> None:
        """Mark a merge request discussion resolved."""
        path = f"{noteable_path(target)}/discussions/{quote(discussion_id, safe='')}"
        await self._client.put(path, {"resolved": True})

    async def report_check(self, repo: RepoRef, check: CheckReport) -> None:
        pipeline_id = await self._pipeline_for(repo, check.head_sha)
        payload = commit_status_payload(check, pipeline_id=pipeline_id)
        try:
            await self._client.post(
                f"/projects/{project_id(repo)}/statuses/{check.head_sha}", payload
            )
        except GitLabAPIError as exc:
            if is_same_state_error(exc, payload["state"]):
                return
            raise

    async def get_permission(self, repo: RepoRef, username: str) -> Permission:
        users = await self._client.get("/users", {"username": username})
        if not users:
            return "none"
        user = users[0]
        if user.get("state") not in (None, "active"):
            return "none"  # blocked or deactivated accounts act on nothing
        # members/all includes members inherited from ancestor groups and invited groups, with
        # the effective (highest) access level for the user.
        member = await self._client.get_or_none(
            f"/projects/{project_id(repo)}/members/all/{int(user['id'])}"
        )
        if not member or member.get("state") not in (None, "active"):
            return "none"  # "awaiting": an invitation not yet accepted
        return permission_for(member.get("access_level"))

    async def git_auth_header(self, repo: RepoRef) -> str | None:
        return git_basic_auth_header(self._client.token)

    # -- helpers jobs need ------------------------------------------------------------------------

    async def get_project(self, path_or_id: str | int) -> dict[str, Any]:
        """id, path_with_namespace, default_branch and http_url_to_repo of a project."""
        project = await self._client.get(f"/projects/{project_path(path_or_id)}")
        return project_summary(project)

    async def has_file(self, project: str | int, ref: str, file_path: str) -> bool:
        """Whether `file_path` exists at `ref` (HEAD on the repository files API)."""
        path = f"/projects/{project_path(project)}/repository/files/{project_path(file_path)}"
        try:
            await self._client.request("HEAD", path, query={"ref": ref})
        except GitLabAPIError as exc:
            if exc.status_code == 404:
                return False
            raise
        return True

    async def create_project_hook(
        self,
        project: str | int,
        url: str,
        secret: str,
        *,
        note_events: bool = True,
        issues_events: bool = True,
        merge_requests_events: bool = True,
        pipeline_events: bool = True,
        push_events: bool = False,
        enable_ssl_verification: bool = True,
    ) -> dict[str, Any]:
        """Create our webhook on a project, or update the one already pointing at `url`."""
        payload = project_hook_payload(
            url,
            secret,
            note_events=note_events,
            issues_events=issues_events,
            merge_requests_events=merge_requests_events,
            pipeline_events=pipeline_events,
            push_events=push_events,
            enable_ssl_verification=enable_ssl_verification,
        )
        return await self._upsert_hook(f"/projects/{project_path(project)}/hooks", payload)

    async def create_group_hook(self, group: str | int, url: str, secret: str) -> dict[str, Any]:
        """The same webhook on a group: it serves every project below it (GitLab Premium)."""
        payload = project_hook_payload(url, secret)
        return await self._upsert_hook(f"/groups/{project_path(group)}/hooks", payload)

    async def get_group(self, path_or_id: str | int) -> dict[str, Any]:
        data: dict[str, Any] = await self._client.get(f"/groups/{project_path(path_or_id)}")
        return data

    async def group_projects(self, group: str | int) -> list[dict[str, Any]]:
        """Every project of a group and its subgroups (archived ones left out)."""
        path = f"/groups/{project_path(group)}/projects"
        query = {"include_subgroups": "true", "archived": "false"}
        async with aclosing(self._client.paginate(path, query)) as items:
            return [dict(item) async for item in items]

    async def _upsert_hook(self, hooks_path: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = payload["url"]
        existing: dict[str, Any] | None = None
        async with aclosing(self._client.paginate(hooks_path)) as hooks:
            async for hook in hooks:
                if hook.get("url") == url:
                    existing = hook
                    break
        if existing is not None:
            # Always PUT: GitLab never shows the stored token, so we cannot tell if it changed.
            updated: dict[str, Any] = await self._client.put(
                f"{hooks_path}/{existing['id']}", payload
            )
            return updated
        created: dict[str, Any] = await self._client.post(hooks_path, payload)
        return created

    async def failed_jobs(self, repo: RepoRef, pipeline_id: int) -> list[dict[str, Any]]:
        """The pipeline's failed jobs (those allowed to fail left out)."""
        jobs = await self._client.get(
            f"/projects/{project_id(repo)}/pipelines/{int(pipeline_id)}/jobs",
            {"scope[]": "failed", "per_page": 100},
        )
        return [
            dict(j) for j in jobs or [] if isinstance(j, Mapping) and not j.get("allow_failure")
        ]

    async def job_trace(self, repo: RepoRef, job_id: int, limit: int) -> str:
        """A job's trace, its last `limit` bytes."""
        project: str | int = int(repo.forge_id) if repo.forge_id else repo.full_name
        return await self._client.job_trace(project, job_id, limit)

    # -- internals ---------------------------------------------------------------------------------

    async def _open_merge_request(self, repo: RepoRef, head: str) -> dict[str, Any] | None:
        mrs = await self._client.get(
            f"/projects/{project_id(repo)}/merge_requests",
            {"state": "opened", "source_branch": head},
        )
        # The filter is on the target project, so a fork's branch of the same name can show up.
        for mr in mrs or []:
            source = mr.get("source_project_id")
            target = mr.get("target_project_id")
            if source is None or source == target:
                return dict(mr)
        return None

    async def _pipeline_for(self, repo: RepoRef, sha: str) -> int | None:
        """The commit's latest pipeline, so our status joins it instead of a new external one.

        Not cached: a retried or new pipeline for the same sha becomes the one the MR shows.
        """
        commit = await self._client.get_or_none(
            f"/projects/{project_id(repo)}/repository/commits/{sha}"
        )
        pipeline = (commit or {}).get("last_pipeline")
        if not pipeline or pipeline.get("id") is None:
            return None
        return int(pipeline["id"])


def gitlab_forge(url: str, token: str, **client_options: Any) -> GitLabForge:
    """A GitLabForge with its own client; close it with `await forge.client.aclose()`."""
    if not url:
        raise ForgeError("GitLab URL is empty")
    return GitLabForge(GitLabClient(url, token, **client_options))
