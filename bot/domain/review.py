"""Review feedback on a protocol's PR/MR: which comments count and the fix step they make (pure).

A review (GitHub: all comments of one submitted review; GitLab: the notes that arrive within a
quiet window) becomes ONE fix step appended to the protocol. Its step file carries each
comment's file, line, diff hunk and text; after the fix is pushed the bot answers in each thread
with the commit. Payload shapes: GitHub's `pull_request_review`, `pull_request_review_comment`
and the review-comments API; GitLab's Note Hook (diff notes carry `position`) and its merge
request approval.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from bot.domain.commands import sanitize_prompt_text
from bot.domain.fix_feedback import FeedbackItem
from bot.handlers.forge_events import _int, _str, dig  # the webhook parsers' lenient readers

CommentKind = Literal["line", "review", "comment"]

# What one comment may bring into the prompt; a review of many long comments stays bounded.
MAX_COMMENT_CHARS = 4000
MAX_HUNK_LINES = 30
MAX_COMMENTS_PER_STEP = 50
FIX_SLUG = "review-fix"


@dataclass(frozen=True)
class ReviewComment:
    """One review comment or note, normalised across forges.

    `thread_id` names the thread a reply goes to: GitHub the id of the thread's first comment,
    GitLab the discussion id; "" for a comment with no thread (a review's own text, a PR comment).
    """

    comment_id: int
    author: str
    body: str
    thread_id: str = ""
    path: str = ""
    line: int | None = None
    diff_hunk: str = ""
    url: str = ""
    kind: CommentKind = "line"
    author_is_bot: bool = False
    resolved: bool = False
    review_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReviewComment | None:
        """A stored comment back; None for anything that is not one (a damaged record)."""
        cid = _int(data.get("comment_id"))
        if cid is None:
            return None
        kind = data.get("kind")
        return cls(
            comment_id=cid,
            author=_str(data.get("author")),
            body=_str(data.get("body")),
            thread_id=_str(data.get("thread_id")),
            path=_str(data.get("path")),
            line=_int(data.get("line")),
            diff_hunk=_str(data.get("diff_hunk")),
            url=_str(data.get("url")),
            kind=kind if kind in ("line", "review", "comment") else "comment",
            author_is_bot=bool(data.get("author_is_bot")),
            resolved=bool(data.get("resolved")),
            review_id=_int(data.get("review_id")),
        )


@dataclass(frozen=True)
class ReviewSubmitted:
    """A submitted GitHub review (or a GitLab MR approval: state `approved`)."""

    number: int
    review_id: int
    state: str  # approved | changes_requested | commented | dismissed
    author: str
    author_is_bot: bool
    body: str
    url: str = ""


# -- GitHub ------------------------------------------------------------------------------------


def _github_is_bot(user: Any) -> bool:
    return _str(dig(user, "type")) == "Bot" or _str(dig(user, "login")).endswith("[bot]")


def github_review_comment(comment: Any) -> ReviewComment | None:
    """A line comment from a `pull_request_review_comment` payload or the review-comments API."""
    cid = _int(dig(comment, "id"))
    if cid is None:
        return None
    root = _int(dig(comment, "in_reply_to_id")) or cid
    user = dig(comment, "user")
    line = _int(dig(comment, "line")) or _int(dig(comment, "original_line"))
    return ReviewComment(
        comment_id=cid,
        author=_str(dig(user, "login")),
        body=_str(dig(comment, "body")),
        thread_id=str(root),
        path=_str(dig(comment, "path")),
        line=line,
        diff_hunk=_str(dig(comment, "diff_hunk")),
        url=_str(dig(comment, "html_url")),
        kind="line",
        author_is_bot=_github_is_bot(user),
        review_id=_int(dig(comment, "pull_request_review_id")),
    )


def github_review(payload: Mapping[str, Any]) -> ReviewSubmitted | None:
    """`pull_request_review` `submitted` → the review; None for other actions or a bad payload."""
    if payload.get("action") != "submitted":
        return None
    number = _int(dig(payload, "pull_request", "number"))
    rid = _int(dig(payload, "review", "id"))
    if number is None or rid is None:
        return None
    user = dig(payload, "review", "user")
    return ReviewSubmitted(
        number=number,
        review_id=rid,
        state=_str(dig(payload, "review", "state")).lower(),
        author=_str(dig(user, "login")),
        author_is_bot=_github_is_bot(user) or _github_is_bot(payload.get("sender")),
        body=_str(dig(payload, "review", "body")),
        url=_str(dig(payload, "review", "html_url")),
    )


def review_body_comment(review: ReviewSubmitted) -> ReviewComment | None:
    """The review's own text as a comment of the batch (it has no thread to reply in)."""
    if not review.body.strip():
        return None
    return ReviewComment(
        comment_id=review.review_id, author=review.author, body=review.body, url=review.url,
        kind="review", author_is_bot=review.author_is_bot, review_id=review.review_id,
    )  # fmt: skip


def github_pr_comment(payload: Mapping[str, Any]) -> tuple[int, ReviewComment] | None:
    """An `issue_comment` on a pull request as review feedback (it has no file or line)."""
    if payload.get("action") != "created" or not isinstance(
        dig(payload, "issue", "pull_request"), dict
    ):
        return None
    number = _int(dig(payload, "issue", "number"))
    cid = _int(dig(payload, "comment", "id"))
    if number is None or cid is None:
        return None
    user = dig(payload, "comment", "user")
    comment = ReviewComment(
        comment_id=cid, author=_str(dig(user, "login")), body=_str(dig(payload, "comment", "body")),
        url=_str(dig(payload, "comment", "html_url")), kind="comment",
        author_is_bot=_github_is_bot(user) or _github_is_bot(payload.get("sender")),
    )  # fmt: skip
    return number, comment


def github_review_comment_event(payload: Mapping[str, Any]) -> tuple[int, ReviewComment] | None:
    """`pull_request_review_comment` `created` → (PR number, comment)."""
    if payload.get("action") != "created":
        return None
    number = _int(dig(payload, "pull_request", "number"))
    comment = github_review_comment(payload.get("comment"))
    if number is None or comment is None:
        return None
    if _github_is_bot(payload.get("sender")) and not comment.author_is_bot:
        comment = ReviewComment(**{**comment.to_dict(), "author_is_bot": True})
    return number, comment


# -- GitLab ------------------------------------------------------------------------------------


def _gitlab_is_bot(user: Any) -> bool:
    username = _str(dig(user, "username"))
    return bool(dig(user, "bot")) or (
        username.startswith(("project_", "group_")) and "_bot" in username
    )


def gitlab_mr_note(payload: Mapping[str, Any]) -> tuple[int, ReviewComment] | None:
    """A Note Hook on a merge request → (MR iid, comment); None for other notes and edits.

    A diff note carries `position` (file and line); a note that answers a thread carries its
    `discussion_id`. System notes ("added 1 commit") are never feedback.
    """
    attrs = payload.get("object_attributes")
    if not isinstance(attrs, dict) or attrs.get("noteable_type") != "MergeRequest":
        return None
    if attrs.get("action") not in (None, "create") or attrs.get("system") is True:
        return None
    iid = _int(dig(payload, "merge_request", "iid"))
    nid = _int(attrs.get("id"))
    if iid is None or nid is None:
        return None
    position = attrs.get("position")
    path = _str(dig(position, "new_path")) or _str(dig(position, "old_path"))
    line = _int(dig(position, "new_line")) or _int(dig(position, "old_line"))
    user = payload.get("user")
    resolved = bool(attrs.get("resolved")) or bool(attrs.get("resolved_at"))
    comment = ReviewComment(
        comment_id=nid,
        author=_str(dig(user, "username")),
        body=_str(attrs.get("note")),
        thread_id=_str(attrs.get("discussion_id")),
        path=path,
        line=line,
        diff_hunk=_str(dig(attrs, "st_diff", "diff")),
        url=_str(attrs.get("url")),
        kind="line" if path else "comment",
        author_is_bot=_gitlab_is_bot(user),
        resolved=resolved,
    )
    return iid, comment


def gitlab_note_type(payload: Mapping[str, Any]) -> str:
    """`DiffNote` (on a line), `DiscussionNote` (a thread), or "" (a plain comment)."""
    return _str(dig(payload, "object_attributes", "type"))


def is_feedback(comment: ReviewComment, *, note_type: str = "", mentioned: bool = False) -> bool:
    """Whether a comment on the PR/MR is meant for the agent.

    Line comments and thread notes of a review are; a plain PR/MR comment only when it
    mentions the bot (people also talk to each other there).
    """
    if comment.kind in ("line", "review"):
        return True
    if note_type in ("DiffNote", "DiscussionNote"):
        return True
    return mentioned


def gitlab_approval(payload: Mapping[str, Any]) -> ReviewSubmitted | None:
    """A Merge Request Hook with action `approved` (the MR is approved) or `approval` (one of
    several approvals it needs) → an approving review by its user."""
    attrs = payload.get("object_attributes")
    if not isinstance(attrs, dict) or attrs.get("action") not in ("approved", "approval"):
        return None
    iid = _int(attrs.get("iid"))
    if iid is None:
        return None
    user = payload.get("user")
    return ReviewSubmitted(
        number=iid, review_id=_int(attrs.get("id")) or 0, state="approved",
        author=_str(dig(user, "username")), author_is_bot=_gitlab_is_bot(user), body="",
    )  # fmt: skip


# -- which comments count ----------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    kept: tuple[ReviewComment, ...]
    dropped: tuple[tuple[int, str], ...]  # (comment id, why)


def select_comments(
    comments: Iterable[ReviewComment],
    *,
    writers: Mapping[str, bool],
    resolved_threads: Iterable[str] = (),
    handled: Iterable[int] = (),
) -> Selection:
    """The comments that drive a fix step, in order, each once; and why the others do not.

    `writers` says for each author whether they hold write / Developer access (asked of the
    forge by the caller); an author missing from it does not count. Threads the bot resolved
    and comments an earlier fix step took are left out, as is anything a bot wrote.
    """
    resolved = set(resolved_threads)
    done = set(handled)
    kept: list[ReviewComment] = []
    dropped: list[tuple[int, str]] = []
    seen: set[int] = set()
    for c in comments:
        why = None
        if c.comment_id in seen or c.comment_id in done:
            why = "already taken"
        elif c.author_is_bot:
            why = "written by a bot"
        elif not writers.get(c.author.casefold(), False):
            why = "author lacks write access"
        elif c.resolved or (c.thread_id and c.thread_id in resolved):
            why = "thread resolved"
        elif not c.body.strip():
            why = "empty"
        if why is not None:
            dropped.append((c.comment_id, why))
            continue
        seen.add(c.comment_id)
        kept.append(c)
    kept.sort(key=lambda c: (c.kind != "review", c.path, c.line or 0, c.comment_id))
    return Selection(tuple(kept[:MAX_COMMENTS_PER_STEP]), tuple(dropped))


# -- the fix step ------------------------------------------------------------------------------

_HUNK_RE = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")


def hunk_for_line(diff: str, line: int | None) -> str:
    """The hunk of a one-file unified diff that holds new-side `line` (else the first one),
    clipped to MAX_HUNK_LINES around the line. GitLab's diff notes carry no hunk: the bot takes
    it from `git diff` of the branch."""
    hunks: list[tuple[int, int, list[str]]] = []
    for raw in diff.splitlines():
        m = _HUNK_RE.match(raw)
        if m:
            hunks.append((int(m.group(1)), int(m.group(2) or "1"), [raw]))
        elif hunks:
            hunks[-1][2].append(raw)
    if not hunks:
        return ""
    chosen = hunks[0]
    if line is not None:
        chosen = next((h for h in hunks if h[0] <= line < h[0] + max(h[1], 1)), chosen)
    start, _, lines = chosen
    if len(lines) <= MAX_HUNK_LINES:
        return "\n".join(lines)
    # keep the header and the lines around the commented one
    at = 1
    new_line = start
    for i, text in enumerate(lines[1:], 1):
        if line is not None and new_line >= line:
            at = i
            break
        if not text.startswith("-"):
            new_line += 1
    lo = max(1, at - MAX_HUNK_LINES // 2)
    return "\n".join([lines[0], *lines[lo : lo + MAX_HUNK_LINES - 1]])


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _where(c: ReviewComment) -> str:
    if c.kind == "review":
        return "the review as a whole"
    if not c.path:
        return "the pull request as a whole"
    return f"`{c.path}` line {c.line}" if c.line else f"`{c.path}`"


def review_items(comments: Iterable[ReviewComment]) -> str:
    """The review comments as a Markdown list: file, line, diff hunk and text of each.

    Kept apart from the step file's frame so the execute prompt can show the same list as its
    own section if it wants to.
    """
    parts: list[str] = []
    for n, c in enumerate(comments, 1):
        text = sanitize_prompt_text(c.body, MAX_COMMENT_CHARS).strip()
        block = [f"### Comment {n}: {_where(c)} (by @{c.author})", ""]
        if c.diff_hunk:
            hunk = c.diff_hunk.strip("\n")
            fence = _fence(hunk)
            block += ["Diff hunk:", "", f"{fence}diff", hunk, fence, ""]
        fence = _fence(text)
        block += ["Comment:", "", f"{fence}text", text, fence]
        parts.append("\n".join(block))
    return "\n\n".join(parts)


def review_feedback(comments: Iterable[ReviewComment]) -> FeedbackItem:
    """The comments as a typed feedback item (bot/domain/fix_feedback.py): kept on the step, so
    every attempt of the fix step (an automatic one, a `/retry`) has them in its prompt even when an
    earlier attempt rewrote the step file."""
    items = list(comments)
    authors = ", ".join(sorted({f"@{c.author}" for c in items}))
    noun = "comment" if len(items) == 1 else "comments"
    return FeedbackItem(
        "review", f"{len(items)} {noun} from {authors}", review_items(items),
        {"comments": [c.comment_id for c in items]},
    )  # fmt: skip


def fix_step_title(count: int, review_id: int | None = None) -> str:
    noun = "comment" if count == 1 else "comments"
    return f"Address review feedback ({count} {noun})"


def fix_step_markdown(
    comments: Iterable[ReviewComment], step_index: int, forge: str = "github"
) -> str:
    """The step file of a review fix step."""
    items = list(comments)
    what = "merge request" if forge == "gitlab" else "pull request"
    return (
        f"# {fix_step_title(len(items))}\n\n"
        f"Reviewers of this {what} asked for changes. Address each comment below in the code: "
        "make the change it asks for, or, where a comment is mistaken, leave the code as it is "
        "and say why in the Notes section. Keep the rest of the work as it is.\n\n"
        "The file and line of a comment refer to the branch as it was when the comment was "
        "written; the diff hunk shows the code the reviewer saw.\n\n"
        "## Review comments\n\n"
        f"{review_items(items)}\n\n"
        "## Notes\n\n"
    )


def reply_body(sha: str, step_index: int, url: str | None = None) -> str:
    """What the bot answers in a thread once the fix is pushed."""
    commit = f"[`{sha[:12]}`]({url})" if url else f"`{sha[:12]}`"
    return f"Addressed in {commit} (step {step_index:02d}, the fix for this review)."


def unthreaded_reply(comments: Iterable[ReviewComment], sha: str, step_index: int) -> str | None:
    """One PR/MR comment for the feedback that has no thread to answer in (a review's own text,
    a comment that mentioned the bot), or None when every comment had its thread."""
    loose = [c for c in comments if not c.thread_id and c.kind != "line"]
    if not loose:
        return None
    items = ", ".join(
        f"the review of @{c.author}" if c.kind == "review" else f"the comment of @{c.author}"
        for c in loose
    )
    return f"{reply_body(sha, step_index)[:-1]}: {items}."


def threads_to_answer(comments: Iterable[ReviewComment]) -> list[tuple[str, int]]:
    """(thread id, a comment id in it) once per thread with a place to reply, in order."""
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    for c in comments:
        if c.kind != "line" and not c.thread_id:
            continue
        key = c.thread_id or str(c.comment_id)
        if key in seen:
            continue
        seen.add(key)
        out.append((key, c.comment_id))
    return out
