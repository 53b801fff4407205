"""Async wrapper over python-gitlab's low-level API: worker threads, timeouts, bounded retries."""

from __future__ import annotations

import asyncio
import email.utils
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import gitlab
import gitlab.exceptions
import requests

from bot.core.errors import ForgeError
from bot.forge.base import AsyncClosing

# GitLab puts this on webhook deliveries so it can detect a hook that triggers itself; echoing it
# back on our own API calls would make GitLab treat our reaction as part of that loop.
RECURSION_HEADER = "X-Gitlab-Event-UUID"

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Methods we may resend after a read timeout: the first attempt may have been applied already.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})


class GitLabAPIError(ForgeError):
    """A GitLab API call failed (after retries); the message never contains the token."""

    def __init__(self, method: str, path: str, status_code: int | None, message: str) -> None:
        where = f"{method} {path}"
        text = f"GitLab {where} failed"
        text += f" with HTTP {status_code}: {message}" if status_code else f": {message}"
        super().__init__(text)
        self.method = method
        self.path = path
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True)
class GitLabResponse:
    """What a call answered: status, headers and the decoded JSON body (None when not JSON)."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None


def project_path(project: str | int) -> str:
    """The `:id` path segment: a numeric id as is, a `group/sub/name` path URL-encoded."""
    return str(project) if isinstance(project, int) else quote(str(project), safe="")


def retry_delay(
    status: int | None,
    headers: Mapping[str, str],
    attempt: int,
    *,
    backoff: float,
    max_delay: float,
    now: float | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (0-based), honouring Retry-After.

    Retry-After may be delta-seconds or an HTTP date; GitLab's rate limiter also sends
    RateLimit-Reset (epoch seconds). Whatever the server asks, we cap it so one call stays bounded.
    """
    wanted: float | None = None
    if status == 429:
        retry_after = _header(headers, "Retry-After")
        if retry_after is not None:
            wanted = _parse_retry_after(retry_after, now)
        if wanted is None:
            reset = _header(headers, "RateLimit-Reset")
            if reset is not None and reset.strip().isdigit():
                wanted = int(reset) - (time.time() if now is None else now)
    if wanted is None:
        wanted = backoff * (2**attempt)
    return min(max(wanted, 0.0), max_delay)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def _parse_retry_after(value: str, now: float | None) -> float | None:
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - (time.time() if now is None else now)


