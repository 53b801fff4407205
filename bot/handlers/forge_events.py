"""Pure extraction of the few fields the bot acts on from GitHub and GitLab payloads (any shape)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def dig(payload: Any, *path: str) -> Any:
    """Nested lookup that tolerates any payload shape: missing keys and non-dicts give None."""
    for key in path:
        if not isinstance(payload, dict):
            return None
        payload = payload.get(key)
    return payload


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


@dataclass(frozen=True)
class RepoInfo:
    provider: str
    full_name: str
    clone_url: str
    default_branch: str
    installation_id: int | None = None
    forge_id: str | None = None


@dataclass(frozen=True)
class CommentEvent:
    """A new comment/note on an issue or PR/MR, normalised across forges."""

    repo: RepoInfo
    issue_number: int
    is_pull: bool
    comment_id: int
    body: str
    author: str
    author_is_bot: bool
    issue_title: str
    issue_body: str
    from_fork: bool = False
    author_id: int | None = None


@dataclass(frozen=True)
class LabelEvent:
    repo: RepoInfo
    issue_number: int
    labels_added: tuple[str, ...]
    author: str
    author_is_bot: bool
    issue_title: str
    issue_body: str


def github_repo(payload: dict[str, Any]) -> RepoInfo | None:
    full_name = _str(dig(payload, "repository", "full_name"))
    if not full_name:
        return None
    return RepoInfo(
        provider="github",
        full_name=full_name,
        clone_url=_str(dig(payload, "repository", "clone_url"))
        or f"https://github.com/{full_name}.git",
        default_branch=_str(dig(payload, "repository", "default_branch")) or "main",
        installation_id=_int(dig(payload, "installation", "id")),
    )


def _github_is_bot(user: Any) -> bool:
    return _str(dig(user, "type")) == "Bot" or _str(dig(user, "login")).endswith("[bot]")


def github_comment(payload: dict[str, Any]) -> CommentEvent | None:
    """issue_comment `created` (edits are never re-run) → CommentEvent, or None if unusable."""
    if payload.get("action") != "created":
        return None
    repo = github_repo(payload)
    number = _int(dig(payload, "issue", "number"))
    comment_id = _int(dig(payload, "comment", "id"))
    if repo is None or number is None or comment_id is None:
        return None
    user = dig(payload, "comment", "user")
    is_pull = isinstance(dig(payload, "issue", "pull_request"), dict)
    return CommentEvent(
        repo=repo,
        issue_number=number,
        is_pull=is_pull,
        comment_id=comment_id,
        body=_str(dig(payload, "comment", "body")),
        author=_str(dig(user, "login")),
        author_is_bot=_github_is_bot(user) or _github_is_bot(payload.get("sender")),
        issue_title=_str(dig(payload, "issue", "title")),
        issue_body=_str(dig(payload, "issue", "body")),
    )


def github_label(payload: dict[str, Any]) -> LabelEvent | None:
    if payload.get("action") != "labeled":
        return None
    repo = github_repo(payload)
    number = _int(dig(payload, "issue", "number"))
    name = _str(dig(payload, "label", "name"))
    if repo is None or number is None or not name:
        return None
    sender = payload.get("sender")
    return LabelEvent(
        repo=repo,
        issue_number=number,
        labels_added=(name,),
        author=_str(dig(sender, "login")),
        author_is_bot=_github_is_bot(sender),
        issue_title=_str(dig(payload, "issue", "title")),
        issue_body=_str(dig(payload, "issue", "body")),
    )


def gitlab_repo(payload: dict[str, Any]) -> RepoInfo | None:
    project = payload.get("project")
    path = _str(dig(project, "path_with_namespace"))
    pid = _int(dig(project, "id")) or _int(payload.get("project_id"))
    if not path or pid is None:
        return None
    return RepoInfo(
        provider="gitlab",
        full_name=path,
        clone_url=_str(dig(project, "git_http_url")) or _str(dig(project, "http_url")),
        default_branch=_str(dig(project, "default_branch")) or "main",
        forge_id=str(pid),
    )


def _gitlab_is_bot(user: Any) -> bool:
    username = _str(dig(user, "username"))
    # GitLab project/group access tokens act as `project_<id>_bot_<hash>` users
    return bool(dig(user, "bot")) or (
        username.startswith(("project_", "group_")) and "_bot" in username
    )


def gitlab_note(payload: dict[str, Any]) -> CommentEvent | None:
    attrs = payload.get("object_attributes")
    repo = gitlab_repo(payload)
    if not isinstance(attrs, dict) or repo is None:
        return None
    if attrs.get("action") not in (None, "create"):
        return None  # edits (action=update) are not re-run
    kind = _str(attrs.get("noteable_type"))
    target = (
        payload.get("issue")
        if kind == "Issue"
        else payload.get("merge_request")
        if kind == "MergeRequest"
        else None
    )
    number = _int(dig(target, "iid"))
    note_id = _int(attrs.get("id"))
    if number is None or note_id is None:
        return None
    user = payload.get("user")
    from_fork = kind == "MergeRequest" and _int(dig(target, "source_project_id")) not in (
        None,
        _int(dig(target, "target_project_id")),
    )
    return CommentEvent(
        repo=repo,
        issue_number=number,
        is_pull=kind == "MergeRequest",
        comment_id=note_id,
        body=_str(attrs.get("note")),
        author=_str(dig(user, "username")),
        author_is_bot=_gitlab_is_bot(user),
        issue_title=_str(dig(target, "title")),
        issue_body=_str(dig(target, "description")),
        from_fork=from_fork,
        author_id=_int(dig(user, "id")),
    )


def gitlab_labels(payload: dict[str, Any]) -> LabelEvent | None:
    repo = gitlab_repo(payload)
    attrs = payload.get("object_attributes")
    number = _int(dig(attrs, "iid"))
    previous = dig(payload, "changes", "labels", "previous")
    current = dig(payload, "changes", "labels", "current")
    if dig(attrs, "action") == "open" and not isinstance(current, list):
        # a newly opened issue carries its labels in object_attributes.labels / labels, not in
        # changes.labels: every label it was opened with counts as added
        previous = []
        current = dig(attrs, "labels")
        if not isinstance(current, list):
            current = payload.get("labels")
    if repo is None or number is None or not isinstance(current, list):
        return None
    before = {_str(dig(label, "title")) for label in previous or [] if isinstance(label, dict)}
    added = tuple(
        t
        for t in (_str(dig(label, "title")) for label in current if isinstance(label, dict))
        if t and t not in before
    )
    if not added:
        return None
    user = payload.get("user")
    return LabelEvent(
        repo=repo,
        issue_number=number,
        labels_added=added,
        author=_str(dig(user, "username")),
        author_is_bot=_gitlab_is_bot(user),
        issue_title=_str(dig(attrs, "title")),
        issue_body=_str(dig(attrs, "description")),
    )
