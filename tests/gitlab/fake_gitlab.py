"""A small in-memory GitLab served over real HTTP on 127.0.0.1, recording every request."""

from __future__ import annotations

import base64
import fnmatch
import itertools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

API_PREFIX = "/api/v4"
DEFAULT_TOKEN = "glpat-fake-token-0123456789"
BOT_USERNAME = "deksdenflow-bot"

# Access levels as GitLab numbers them.
GUEST, REPORTER, DEVELOPER, MAINTAINER, OWNER = 10, 20, 30, 40, 50

_DRAFT = re.compile(r"^\s*(\[draft\]|\(draft\)|draft:|draft\s*-)", re.IGNORECASE)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it; `path` is relative to /api/v4 and still URL-encoded."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    status: int = 0  # filled in when the answer is known

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)


@dataclass
class Failure:
    """Answer the next `times` requests matching `pattern` (fnmatch on the API path) with
    `status`."""

    pattern: str
    times: int
    status: int
    headers: dict[str, str]
    body: Any
    method: str | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.times <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        return fnmatch.fnmatchcase(path, self.pattern) or fnmatch.fnmatchcase(
            unquote(path), self.pattern
        )


@dataclass
class FakeGitLabState:
    """Everything the fake knows; tests may read and edit it directly."""

    users: dict[int, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    groups: dict[int, dict[str, Any]] = field(default_factory=dict)
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    # project id -> user id -> access level (direct project membership)
    project_members: dict[int, dict[int, int]] = field(default_factory=dict)
    # group id -> user id -> access level
    group_members: dict[int, dict[int, int]] = field(default_factory=dict)
    issues: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    merge_requests: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    # (project id, "issues"|"merge_requests", iid) -> notes in creation order
    notes: dict[tuple[int, str, int], list[dict[str, Any]]] = field(default_factory=dict)
    award_emoji: list[dict[str, Any]] = field(default_factory=list)
    commits: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    pipelines: dict[int, dict[str, Any]] = field(default_factory=dict)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    hooks: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # (project id, ref, file path) -> content
    files: dict[tuple[int, str, str], str] = field(default_factory=dict)
    # group id -> hooks (group webhooks serve every project below the group)
    group_hooks: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # token -> what GET /personal_access_tokens/self answers (default: active, api scope)
    token_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    # job id -> job (id, name, stage, status, pipeline_id, project_id, allow_failure); its trace
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    traces: dict[int, str] = field(default_factory=dict)
    # (project id, MR iid, discussion id) -> whether the discussion is resolved
    discussions: dict[tuple[int, int, str], bool] = field(default_factory=dict)


class RawText(str):
    """A route's answer sent as text/plain (a job trace), not as JSON."""


class ApiError(Exception):
    """Raised inside a route to answer with GitLab's error shape."""

    def __init__(self, status: int, message: Any) -> None:
        super().__init__(str(message))
        self.status = status
        self.message = message


Route = Callable[["_Call"], Any]


@dataclass
class _Call:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: Any
    user: dict[str, Any]


class FakeGitLab:
    """The fake server. Use as a context manager (or start()/stop()); `.url` is the base URL."""

    def __init__(self, *, token: str = DEFAULT_TOKEN, bot_username: str = BOT_USERNAME) -> None:
        self.state = FakeGitLabState()
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []  # exceptions raised by routes: bugs in the fake
        self.token = token
        self._failures: list[Failure] = []
        self._delays: list[Failure] = []  # body holds the delay in seconds
        self._lock = threading.RLock()
        self._ids = itertools.count(1000)
        self._routes = self._build_routes()
        self.bot = self.add_user(bot_username, token=token, bot=True)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("fake GitLab is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeGitLab:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits up to one interval, once per test.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-gitlab",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeGitLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- failure injection and recording -------------------------------------------------------

    def fail(
        self,
        pattern: str,
        *,
        times: int = 1,
        status: int = 429,
        retry_after: int | str | None = None,
        headers: dict[str, str] | None = None,
        body: Any = None,
        method: str | None = None,
    ) -> Failure:
        """Answer the next `times` requests whose API path matches `pattern` with `status`.

        `pattern` is an fnmatch pattern on the path after /api/v4, e.g. "/projects/1/statuses/*".
        """
        all_headers = dict(headers or {})
        if retry_after is not None:
            all_headers["Retry-After"] = str(retry_after)
        failure = Failure(
            pattern=pattern,
            times=times,
            status=status,
            headers=all_headers,
            body=body if body is not None else {"message": f"{status} injected failure"},
            method=method.upper() if method else None,
        )
        with self._lock:
            self._failures.append(failure)
        return failure

    def slow(
        self, pattern: str, seconds: float, *, times: int = 1, method: str | None = None
    ) -> None:
        """Answer the next `times` matching requests normally, but only after `seconds`."""
        with self._lock:
            self._delays.append(
                Failure(pattern, times, 0, {}, seconds, method.upper() if method else None)
            )

    def requests_to(
        self, method: str | None = None, path: str | None = None
    ) -> list[RecordedRequest]:
        """Recorded requests filtered by method and fnmatch path pattern."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method.upper())
                and (path is None or fnmatch.fnmatchcase(r.path, path))
            ]

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request so far, in order."""
        with self._lock:
            return [(r.method, r.path) for r in self.requests]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- state helpers -------------------------------------------------------------------------

    def _next_id(self) -> int:
        return next(self._ids)

    def add_user(
        self, username: str, *, token: str | None = None, state: str = "active", bot: bool = False
    ) -> dict[str, Any]:
        with self._lock:
            user: dict[str, Any] = {
                "id": self._next_id(),
                "username": username,
                "name": username.replace("-", " ").title(),
                "state": state,
                "bot": bot,
                "web_url": f"https://gitlab.example.com/{username}",
            }
            self.state.users[user["id"]] = user
            if token is not None:
                self.state.tokens[token] = user["id"]
            return user

    def add_group(self, full_path: str, *, parent_id: int | None = None) -> dict[str, Any]:
        with self._lock:
            group: dict[str, Any] = {
                "id": self._next_id(),
                "full_path": full_path,
                "parent_id": parent_id,
            }
            self.state.groups[group["id"]] = group
            self.state.group_members[group["id"]] = {}
            return group

    def add_group_member(self, group: dict[str, Any], user: dict[str, Any], level: int) -> None:
        with self._lock:
            self.state.group_members[group["id"]][user["id"]] = level

    def add_project(
        self,
        path_with_namespace: str,
        *,
        group: dict[str, Any] | None = None,
        default_branch: str = "main",
        project_id: int | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            pid = project_id if project_id is not None else self._next_id()
            project = {
                "id": pid,
                "path_with_namespace": path_with_namespace,
                "name": path_with_namespace.rsplit("/", 1)[-1],
                "default_branch": default_branch,
                "http_url_to_repo": f"https://gitlab.example.com/{path_with_namespace}.git",
                "web_url": f"https://gitlab.example.com/{path_with_namespace}",
                "namespace_id": group["id"] if group else None,
            }
            self.state.projects[pid] = project
            self.state.project_members[pid] = {}
            self.state.hooks[pid] = []
            return project

    def add_member(self, project: dict[str, Any], user: dict[str, Any], level: int) -> None:
        with self._lock:
            self.state.project_members[project["id"]][user["id"]] = level

    def add_issue(
        self,
        project: dict[str, Any],
        *,
        title: str = "An issue",
        author: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            pid = project["id"]
            iid = 1 + max((i for (p, i) in self.state.issues if p == pid), default=0)
            issue = {
                "id": self._next_id(),
                "iid": iid,
                "project_id": pid,
                "title": title,
                "state": "opened",
                "author": _user_ref(author or self.bot),
                "web_url": f"{project['web_url']}/-/issues/{iid}",
            }
            self.state.issues[(pid, iid)] = issue
            return issue

    def add_merge_request(
        self,
        project: dict[str, Any],
        *,
        source_branch: str,
        target_branch: str = "main",
        title: str = "A merge request",
        description: str = "",
        state: str = "opened",
        source_project_id: int | None = None,
        author: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            return self._create_mr(
                project,
                {
                    "source_branch": source_branch,
                    "target_branch": target_branch,
                    "title": title,
                    "description": description,
                },
                author or self.bot,
                state=state,
                source_project_id=source_project_id,
            )

    def add_note(
        self,
        project: dict[str, Any],
        noteable: str,
        iid: int,
        body: str,
        *,
        author: dict[str, Any] | None = None,
        system: bool = False,
    ) -> dict[str, Any]:
        """`noteable` is "issues" or "merge_requests"."""
        with self._lock:
            return self._create_note(project["id"], noteable, iid, body, author or self.bot, system)

    def add_commit(self, project: dict[str, Any], sha: str) -> dict[str, Any]:
        with self._lock:
            commit = {"id": sha, "short_id": sha[:8], "title": "commit", "last_pipeline": None}
            self.state.commits[(project["id"], sha)] = commit
            return commit

    def add_pipeline(
        self,
        project: dict[str, Any],
        sha: str,
        *,
        ref: str = "main",
        status: str = "running",
        source: str = "push",
    ) -> dict[str, Any]:
        with self._lock:
            return self._create_pipeline(project["id"], sha, ref, status, source)

    def add_file(
        self, project: dict[str, Any], ref: str, file_path: str, content: str = ""
    ) -> None:
        with self._lock:
            self.state.files[(project["id"], ref, file_path)] = content

    def notes_of(self, project: dict[str, Any], noteable: str, iid: int) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.state.notes.get((project["id"], noteable, iid), []))

    # -- internals shared by helpers and routes ------------------------------------------------

    def _create_note(
        self, pid: int, noteable: str, iid: int, body: str, author: dict[str, Any], system: bool
    ) -> dict[str, Any]:
        note = {
            "id": self._next_id(),
            "body": body,
            "author": _user_ref(author),
            "system": system,
            "noteable_iid": iid,
            "noteable_type": "Issue" if noteable == "issues" else "MergeRequest",
            "created_at": "2026-01-01T00:00:00Z",
        }
        self.state.notes.setdefault((pid, noteable, iid), []).append(note)
        return note

    def _create_mr(
        self,
        project: dict[str, Any],
        data: dict[str, Any],
        author: dict[str, Any],
        *,
        state: str = "opened",
        source_project_id: int | None = None,
    ) -> dict[str, Any]:
        pid = project["id"]
        iid = 1 + max((i for (p, i) in self.state.merge_requests if p == pid), default=0)
        title = str(data["title"])
        mr = {
            "id": self._next_id(),
            "iid": iid,
            "project_id": pid,
            "title": title,
            "description": data.get("description") or "",
            "state": state,
            "draft": bool(_DRAFT.match(title)),
            "work_in_progress": bool(_DRAFT.match(title)),
            "source_branch": data["source_branch"],
            "target_branch": data["target_branch"],
            "source_project_id": source_project_id if source_project_id is not None else pid,
            "target_project_id": pid,
            "author": _user_ref(author),
            "web_url": f"{project['web_url']}/-/merge_requests/{iid}",
        }
        self.state.merge_requests[(pid, iid)] = mr
        return mr

    def _create_pipeline(
        self, pid: int, sha: str, ref: str, status: str, source: str
    ) -> dict[str, Any]:
        pipeline: dict[str, Any] = {
            "id": self._next_id(),
            "project_id": pid,
            "sha": sha,
            "ref": ref,
            "status": status,
            "source": source,
        }
        self.state.pipelines[pipeline["id"]] = pipeline
        commit = self.state.commits.get((pid, sha))
        if commit is None:
            commit = {"id": sha, "short_id": sha[:8], "title": "commit", "last_pipeline": None}
            self.state.commits[(pid, sha)] = commit
        commit["last_pipeline"] = dict(pipeline)
        return pipeline

    def _project(self, raw_id: str) -> dict[str, Any]:
        key = unquote(raw_id)
        if key.isdigit() and int(key) in self.state.projects:
            return self.state.projects[int(key)]
        for project in self.state.projects.values():
            if project["path_with_namespace"] == key:
                return project
        raise ApiError(404, "404 Project Not Found")

    def _effective_level(self, project: dict[str, Any], user_id: int) -> int | None:
        """The highest of direct and inherited (ancestor group) membership, as members/all."""
        levels = []
        direct = self.state.project_members[project["id"]].get(user_id)
        if direct is not None:
            levels.append(direct)
        group_id = project.get("namespace_id")
        while group_id is not None:
            level = self.state.group_members.get(group_id, {}).get(user_id)
            if level is not None:
                levels.append(level)
            group_id = self.state.groups[group_id]["parent_id"]
        return max(levels) if levels else None

    # -- dispatch ------------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes
    ) -> tuple[int, dict[str, str], Any]:
        """Route one request; returns (status, headers, JSON body or None)."""
        parts = urlsplit(raw_path)
        path = parts.path[len(API_PREFIX) :] if parts.path.startswith(API_PREFIX) else parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        body: Any = None
        if raw_body:
            try:
                body = json.loads(raw_body)
            except ValueError:
                body = raw_body.decode("utf-8", "replace")
        delay = self._take_delay(method, path)
        if delay:
            time.sleep(delay)  # outside the lock: other requests keep being served
        with self._lock:
            index = len(self.requests)
            self.requests.append(RecordedRequest(method, path, query, headers, body))
            status, out_headers, out = self._dispatch(method, path, query, headers, body)
            recorded = self.requests[index]
            self.requests[index] = RecordedRequest(
                recorded.method,
                recorded.path,
                recorded.query,
                recorded.headers,
                recorded.json,
                status,
            )
        return status, out_headers, out

    def _take_delay(self, method: str, path: str) -> float:
        with self._lock:
            for delay in self._delays:
                if delay.matches(method, path):
                    delay.times -= 1
                    return float(delay.body)
        return 0.0

    def _dispatch(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, dict[str, str], Any]:
        for failure in self._failures:
            if failure.matches(method, path):
                failure.times -= 1
                return failure.status, dict(failure.headers), failure.body
        if not parts_ok(path):
            return 404, {}, {"error": "404 Not Found"}
        token = next((v for k, v in headers.items() if k.lower() == "private-token"), None)
        user_id = self.state.tokens.get(token or "")
        if user_id is None:
            return 401, {}, {"message": "401 Unauthorized"}
        lookup = "GET" if method == "HEAD" else method
        for route_method, pattern, route in self._routes:
            if route_method != lookup:
                continue
            match = pattern.fullmatch(path)
            if match is None:
                continue
            call = _Call(method, path, match.groupdict(), query, body, self.state.users[user_id])
            try:
                result = route(call)
            except ApiError as exc:
                return exc.status, {}, {"message": exc.message}
            except Exception as exc:  # a bug in the fake: surface it to the test
                self.errors.append(exc)
                return 500, {}, {"message": f"fake GitLab bug: {exc!r}"}
            if isinstance(result, tuple):
                status, payload, extra = result
                return status, extra, payload
            return (201 if method == "POST" else 200), {}, result
        return 404, {}, {"error": "404 Not Found"}

    def _build_routes(self) -> list[tuple[str, re.Pattern[str], Route]]:
        pid = r"/projects/(?P<pid>[^/]+)"
        noteable = r"(?P<kind>issues|merge_requests)/(?P<iid>\d+)"
        table: list[tuple[str, str, Route]] = [
            ("GET", r"/user", self._get_user),
            ("GET", r"/users", self._list_users),
            ("GET", pid, self._get_project),
            ("GET", pid + r"/members/all/(?P<uid>\d+)", self._get_member_all),
            ("POST", pid + "/" + noteable + r"/notes/(?P<nid>\d+)/award_emoji", self._award),
            ("GET", pid + "/" + noteable + r"/notes", self._list_notes),
            ("POST", pid + "/" + noteable + r"/notes", self._post_note),
            ("PUT", pid + "/" + noteable + r"/notes/(?P<nid>\d+)", self._put_note),
            ("GET", pid + r"/merge_requests", self._list_mrs),
            ("POST", pid + r"/merge_requests", self._post_mr),
            ("GET", pid + r"/merge_requests/(?P<iid>\d+)", self._get_mr),
            ("PUT", pid + r"/merge_requests/(?P<iid>\d+)", self._put_mr),
            (
                "POST",
                pid + r"/merge_requests/(?P<iid>\d+)/discussions/(?P<did>[^/]+)/notes",
                self._post_discussion_note,
            ),
            (
                "PUT",
                pid + r"/merge_requests/(?P<iid>\d+)/discussions/(?P<did>[^/]+)",
                self._put_discussion,
            ),
            ("GET", pid + r"/repository/commits/(?P<sha>[0-9a-fA-F]+)", self._get_commit),
            ("GET", pid + r"/pipelines", self._list_pipelines),
            ("GET", pid + r"/pipelines/(?P<plid>\d+)/jobs", self._pipeline_jobs),
            ("GET", pid + r"/jobs/(?P<jid>\d+)/trace", self._job_trace),
            ("POST", pid + r"/statuses/(?P<sha>[0-9a-fA-F]+)", self._post_status),
            ("GET", pid + r"/repository/files/(?P<file>[^/]+)", self._get_file),
            ("GET", pid + r"/hooks", self._list_hooks),
            ("POST", pid + r"/hooks", self._post_hook),
            ("PUT", pid + r"/hooks/(?P<hid>\d+)", self._put_hook),
            ("GET", r"/personal_access_tokens/self", self._token_self),
            ("GET", r"/groups/(?P<gid>[^/]+)", self._get_group),
            ("GET", r"/groups/(?P<gid>[^/]+)/projects", self._group_projects),
            ("GET", r"/groups/(?P<gid>[^/]+)/hooks", self._list_group_hooks),
            ("POST", r"/groups/(?P<gid>[^/]+)/hooks", self._post_group_hook),
            ("PUT", r"/groups/(?P<gid>[^/]+)/hooks/(?P<hid>\d+)", self._put_group_hook),
        ]
        return [(m, re.compile(p), r) for m, p, r in table]

    # -- routes --------------------------------------------------------------------------------

    def _get_user(self, call: _Call) -> Any:
        return dict(call.user)

    def _list_users(self, call: _Call) -> Any:
        username = call.query.get("username")
        return [
            dict(u)
            for u in self.state.users.values()
            if username is None or u["username"].lower() == username.lower()
        ]

    def _get_project(self, call: _Call) -> Any:
        return dict(self._project(call.params["pid"]))

    def _get_member_all(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        uid = int(call.params["uid"])
        level = self._effective_level(project, uid)
        if level is None or uid not in self.state.users:
            raise ApiError(404, "404 Not found")
        user = self.state.users[uid]
        return {**_user_ref(user), "state": "active", "access_level": level}

    def _noteable(self, call: _Call) -> tuple[dict[str, Any], str, int]:
        project = self._project(call.params["pid"])
        kind, iid = call.params["kind"], int(call.params["iid"])
        table = self.state.issues if kind == "issues" else self.state.merge_requests
        if (project["id"], iid) not in table:
            raise ApiError(404, "404 Not found")
        return project, kind, iid

    def _note(self, call: _Call) -> dict[str, Any]:
        project, kind, iid = self._noteable(call)
        nid = int(call.params["nid"])
        for note in self.state.notes.get((project["id"], kind, iid), []):
            if note["id"] == nid:
                return note
        raise ApiError(404, "404 Note Not Found")

    def _award(self, call: _Call) -> Any:
        note = self._note(call)
        name = _require(call.body, "name")
        for award in self.state.award_emoji:
            if (
                award["awardable_id"] == note["id"]
                and award["name"] == name
                and (award["user"]["id"] == call.user["id"])
            ):
                # What GitLab really answers for a duplicate award.
                raise ApiError(404, "404 Award Emoji Name has already been taken Not Found")
        award = {
            "id": self._next_id(),
            "name": name,
            "user": _user_ref(call.user),
            "awardable_id": note["id"],
            "awardable_type": "Note",
        }
        self.state.award_emoji.append(award)
        return award

    def _list_notes(self, call: _Call) -> Any:
        project, kind, iid = self._noteable(call)
        notes = list(self.state.notes.get((project["id"], kind, iid), []))
        if call.query.get("sort", "desc") == "desc":
            notes.reverse()  # GitLab's default order is newest first
        return _paginate(notes, call.query)

    def _post_note(self, call: _Call) -> Any:
        project, kind, iid = self._noteable(call)
        body = _require(call.body, "body")
        return dict(self._create_note(project["id"], kind, iid, body, call.user, False))

    def _put_note(self, call: _Call) -> Any:
        note = self._note(call)
        if note["author"]["id"] != call.user["id"]:
            raise ApiError(403, "403 Forbidden")
        note["body"] = _require(call.body, "body")
        return dict(note)

    def _list_mrs(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        state = call.query.get("state", "all")
        source = call.query.get("source_branch")
        found = [
            dict(mr)
            for (p, _), mr in sorted(self.state.merge_requests.items(), reverse=True)
            if p == project["id"]
            and (state == "all" or mr["state"] == state)
            and (source is None or mr["source_branch"] == source)
        ]
        return _paginate(found, call.query)

    def _post_mr(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        for key in ("source_branch", "target_branch", "title"):
            _require(call.body, key)
        for (p, _), mr in self.state.merge_requests.items():
            if (
                p == project["id"]
                and mr["state"] == "opened"
                and mr["source_branch"] == call.body["source_branch"]
                and mr["target_branch"] == call.body["target_branch"]
            ):
                raise ApiError(
                    409,
                    [
                        "Another open merge request already exists for this source branch: "
                        f"!{mr['iid']}"
                    ],
                )
        return dict(self._create_mr(project, call.body, call.user))

    def _mr(self, call: _Call) -> dict[str, Any]:
        project = self._project(call.params["pid"])
        mr = self.state.merge_requests.get((project["id"], int(call.params["iid"])))
        if mr is None:
            raise ApiError(404, "404 Not found")
        return mr

    def _get_mr(self, call: _Call) -> Any:
        return dict(self._mr(call))

    def _put_mr(self, call: _Call) -> Any:
        mr = self._mr(call)
        body = call.body or {}
        if "title" in body:
            mr["title"] = body["title"]
            mr["draft"] = mr["work_in_progress"] = bool(_DRAFT.match(body["title"]))
        if "description" in body:
            mr["description"] = body["description"]
        return dict(mr)

    def _discussion(self, call: _Call) -> tuple[int, int, str]:
        project = self._project(call.params["pid"])
        key = (project["id"], int(call.params["iid"]), call.params["did"])
        if key not in self.state.discussions:
            raise ApiError(404, "404 Discussion Not Found")
        return key

    def add_discussion(self, project: dict[str, Any], iid: int, discussion_id: str) -> None:
        with self._lock:
            self.state.discussions[(project["id"], iid, discussion_id)] = False

    def _post_discussion_note(self, call: _Call) -> Any:
        pid, iid, did = self._discussion(call)
        note = self._create_note(
            pid, "merge_requests", iid, _require(call.body, "body"), call.user, False
        )
        note["discussion_id"] = did
        return dict(note)

    def _put_discussion(self, call: _Call) -> Any:
        key = self._discussion(call)
        self.state.discussions[key] = bool((call.body or {}).get("resolved"))
        return {"id": key[2], "resolved": self.state.discussions[key]}

    def _get_commit(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        commit = self.state.commits.get((project["id"], call.params["sha"]))
        if commit is None:
            raise ApiError(404, "404 Commit Not Found")
        return dict(commit)

    def _list_pipelines(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        sha = call.query.get("sha")
        found = [
            dict(p)
            for p in sorted(self.state.pipelines.values(), key=lambda p: -p["id"])
            if p["project_id"] == project["id"] and (sha is None or p["sha"] == sha)
        ]
        return _paginate(found, call.query)

    def add_job(
        self, project: dict[str, Any], pipeline_id: int, name: str, status: str, trace: str = "",
        *, stage: str = "test", allow_failure: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """A job of a pipeline, with its trace (the text GET …/jobs/:id/trace answers)."""
        with self._lock:
            job = {
                "id": self._next_id(),
                "name": name,
                "stage": stage,
                "status": status,
                "pipeline_id": pipeline_id,
                "project_id": project["id"],
                "allow_failure": allow_failure,
            }
            self.state.jobs[job["id"]] = job
            self.state.traces[job["id"]] = trace
            return dict(job)

    def _pipeline_jobs(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        scope = call.query.get("scope[]") or call.query.get("scope")
        found = [
            {**j, "pipeline": {"id": j["pipeline_id"]}}
            for j in self.state.jobs.values()
            if j["project_id"] == project["id"]
            and j["pipeline_id"] == int(call.params["plid"])
            and (scope is None or j["status"] == scope)
        ]
        return _paginate(found, call.query)

    def _job_trace(self, call: _Call) -> Any:
        self._project(call.params["pid"])
        trace = self.state.traces.get(int(call.params["jid"]))
        if trace is None:
            raise ApiError(404, "404 Job Not Found")
        return RawText(trace)

    def _post_status(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        sha = call.params["sha"]
        state = _require(call.body, "state")
        if state not in ("pending", "running", "success", "failed", "canceled"):
            raise ApiError(400, "state does not have a valid value")
        commit = self.state.commits.get((project["id"], sha))
        if commit is None:
            raise ApiError(404, "404 References for commit Not Found")
        name = str(call.body.get("name") or call.body.get("context") or "default")
        if len(name) >= 255:
            raise ApiError(400, {"name": ["is too long (maximum is 255 characters)"]})
        if len(str(call.body.get("description") or "")) > 255:
            raise ApiError(400, {"description": ["is too long (maximum is 255 characters)"]})
        pipeline_id = call.body.get("pipeline_id")
        if pipeline_id is not None:
            if pipeline_id not in self.state.pipelines:
                raise ApiError(404, "404 Pipeline Not Found")
        else:
            # GitLab puts a status without pipeline_id on a new "external" pipeline.
            pipeline_id = self._create_pipeline(project["id"], sha, "main", state, "external")["id"]
        for status in self.state.statuses:
            if (status["sha"], status["name"], status["pipeline_id"]) != (sha, name, pipeline_id):
                continue
            if status["status"] == state and state in ("pending", "running"):
                event = "enqueue" if state == "pending" else "run"
                raise ApiError(
                    400,
                    f"Cannot transition status via :{event} from :{state} "
                    f'(Reason(s): Status cannot transition via "{event}")',
                )
            status.update(_status_fields(call.body, state))
            return dict(status)
        status = {
            "id": self._next_id(),
            "sha": sha,
            "name": name,
            "pipeline_id": pipeline_id,
            "project_id": project["id"],
            **_status_fields(call.body, state),
        }
        self.state.statuses.append(status)
        return dict(status)

    def _get_file(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        file_path = unquote(call.params["file"])
        ref = call.query.get("ref") or project["default_branch"]
        content = self.state.files.get((project["id"], ref, file_path))
        if content is None:
            raise ApiError(404, "404 File Not Found")
        return {
            "file_path": file_path,
            "ref": ref,
            "encoding": "base64",
            "content": base64.b64encode(content.encode()).decode(),
        }

    def _list_hooks(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        # GitLab never shows a hook's secret token back.
        hooks = [
            {k: v for k, v in h.items() if k != "token"} for h in self.state.hooks[project["id"]]
        ]
        return _paginate(hooks, call.query)

    def _post_hook(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        _require(call.body, "url")
        hook = {"id": self._next_id(), "project_id": project["id"], **call.body}
        self.state.hooks[project["id"]].append(hook)
        return {k: v for k, v in hook.items() if k != "token"}

    def _put_hook(self, call: _Call) -> Any:
        project = self._project(call.params["pid"])
        hid = int(call.params["hid"])
        for hook in self.state.hooks[project["id"]]:
            if hook["id"] == hid:
                hook.update(call.body or {})
                return {k: v for k, v in hook.items() if k != "token"}
        raise ApiError(404, "404 Not found")

    def _token_self(self, call: _Call) -> Any:
        token = next(t for t, uid in self.state.tokens.items() if uid == call.user["id"])
        default = {"name": "deksdenflow", "scopes": ["api"], "active": True, "revoked": False}
        return {
            "id": call.user["id"],
            "expires_at": None,
            **default,
            **self.state.token_info.get(token, {}),
        }

    def _group(self, raw_id: str) -> dict[str, Any]:
        key = unquote(raw_id)
        for group in self.state.groups.values():
            if str(group["id"]) == key or group["full_path"] == key:
                return group
        raise ApiError(404, "404 Group Not Found")

    def _get_group(self, call: _Call) -> Any:
        return dict(self._group(call.params["gid"]))

    def _group_projects(self, call: _Call) -> Any:
        group = self._group(call.params["gid"])
        ids = {group["id"]}
        if call.query.get("include_subgroups") == "true":
            changed = True
            while changed:
                below = {g["id"] for g in self.state.groups.values() if g["parent_id"] in ids}
                changed = not below <= ids
                ids |= below
        found = [dict(p) for p in self.state.projects.values() if p.get("namespace_id") in ids]
        return _paginate(found, call.query)

    def _list_group_hooks(self, call: _Call) -> Any:
        group = self._group(call.params["gid"])
        hooks = self.state.group_hooks.get(group["id"], [])
        return _paginate([{k: v for k, v in h.items() if k != "token"} for h in hooks], call.query)

    def _post_group_hook(self, call: _Call) -> Any:
        group = self._group(call.params["gid"])
        _require(call.body, "url")
        hook = {"id": self._next_id(), "group_id": group["id"], **call.body}
        self.state.group_hooks.setdefault(group["id"], []).append(hook)
        return {k: v for k, v in hook.items() if k != "token"}

    def _put_group_hook(self, call: _Call) -> Any:
        group = self._group(call.params["gid"])
        hid = int(call.params["hid"])
        for hook in self.state.group_hooks.get(group["id"], []):
            if hook["id"] == hid:
                hook.update(call.body or {})
                return {k: v for k, v in hook.items() if k != "token"}
        raise ApiError(404, "404 Not found")


def parts_ok(path: str) -> bool:
    return path.startswith("/") and "//" not in path


def _require(body: Any, key: str) -> Any:
    if not isinstance(body, dict) or body.get(key) in (None, ""):
        raise ApiError(400, f"{key} is missing")
    return body[key]


def _user_ref(user: dict[str, Any]) -> dict[str, Any]:
    return {"id": user["id"], "username": user["username"], "name": user["name"]}


def _status_fields(body: dict[str, Any], state: str) -> dict[str, Any]:
    return {
        "status": state,
        "description": body.get("description"),
        "target_url": body.get("target_url"),
    }


def _paginate(items: list[Any], query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
    per_page = max(1, min(100, int(query.get("per_page") or 20)))
    page = max(1, int(query.get("page") or 1))
    start = (page - 1) * per_page
    chunk = items[start : start + per_page]
    headers = {"X-Page": str(page), "X-Per-Page": str(per_page), "X-Total": str(len(items))}
    headers["X-Next-Page"] = str(page + 1) if start + per_page < len(items) else ""
    return 200, chunk, headers


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads are joined by server_close(), so no socket outlives a test.
    daemon_threads = False
    block_on_close = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out has gone away before we answer: expected in timeout tests.
        error = sys.exc_info()[1]
        if not isinstance(error, (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: FakeGitLab
    # HTTP/1.0: one request per connection, so shutdown never waits on an idle keep-alive.
    protocol_version = "HTTP/1.0"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items()}
        status, extra, payload = self.owner.handle(self.command, self.path, headers, raw)
        text = isinstance(payload, RawText)
        data = (
            b"" if payload is None else payload.encode() if text else json.dumps(payload).encode()
        )
        self.send_response(status)
        self.send_header(
            "Content-Type", "text/plain; charset=utf-8" if text else "application/json"
        )
        for key, value in extra.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet


@pytest.fixture
def fake_gitlab() -> Iterator[FakeGitLab]:
    """A running fake GitLab; `from tests.gitlab.fake_gitlab import fake_gitlab` to reuse it."""
    with FakeGitLab() as fake:
        yield fake
        assert not fake.errors, f"fake GitLab raised: {fake.errors!r}"
