"""A hand-written fake of the slice of the GitHub REST API the bot uses; it records every request.

The same object answers under respx (tests) and behind a tiny starlette app on 127.0.0.1 (bench).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx

APP_ID = 4242
APP_SLUG = "deksdenflow"
BOT_LOGIN = f"{APP_SLUG}[bot]"
INSTALLATION_ID = 77
OWNER = "Codertocat"
REPO = "Hello-World"
FULL_NAME = f"{OWNER}/{REPO}"
# where GitHub's job-log redirect points: pre-signed storage on another host
LOG_HOST = "results-receiver.actions.githubusercontent.com"


@dataclass
class Call:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    token: str | None
    at: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.path)


Answer = tuple[int, dict[str, str], Any]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeGitHub:
    """State (comments, pulls, check runs) plus scripted failures; thread-safe recording."""

    def __init__(
        self, clone_url: str, *, default_branch: str = "main", has_workflows: bool = True
    ) -> None:
        self.clone_url = clone_url
        self.default_branch = default_branch
        self.has_workflows = has_workflows
        self.calls: list[Call] = []
        self.permissions: dict[str, str] = {}
        self.comments: dict[int, dict[str, Any]] = {}
        self.pulls: dict[int, dict[str, Any]] = {}
        self.check_runs: dict[int, dict[str, Any]] = {}
        self.check_suites: list[dict[str, Any]] = []
        # check run id -> its annotations; Actions job id (= its check run's id) -> its log text
        self.annotations: dict[int, list[dict[str, Any]]] = {}
        self.job_logs: dict[int, str] = {}
        # each job-log download from LOG_HOST: (path, the Authorization header it carried)
        self.log_downloads: list[tuple[str, str | None]] = []
        # review comments per review id (GET …/reviews/{id}/comments) and the bot's thread replies
        self.review_comments: dict[int, list[dict[str, Any]]] = {}
        self.review_replies: list[dict[str, Any]] = []
        self.review_states: dict[int, str] = {}  # review id → its state, as the API spells it
        self.resolved_threads: set[str] = set()  # GraphQL node ids of resolved review threads
        self.valid_tokens: set[str] = set()
        # installation tokens live `token_ttl` seconds on `clock` (a test may set both)
        self.clock: Callable[[], float] = time.time
        self.token_ttl: float = 3600.0
        self.token_expiry: dict[str, float] = {}
        self.failures: list[tuple[str, re.Pattern[str], Answer]] = []
        self.on_call: Callable[[Call], None] | None = None
        self._ids = itertools.count(1001)
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    # -- scripting -------------------------------------------------------------------------

    def fail_next(
        self, method: str, path_regex: str, status: int, body: Any = None, **headers: str
    ) -> None:
        """The next request matching (method, path regex) gets this answer instead (once)."""
        self.failures.append(
            (method, re.compile(path_regex), (status, headers, body or {"message": "fake"}))
        )

    def token_valid(self, token: str) -> bool:
        """Handed out by us, not expired on our clock, not revoked by expire_tokens()."""
        return token in self.valid_tokens and self.clock() < self.token_expiry.get(
            token, float("inf")
        )

    def expire_tokens(self) -> None:
        """Every token handed out so far answers 401 from now on (as if it had expired)."""
        self.valid_tokens.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Call]:
        return [
            c
            for c in list(self.calls)
            if (method is None or c.method == method)
            and (path is None or re.fullmatch(path, c.path))
        ]

    def since(self, mark: int) -> list[Call]:
        return list(self.calls)[mark:]

    def mark(self) -> int:
        return len(self.calls)

    # -- the HTTP edge ---------------------------------------------------------------------

    def respx_handler(self, request: httpx.Request) -> httpx.Response:
        status, headers, body = self.handle(
            request.method,
            request.url.raw_path.decode(),
            request.headers.get("authorization"),
            request.content,
        )
        return httpx.Response(status, headers=headers, json=body)

    def log_handler(self, request: httpx.Request) -> httpx.Response:
        """LOG_HOST: the pre-signed log URL a job-log request redirects to (plain text)."""
        path = request.url.path
        with self._lock:
            self.log_downloads.append((path, request.headers.get("authorization")))
        m = re.fullmatch(r"/job-logs/(\d+)", path)
        if (
            not m
            or request.url.params.get("sig") != "fake-signature"
            or int(m.group(1)) not in self.job_logs
        ):
            return httpx.Response(403, text="AuthenticationFailed")
        return httpx.Response(
            200, text=self.job_logs[int(m.group(1))], headers={"content-type": "text/plain"}
        )

    def handle(
        self, method: str, raw_path: str, authorization: str | None, content: bytes
    ) -> Answer:
        split = urlsplit(raw_path)
        path = split.path
        query = dict(parse_qsl(split.query))
        body = json.loads(content) if content else None
        token = None
        if authorization and authorization.lower().startswith("token "):
            token = authorization.split(" ", 1)[1]
        call = Call(method, path, query, body, token)
        with self._lock:
            self.calls.append(call)
            if self.on_call is not None:
                self.on_call(call)
            for i, (m, pattern, answer) in enumerate(self.failures):
                if m == method and pattern.fullmatch(path):
                    del self.failures[i]
                    return answer
            return self._answer(call, authorization)

    def _answer(self, call: Call, authorization: str | None) -> Answer:
        method, path, body = call.method, call.path, call.body
        m = re.fullmatch(r"/app/installations/(\d+)/access_tokens", path)
        if m and method == "POST":
            if not (authorization or "").lower().startswith("bearer "):
                return 401, {}, {"message": "A JSON web token could not be decoded"}
            token = f"ghs_fake{next(self._tokens):04d}"
            self.valid_tokens.add(token)
            self.token_expiry[token] = self.clock() + self.token_ttl
            return 201, {}, {"token": token, "expires_at": _iso(self.token_expiry[token])}
        if path == "/app" and method == "GET":
            return 200, {}, {"id": APP_ID, "slug": APP_SLUG}
        if call.token is None or not self.token_valid(call.token):
            return 401, {}, {"message": "Bad credentials"}
        if path == "/graphql" and method == "POST":
            return self._graphql(body)
        repo = f"/repos/{OWNER}/{REPO}"
        if not path.startswith(repo):
            return 404, {}, {"message": "Not Found"}
        rest = path[len(repo) :]
        for route in (self._repo_meta, self._issues, self._pulls, self._checks):
            answer = route(call, rest)
            if answer is not None:
                return answer
        return 404, {}, {"message": f"fake GitHub has no {method} {path}"}

    def _repo_meta(self, call: Call, rest: str) -> Answer | None:
        """The repository itself, its workflows and a user's permission on it."""
        method = call.method
        if rest == "" and method == "GET":
            return (
                200,
                {},
                {
                    "full_name": FULL_NAME,
                    "default_branch": self.default_branch,
                    "clone_url": self.clone_url,
                },
            )
        if rest == "/contents/.github/workflows" and method == "GET":
            if self.has_workflows:
                return (
                    200,
                    {},
                    [{"name": "ci.yml", "path": ".github/workflows/ci.yml", "type": "file"}],
                )
            return 404, {}, {"message": "Not Found"}
        m = re.fullmatch(r"/collaborators/([^/]+)/permission", rest)
        if m and method == "GET":
            perm = self.permissions.get(m.group(1), "write")
            if perm == "404":
                return 404, {}, {"message": "Not Found"}
            return 200, {}, {"permission": perm, "user": {"login": m.group(1)}}
        return None

    def _issues(self, call: Call, rest: str) -> Answer | None:
        """Issue comments and their reactions."""
        method, body = call.method, call.body
        m = re.fullmatch(r"/issues/comments/(\d+)/reactions", rest)
        if m and method == "POST":
            return 201, {}, {"id": next(self._ids), "content": body["content"]}
        m = re.fullmatch(r"/issues/(\d+)/comments", rest)
        if m and method == "GET":
            number = int(m.group(1))
            return 200, {}, [c for c in self.comments.values() if c["issue"] == number]
        if m and method == "POST":
            cid = next(self._ids)
            self.comments[cid] = {
                "id": cid,
                "issue": int(m.group(1)),
                "body": body["body"],
                "user": {"login": BOT_LOGIN, "type": "Bot"},
                "performed_via_github_app": {"id": APP_ID, "slug": APP_SLUG},
            }
            return 201, {}, self.comments[cid]
        m = re.fullmatch(r"/issues/comments/(\d+)", rest)
        if m and method == "PATCH":
            cid = int(m.group(1))
            if cid not in self.comments:
                return 404, {}, {"message": "Not Found"}
            self.comments[cid]["body"] = body["body"]
            return 200, {}, self.comments[cid]
        return None

    def _pulls(self, call: Call, rest: str) -> Answer | None:
        """Pull requests, their reviews, review comments and replies."""
        method, body = call.method, call.body
        if rest == "/pulls" and method == "GET":
            head = call.query.get("head", "").split(":", 1)[-1]
            return (
                200,
                {},
                [
                    p
                    for p in self.pulls.values()
                    if p["head"]["ref"] == head and p["state"] == "open"
                ],
            )
        if rest == "/pulls" and method == "POST":
            number = 100 + len(self.pulls) + 1
            self.pulls[number] = {
                "number": number,
                "node_id": f"PR_fake{number}",
                "html_url": f"https://github.com/{FULL_NAME}/pull/{number}",
                "head": {"ref": body["head"], "repo": {"full_name": FULL_NAME}},
                "base": {"ref": body["base"], "repo": {"full_name": FULL_NAME}},
                "draft": body.get("draft"),
                "state": "open",
                "title": body["title"],
                "body": body["body"],
            }
            return 201, {}, self.pulls[number]
        m = re.fullmatch(r"/pulls/(\d+)/reviews/(\d+)/comments", rest)
        if m and method == "GET":
            return 200, {}, self.review_comments.get(int(m.group(2)), [])
        m = re.fullmatch(r"/pulls/(\d+)/reviews/(\d+)", rest)
        if m and method == "GET":
            rid = int(m.group(2))
            if rid not in self.review_states:
                return 404, {}, {"message": "Not Found"}
            return 200, {}, {"id": rid, "state": self.review_states[rid]}
        m = re.fullmatch(r"/pulls/(\d+)/comments/(\d+)/replies", rest)
        if m and method == "POST":
            reply = {
                "id": next(self._ids),
                "pull": int(m.group(1)),
                "in_reply_to_id": int(m.group(2)),
                "body": body["body"],
            }
            self.review_replies.append(reply)
            return 201, {}, reply
        m = re.fullmatch(r"/pulls/(\d+)", rest)
        if m and method == "GET":
            pull = self.pulls.get(int(m.group(1)))
            return (200, {}, pull) if pull is not None else (404, {}, {"message": "Not Found"})
        return None

    def _checks(self, call: Call, rest: str) -> Answer | None:
        """Check runs and suites, their annotations, and the job logs' redirect."""
        method, body = call.method, call.body
        m = re.fullmatch(r"/commits/([0-9a-f]+)/check-runs", rest)
        if m and method == "GET":
            sha = m.group(1)
            runs = [
                r
                for r in self.check_runs.values()
                if r["head_sha"] == sha and r["name"] == call.query.get("check_name", r["name"])
            ]
            return 200, {}, {"total_count": len(runs), "check_runs": runs}
        if rest == "/check-runs" and method == "POST":
            rid = next(self._ids)
            self.check_runs[rid] = {**body, "id": rid, "app": {"id": APP_ID, "slug": APP_SLUG}}
            return 201, {}, self.check_runs[rid]
        m = re.fullmatch(r"/check-runs/(\d+)", rest)
        if m and method == "PATCH":
            rid = int(m.group(1))
            self.check_runs[rid].update(body)
            return 200, {}, self.check_runs[rid]
        m = re.fullmatch(r"/check-runs/(\d+)/annotations", rest)
        if m and method == "GET":
            return 200, {}, self.annotations.get(int(m.group(1)), [])
        m = re.fullmatch(r"/actions/jobs/(\d+)/logs", rest)
        if m and method == "GET":
            if int(m.group(1)) not in self.job_logs:
                return 404, {}, {"message": "Not Found"}
            location = f"https://{LOG_HOST}/job-logs/{m.group(1)}?sig=fake-signature"
            return 302, {"location": location}, {}
        m = re.fullmatch(r"/commits/([0-9a-f]+)/check-suites", rest)
        if m and method == "GET":
            return (
                200,
                {},
                {"total_count": len(self.check_suites), "check_suites": self.check_suites},
            )
        return None

    def _graphql(self, body: Any) -> Answer:
        """The requests the bot sends: markPullRequestReadyForReview by the PR's node id, a PR's
        reviewThreads (threads made of the review comments and the replies), resolveReviewThread."""
        query = str((body or {}).get("query", ""))
        variables = (body or {}).get("variables") or {}
        if "reviewThreads" in query:
            return self._review_threads(int(variables.get("number", 0)))
        if "resolveReviewThread" in query:
            thread = str(variables.get("id"))
            if thread not in {t["id"] for t in self._threads()}:
                return (
                    200,
                    {},
                    {
                        "data": None,
                        "errors": [{"type": "NOT_FOUND", "message": f"no thread {thread}"}],
                    },
                )
            self.resolved_threads.add(thread)
            return (
                200,
                {},
                {"data": {"resolveReviewThread": {"thread": {"id": thread, "isResolved": True}}}},
            )
        node = variables.get("id")
        pull = next((p for p in self.pulls.values() if p.get("node_id") == node), None)
        if "markPullRequestReadyForReview" not in query or pull is None:
            return 200, {}, {"errors": [{"message": f"fake GraphQL cannot answer {query[:60]!r}"}]}
        pull["draft"] = False
        return (
            200,
            {},
            {"data": {"markPullRequestReadyForReview": {"pullRequest": {"isDraft": False}}}},
        )

    def _threads(self) -> list[dict[str, Any]]:
        """One thread per review comment that answers none; replies join their thread."""
        roots: dict[int, list[dict[str, Any]]] = {}
        for comments in self.review_comments.values():
            for c in comments:
                node = {"databaseId": int(c["id"]), "body": c.get("body", "")}
                roots.setdefault(int(c.get("in_reply_to_id") or c["id"]), []).append(node)
        for reply in self.review_replies:
            root = reply["in_reply_to_id"]
            roots.setdefault(root, [{"databaseId": root, "body": ""}])
            roots[root].append({"databaseId": reply["id"], "body": reply["body"]})
        return [
            {"id": f"PRRT_fake{root}", "isResolved": f"PRRT_fake{root}" in self.resolved_threads,
             "comments": {"nodes": nodes}}
            for root, nodes in roots.items()
        ]  # fmt: skip

    def _review_threads(self, number: int) -> Answer:
        if number not in self.pulls:
            return (
                200,
                {},
                {"data": {"repository": {"pullRequest": None}}, "errors": [{"type": "NOT_FOUND"}]},
            )
        threads = {"nodes": self._threads()}
        return 200, {}, {"data": {"repository": {"pullRequest": {"reviewThreads": threads}}}}


def basic_token(header_line: str) -> str:
    """The token inside a git `Authorization: Basic …` header line."""
    raw = base64.b64decode(header_line.split("Basic ", 1)[1]).decode()
    return raw.split(":", 1)[1]
