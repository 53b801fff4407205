"""The Forge interface every job talks to; GitHub, GitLab and Local implement it."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Self

Reaction = Literal["eyes", "rocket", "confused", "+1"]
Permission = Literal["admin", "write", "read", "none"]
CheckState = Literal["queued", "in_progress", "completed"]
CheckConclusion = Literal["success", "failure", "neutral", "cancelled", "action_required"]
PullKind = Literal["pull", "merge_request"]


@dataclass(frozen=True)
class RepoRef:
    """A repository on a forge: GitHub `owner/name`, GitLab path or numeric id, Local path."""

    provider: Literal["github", "gitlab", "local"]
    full_name: str
    installation_id: int | None = None  # GitHub App installation
    forge_id: str | None = None  # GitLab numeric project id


@dataclass(frozen=True)
class IssueRef:
    """An issue, PR or MR thread that comments can be posted to."""

    repo: RepoRef
    number: int  # GitHub issue/PR number; GitLab iid
    kind: Literal["issue", "pull", "merge_request"] = "issue"


@dataclass(frozen=True)
class CommentRef:
    """A comment (GitHub) or note (GitLab) the bot can react to or edit."""

    target: IssueRef
    comment_id: int


@dataclass(frozen=True)
class PullRef:
    """A (draft) pull request or merge request."""

    repo: RepoRef
    number: int
    url: str
    head: str


@dataclass(frozen=True)
class CheckAction:
    """A check-run button; GitHub caps label at 20, description at 40, identifier at 20."""

    label: str
    description: str
    identifier: str


@dataclass(frozen=True)
class CheckReport:
    """A step/QA check: a GitHub check run or a GitLab commit status."""

    name: str  # deksdenflow/step-01, deksdenflow/qa-01
    head_sha: str
    status: CheckState
    conclusion: CheckConclusion | None = None
    title: str = ""
    summary: str = ""
    text: str = ""
    details_url: str | None = None
    actions: tuple[CheckAction, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RepoFacts:
    """What a forge says of a repository when a project is set up."""

    base_branch: str
    git_url: str
    ci_provider: str | None  # github-actions, gitlab-ci, or None when the default branch has none
    forge_id: str | None = None  # GitLab's numeric project id


class Forge(Protocol):
    """What a job may ask of a forge. Every method is idempotent where the forge allows."""

    provider: str

    async def add_reaction(self, comment: CommentRef, reaction: Reaction) -> None: ...

    async def post_comment(self, target: IssueRef, body: str) -> CommentRef: ...

    async def upsert_status_comment(
        self, target: IssueRef, marker: str, body: str, *, comment_id: int | None = None
    ) -> CommentRef:
        """Edit the comment holding `marker` that we authored, or post a new one; a remembered
        `comment_id` is edited without listing the thread first."""
        ...

    async def open_draft_pr(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str
    ) -> PullRef:
        """Open a draft PR/MR for `head`, or return the open one that already exists."""
        ...

    async def update_pr(
        self, pull: PullRef, *, title: str | None = None, body: str | None = None
    ) -> None: ...

    async def report_check(self, repo: RepoRef, check: CheckReport) -> None:
        """Create or update the check run / commit status named `check.name` on `head_sha`."""
        ...

    async def get_permission(self, repo: RepoRef, username: str) -> Permission: ...

    async def git_auth_header(self, repo: RepoRef) -> str | None:
        """An `Authorization: ...` header value for git over HTTPS, or None (local remotes)."""
        ...

    # What jobs and handlers ask beyond posting: each forge answers in its own terms, so no
    # caller checks which forge it holds.

    pull_kind: PullKind  # the thread kind of a pull/merge request
    pull_word: str  # "pull request" / "merge request", for sentences
    quick_actions: frozenset[str]  # the forge's own slash commands, never answered as typos

    def status_targets(
        self, repo: RepoRef, issue_number: int | None, pull_number: int | None
    ) -> list[IssueRef]:
        """The threads a protocol's status comment lives on (pure)."""
        ...

    async def describe_repo(self, repo: RepoRef, fallback: RepoFacts) -> RepoFacts | None:
        """Default branch, clone URL and CI of `repo`; None for a forge with nothing to say."""
        ...

    async def clone_url(self, repo: RepoRef) -> str | None:
        """The HTTPS clone URL the forge gives for `repo` (None: the forge does not say)."""
        ...

    async def own_handles(self) -> tuple[str, ...]:
        """The names an `@<bot>` mention of us uses (beyond the configured App slug)."""
        ...

    async def is_self(self, *, author: str = "", author_id: int | None = None) -> bool:
        """Whether a comment's author is our own account (by id when the event has one)."""
        ...

    async def pull_is_fork(self, repo: RepoRef, number: int) -> bool:
        """Whether a pull/merge request comes from another repository."""
        ...

    async def pull_branches(self, repo: RepoRef, number: int) -> tuple[str, str]:
        """(head branch, base branch) of a pull/merge request."""
        ...

    async def put_check(
        self, repo: RepoRef, check: CheckReport, *, run_id: int | None = None, lookup: bool = True
    ) -> int | None:
        """`report_check` that returns the check run's id where the forge has one."""
        ...

    async def mark_ready(self, pull: PullRef) -> bool:
        """Take a draft out of draft; False when the forge has no drafts to mark."""
        ...

    async def review_comments(
        self, repo: RepoRef, number: int, review_id: int
    ) -> list[dict[str, Any]]:
        """Every line comment of one submitted review ([] where reviews do not exist)."""
        ...

    async def review_state(self, repo: RepoRef, number: int, review_id: int) -> str:
        """A review's state in lower case ("" where reviews do not exist)."""
        ...

    async def reply_in_thread(
        self, target: IssueRef, thread: str, body: str, *, resolve: bool = False
    ) -> None:
        """Answer in a review thread; `resolve` marks it resolved where the forge can."""
        ...

    async def answered_threads(
        self, target: IssueRef, threads: Collection[str], text: str
    ) -> set[str]:
        """Those of `threads` that already hold a reply reading `text` (a run that died after
        replying, before recording it); a forge that cannot tell names none, so they are
        answered again."""
        ...

    async def resolve_threads(
        self, target: IssueRef, threads: Collection[str], comment_ids: Collection[int] = ()
    ) -> int:
        """Mark review `threads` resolved, and say how many were; `comment_ids` are comments in
        them (GitHub finds a thread by its comments, GitLab by the thread id)."""
        ...


class AsyncClosing:
    """`async with` for a client that has `aclose()`: the block closes it."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def remote_status_targets(
    repo: RepoRef, issue_number: int | None, pull_number: int | None, pull_kind: PullKind
) -> list[IssueRef]:
    """The issue a protocol was started from and its PR/MR, whichever exist (pure)."""
    targets = [IssueRef(repo, issue_number, "issue")] if issue_number else []
    if pull_number:
        targets.append(IssueRef(repo, pull_number, pull_kind))
    return targets