class _GuardedSession(requests.Session):
    """A requests session that strips the recursion header and remembers the last response.

    python-gitlab's HTTP errors carry no response headers, so the retry loop reads Retry-After
    from the response this session saw last in the same thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        request.headers.pop(RECURSION_HEADER, None)
        self._local.headers = {}
        response = super().send(request, **kwargs)
        self._local.headers = dict(response.headers)
        return response

    def last_headers(self) -> dict[str, str]:
        headers: dict[str, str] = getattr(self._local, "headers", {})
        return headers


class GitLabClient(AsyncClosing):
    """One GitLab instance (gitlab.com or self-managed) reached with one access token.

    Every call runs python-gitlab in a worker thread (it is synchronous), with a timeout, and
    retries 429 and 5xx a bounded number of times. python-gitlab's own retry is switched off:
    it sleeps with `time.sleep` for as long as Retry-After says, with no cap, and cannot parse an
    HTTP-date Retry-After. Worker threads share one requests session (its connection pool is
    thread-safe); the retry state lives on each call's stack, Retry-After in a thread-local.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 10.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_delay: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        ssl_verify: bool | str = True,
        user_agent: str = "deksdenflow",
    ) -> None:
        if not token:
            raise ForgeError("GitLab token is empty")
        self.url = url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._max_retries = max_retries
        self._backoff = backoff
        self._max_delay = max_delay
        self._sleep = sleep
        self._session = _GuardedSession()
        self._gl = gitlab.Gitlab(
            self.url,
            private_token=token,
            timeout=timeout,
            ssl_verify=ssl_verify,
            user_agent=user_agent,
            session=self._session,
        )

    def __repr__(self) -> str:
        return f"GitLabClient(url={self.url!r})"

    @property
    def token(self) -> str:
        """The access token, for git over HTTPS; never log it."""
        return self._token

    @property
    def session(self) -> requests.Session:
        """The requests session every call goes through (tests hook into it)."""
        return self._session

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._session.close()

    async def aclose(self) -> None:
        self.close()

    # -- async API ---------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> GitLabResponse:
        """Send one API call (path relative to /api/v4) off the event loop."""
        return await asyncio.to_thread(self._request_sync, method.upper(), path, query, body)

    async def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        return (await self.request("GET", path, query=query)).body

    async def get_or_none(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        """GET, with a 404 answered as None (GitLab also says 404 for "no access")."""
        try:
            return await self.get(path, query)
        except GitLabAPIError as exc:
            if exc.status_code == 404:
                return None
            raise

    async def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return (await self.request("POST", path, body=body)).body

    async def put(self, path: str, body: Mapping[str, Any]) -> Any:
        return (await self.request("PUT", path, body=body)).body

    async def paginate(
        self,
        path: str,
        query: Mapping[str, Any] | None = None,
        *,
        per_page: int = 100,
        max_pages: int = 50,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield the items of a list endpoint page by page (offset pagination, X-Next-Page)."""
        page = 1
        for _ in range(max_pages):
            params = {**(query or {}), "per_page": per_page, "page": page}
            response = await self.request("GET", path, query=params)
            for item in response.body or []:
                yield item
            next_page = _header(response.headers, "X-Next-Page") or ""
            if not next_page.strip().isdigit():
                return
            page = int(next_page)

    # -- the one synchronous sender ----------------------------------------------------------

    def _request_sync(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None,
        body: Mapping[str, Any] | None,
    ) -> GitLabResponse:
        attempt = 0
        while True:
            status: int | None
            try:
                response = self._gl.http_request(
                    method.lower(),
                    path,
                    query_data=dict(query or {}),
                    post_data=dict(body) if body is not None else None,
                    timeout=self._timeout,
                    obey_rate_limit=False,
                    retry_transient_errors=False,
                    max_retries=0,
                )
                return GitLabResponse(
                    status=response.status_code,
                    headers=dict(response.headers),
                    body=_decode(response),
                )
            except (
                gitlab.exceptions.GitlabHttpError,
                gitlab.exceptions.GitlabAuthenticationError,  # 401: not a GitlabHttpError
            ) as exc:
                status = exc.response_code
                message = _error_text(exc.error_message)
                retryable = status in RETRYABLE_STATUSES
            except requests.ConnectionError as exc:
                # Includes ConnectTimeout: nothing reached the server, so any method may retry.
                status, message, retryable = None, type(exc).__name__, True
            except requests.Timeout as exc:
                status, message = None, type(exc).__name__
                retryable = method in IDEMPOTENT_METHODS
            except (gitlab.exceptions.GitlabError, requests.RequestException) as exc:
                status, message, retryable = None, type(exc).__name__, False
            if not retryable or attempt >= self._max_retries:
                raise GitLabAPIError(method, path, status, self._scrub(message)) from None
            headers = self._session.last_headers() if status is not None else {}
            self._sleep(
                retry_delay(
                    status, headers, attempt, backoff=self._backoff, max_delay=self._max_delay
                )
            )
            attempt += 1

    async def job_trace(self, project: str | int, job_id: int, limit: int) -> str:
        """A job's trace through python-gitlab (`project.jobs.get(id).trace()`), streamed so
        only its last `limit` bytes are kept."""
        return await asyncio.to_thread(self._trace_sync, project, job_id, limit)

    def _trace_sync(self, project: str | int, job_id: int, limit: int) -> str:
        kept = bytearray()

        def keep(chunk: bytes) -> None:
            kept.extend(chunk)
            if len(kept) > 2 * limit:
                del kept[: len(kept) - limit]

        job = self._gl.projects.get(project, lazy=True).jobs.get(job_id, lazy=True)
        try:
            job.trace(streamed=True, action=keep, chunk_size=64 * 1024, timeout=self._timeout)
        except (gitlab.exceptions.GitlabError, requests.RequestException) as exc:
            status = getattr(exc, "response_code", None)
            raise GitLabAPIError(
                "GET", f"jobs/{job_id}/trace", status, self._scrub(type(exc).__name__)
            ) from None
        return bytes(kept[-limit:]).decode("utf-8", "replace")

    def _scrub(self, text: str) -> str:
        # Error bodies come from the server or a proxy; never let one echo our token back.
        return text.replace(self._token, "***")


def _decode(response: requests.Response) -> Any:
    if not response.content:
        return None
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _error_text(message: Any) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return str(message)[:500]
