"""The Forge interface every job talks to; GitHub, GitLab and Local implement it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Self

Reaction = Literal["eyes", "rocket", "confused", "+1"]
Permission = Literal["admin", "write", "read", "none"]
CheckState = Literal["queued", "in_progress", "completed"]
CheckConclusion = Literal["success", "failure", "neutral", "cancelled", "action_required"]


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


class Forge(Protocol):
    """What a job may ask of a forge. Every method is idempotent where the forge allows."""

    provider: str

    async def add_reaction(self, comment: CommentRef, reaction: Reaction) -> None: ...

    async def post_comment(self, target: IssueRef, body: str) -> CommentRef: ...

    async def upsert_status_comment(self, target: IssueRef, marker: str, body: str) -> CommentRef:
        """Edit the comment holding `marker` that we authored, or post a new one."""
        ...

    async def open_draft_pr(
        self, repo: RepoRef, *, head: str, base: str, title: str, body: str
    ) -> PullRef:
        """Open a draft PR/MR for `head`, or return the open one that already exists."""
        ...

    async def update_pr(self, pull: PullRef, *, title: str | None = None, body: str | None = None) -> None: ...

    async def report_check(self, repo: RepoRef, check: CheckReport) -> None:
        """Create or update the check run / commit status named `check.name` on `head_sha`."""
        ...

    async def get_permission(self, repo: RepoRef, username: str) -> Permission: ...

    async def git_auth_header(self, repo: RepoRef) -> str | None:
        """An `Authorization: ...` header value for git over HTTPS, or None (local remotes)."""
        ...


class AsyncClosing:
    """`async with` for a client that has `aclose()`: the block closes it."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
