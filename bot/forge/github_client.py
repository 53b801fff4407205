"""GitHub REST client: gidgethub over httpx with App auth, token caching, rate limits and
retries."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import email.utils
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import gidgethub
import gidgethub.abc
import gidgethub.sansio
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from uritemplate import variable

from bot.core.errors import ForgeError
from bot.forge.base import AsyncClosing

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
USER_AGENT = "deksdenflow"

# GitHub rejects app JWTs whose exp is more than 10 minutes ahead; backdating iat by 60 s absorbs
# clock drift between us and GitHub, and 9 minutes of lifetime keeps exp inside the window even
# if our clock runs a little fast.
JWT_BACKDATE_SECONDS = 60
JWT_LIFETIME_SECONDS = 9 * 60
JWT_RENEW_MARGIN_SECONDS = 60
# Installation tokens last an hour today; we trust `expires_at`, not that figure, and renew a few
# minutes early so a long git push started with the token does not outlive it.
TOKEN_MARGIN_SECONDS = 5 * 60

MAX_ATTEMPTS = 3
SERVER_ERROR_BASE_DELAY = 1.0
# GitHub asks for at least a minute between retries of a secondary rate limit without headers.
RATE_LIMIT_BASE_DELAY = 60.0
# x-ratelimit-reset is a whole second from GitHub's clock: wait one more to land after it.
RESET_PAD_SECONDS = 1.0
RETRIED_SERVER_ERRORS = frozenset({500, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE"})

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]
Auth = Literal["installation", "app", "none"]

# The un-expanded path template of the request in flight: what logs show, so values passed as
# template variables (a manifest code) never reach a log line.
_display_path: contextvars.ContextVar[str] = contextvars.ContextVar("_display_path", default="?")


class GitHubHTTPError(ForgeError):
    """GitHub answered with an error status (after retries); messages never carry credentials."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class GitHubRateLimited(ForgeError):
    """The rate limit asks for a longer wait than this client will sleep; retry the job later."""

    def __init__(self, retry_after: float, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- pure helpers -------------------------------------------------------------------------------


def token_is_fresh(expires_at: float, now: float, margin: float) -> bool:
    """True while a credential expiring at `expires_at` (epoch s) is usable for `margin` more s."""
    return now + margin < expires_at


def parse_github_time(value: str) -> float:
    """GitHub's ISO-8601 timestamps (`2016-07-11T22:14:10Z`) as epoch seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def app_jwt_claims(app_id: str, now: float) -> dict[str, int | str]:
    """The claims of a GitHub App JWT issued at `now`."""
    issued_at = int(now) - JWT_BACKDATE_SECONDS
    return {"iat": issued_at, "exp": int(now) + JWT_LIFETIME_SECONDS, "iss": app_id}


def basic_git_auth(token: str) -> str:
    """The `Authorization` header value git over HTTPS accepts for an installation token."""
    raw = f"x-access-token:{token}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


def _parse_retry_after(value: str, now: float) -> float | None:
    # Retry-After is either delta-seconds or an HTTP date (RFC 9110 §10.2.3).
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now, 0.0)


def _body_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])
    return ""


def _mentions_rate_limit(message: str) -> bool:
    lowered = message.lower()
    return "rate limit" in lowered or "abuse" in lowered


def retry_delay(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    attempt: int,
    now: float,
    *,
    max_attempts: int = MAX_ATTEMPTS,
) -> float | None:
    """Seconds to wait before retrying a response, or None when it must not be retried.

    `attempt` counts the attempts made so far (1 after the first response).
    """
    if attempt >= max_attempts:
        return None
    if status in (403, 429):
        retry_after = _header(headers, "retry-after")
        if retry_after is not None:
            parsed = _parse_retry_after(retry_after, now)
            if parsed is not None:
                return parsed
        remaining = _header(headers, "x-ratelimit-remaining")
        reset = _header(headers, "x-ratelimit-reset")
        if remaining == "0" and reset is not None:
            try:
                return max(float(reset) - now, 0.0) + RESET_PAD_SECONDS
            except ValueError:
                pass
        # A 403 without rate-limit headers is usually a permission problem; only its message tells
        # a header-less secondary limit apart, and retrying a permission error only wastes time.
        if status == 429 or _mentions_rate_limit(_body_message(body)):
            return RATE_LIMIT_BASE_DELAY * 2.0 ** (attempt - 1)
        return None
    if status in RETRIED_SERVER_ERRORS:
        retry_after = _header(headers, "retry-after")
        if retry_after is not None:
            parsed = _parse_retry_after(retry_after, now)
            if parsed is not None:
                return parsed
        return SERVER_ERROR_BASE_DELAY * 2.0 ** (attempt - 1)
    return None


# --- credentials --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallationToken:
    """An installation access token; `repr` leaves the secret out."""

    token: str = field(repr=False)
    expires_at: float


@dataclass
class _CachedJwt:
    value: str = field(repr=False)
    expires_at: float


# --- the gidgethub adapter ----------------------------------------------------------------------


class _GidgetAPI(gidgethub.abc.GitHubAPI):
    """gidgethub's one I/O method over an `httpx.AsyncClient`, with retries folded in.

    gidgethub.httpx is typed against (and imports) `httpx2`; respx only patches `httpx`, and we
    need our own `_request` anyway, so this subclasses the abstract base directly.
    """

    def __init__(self, owner: GitHubClient, base_url: str) -> None:
        super().__init__(owner.requester, base_url=base_url)
        self._owner = owner

    async def _request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes = b""
    ) -> tuple[int, Mapping[str, str], bytes]:
        return await self._owner._send(method, url, headers, body)

    async def sleep(self, seconds: float) -> None:
        await self._owner._sleep(seconds)


class GitHubClient(AsyncClosing):
    """Authenticated, rate-limit-aware access to one GitHub (github.com or Enterprise Server)."""

    def __init__(
        self,
        *,
        app_id: int | str | None = None,
        private_key: str | bytes | None = None,
        api_url: str = DEFAULT_API_URL,
        http: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
        max_concurrency: int = 10,
        max_attempts: int = MAX_ATTEMPTS,
        max_wait: float = 300.0,
        token_margin: float = TOKEN_MARGIN_SECONDS,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.time,
        requester: str = USER_AGENT,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if (app_id is None) != (private_key is None):
            raise ValueError("app_id and private_key go together")
        self.app_id = str(app_id) if app_id is not None else None
        self._private_key = private_key
        self._signing_key: rsa.RSAPrivateKey | None = None
        self.api_url = api_url.rstrip("/")
        self.requester = requester
        self._owns_http = http is None
        # `verify`: a context trusting a private CA (Enterprise Server behind one)
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout, verify=verify)
        self._timeout = timeout
        # GitHub's secondary limits allow ~100 concurrent requests per app; stay far below.
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._max_attempts = max_attempts
        self._max_wait = max_wait
        self._token_margin = token_margin
        self._sleep = sleep
        self._clock = clock
        self._jwt: _CachedJwt | None = None
        self._tokens: dict[int, InstallationToken] = {}
        # One lock per installation: concurrent first uses share one token request, while a
        # slow (rate-limited) fetch for one installation does not hold up the others.
        self._token_locks: dict[int, asyncio.Lock] = {}
        self._gh = _GidgetAPI(self, self.api_url)

    def __repr__(self) -> str:
        return f"GitHubClient(api_url={self.api_url!r}, app_id={self.app_id!r})"

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # credentials

    def app_jwt(self) -> str:
        """The app's JWT, reused until a minute before it expires."""
        if self.app_id is None or self._private_key is None:
            raise ForgeError("no GitHub App credentials configured")
        now = self._clock()
        if self._jwt is not None and token_is_fresh(
            self._jwt.expires_at, now, JWT_RENEW_MARGIN_SECONDS
        ):
            return self._jwt.value
        claims = app_jwt_claims(self.app_id, now)
        try:
            value = jwt.encode(claims, self._load_signing_key(), algorithm="RS256")
        except Exception:
            # PyJWT/cryptography messages can quote key material; say only what went wrong.
            raise ForgeError("could not sign the GitHub App JWT: unusable private key") from None
        self._jwt = _CachedJwt(value, float(claims["exp"]))
        return value

    def _load_signing_key(self) -> rsa.RSAPrivateKey:
        # Parsing a PEM validates the RSA key (~0.1 s); do it once, not for every JWT.
        if self._signing_key is None:
            raw = self._private_key
            assert raw is not None
            key = serialization.load_pem_private_key(
                raw.encode() if isinstance(raw, str) else raw, password=None
            )
            if not isinstance(key, rsa.RSAPrivateKey):
                raise TypeError("not an RSA key")
            self._signing_key = key
        return self._signing_key

    async def installation_token(self, installation_id: int) -> InstallationToken:
        """A cached installation token, fetched again a safety margin before `expires_at`."""
        async with self._token_locks.setdefault(installation_id, asyncio.Lock()):
            cached = self._tokens.get(installation_id)
            if cached is not None and token_is_fresh(
                cached.expires_at, self._clock(), self._token_margin
            ):
                return cached
            data = await self._call(
                "POST",
                "/app/installations/{installation_id}/access_tokens",
                {"installation_id": installation_id},
                b"",
                auth="app",
            )
            try:
                token = InstallationToken(str(data["token"]), parse_github_time(data["expires_at"]))
            except (TypeError, KeyError, ValueError):
                raise ForgeError("GitHub answered an installation token request oddly") from None
            self._tokens[installation_id] = token
            return token

    def invalidate_installation_token(self, installation_id: int) -> None:
        self._tokens.pop(installation_id, None)

    # requests

    async def request(
        self,
        method: str,
        path: str,
        url_vars: Mapping[str, variable.VariableValue] | None = None,
        *,
        data: Any = b"",
        auth: Auth = "installation",
        installation_id: int | None = None,
    ) -> Any:
        """One request; `path` may be a URI template (its variables stay out of logs/errors).

        With installation auth a 401 drops the cached token and retries once with a new one.
        """
        try:
            return await self._call(
                method, path, url_vars, data, auth=auth, installation_id=installation_id
            )
        except GitHubHTTPError as exc:
            if exc.status_code != 401 or auth != "installation" or installation_id is None:
                raise
            log.info("GitHub %s %s answered 401; renewing the installation token", method, path)
            self.invalidate_installation_token(installation_id)
            return await self._call(
                method, path, url_vars, data, auth=auth, installation_id=installation_id
            )

    async def get_all(
        self,
        path: str,
        url_vars: Mapping[str, variable.VariableValue] | None = None,
        *,
        iterable_key: str | None = None,
        auth: Auth = "installation",
        installation_id: int | None = None,
    ) -> list[Any]:
        """Every item of a paginated list (following `Link: rel=next`)."""
        for attempt in (1, 2):
            try:
                app_jwt, token = await self._credentials(auth, installation_id)
                _display_path.set(path)
                items: list[Any] = []
                async for item in self._gh.getiter(
                    path,
                    dict(url_vars or {}),
                    iterable_key=iterable_key,
                    jwt=app_jwt,
                    oauth_token=token,
                ):
                    items.append(item)
                return items
            except gidgethub.HTTPException as exc:
                status = int(exc.status_code)
                if (
                    status == 401
                    and attempt == 1
                    and auth == "installation"
                    and installation_id is not None
                ):
                    self.invalidate_installation_token(installation_id)
                    continue
                raise self._http_error("GET", path, exc) from None
            except (gidgethub.GitHubException, ValueError) as exc:
                raise ForgeError(f"GitHub GET {path} failed: {type(exc).__name__}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def download_text(self, path: str, *, installation_id: int, limit: int) -> str:
        """A plain-text download such as a job log: the last `limit` bytes.

        GitHub answers with a redirect to a pre-signed storage URL. That URL is fetched without
        our token (it is another host, and needs none); an answer other than 2xx or a redirect
        is a GitHubHTTPError, as for any request.
        """
        token = (await self.installation_token(installation_id)).token
        headers = {"Authorization": f"token {token}", "User-Agent": self.requester,
                   "Accept": "application/vnd.github+json"}  # fmt: skip
        url = self.api_url + path
        for _hop in range(2):  # the API's redirect, then the storage URL
            async with (
                self._semaphore,
                self._http.stream(
                    "GET", url, headers=headers, follow_redirects=False, timeout=self._timeout
                ) as response,
            ):
                if response.status_code in (301, 302, 303, 307, 308):
                    location = response.headers.get("location", "")
                    if not location.startswith(("https://", "http://")):
                        raise ForgeError(f"GitHub GET {path}: a redirect without a usable location")
                    url, headers = location, {"User-Agent": self.requester}
                    continue
                if response.status_code >= 400:
                    raise GitHubHTTPError(
                        response.status_code, f"GitHub GET {path} answered {response.status_code}"
                    )
                kept = bytearray()
                async for chunk in response.aiter_bytes():
                    kept.extend(chunk)
                    if len(kept) > 2 * limit:
                        del kept[: len(kept) - limit]
                return bytes(kept[-limit:]).decode("utf-8", "replace")
        raise ForgeError(f"GitHub GET {path}: too many redirects")

    async def _credentials(
        self, auth: Auth, installation_id: int | None
    ) -> tuple[str | None, str | None]:
        """(jwt, oauth_token) for gidgethub; both None sends the request unauthenticated."""
        if auth == "none":
            return None, None
        if auth == "app":
            return self.app_jwt(), None
        if installation_id is None:
            raise ForgeError("an installation id is needed for this GitHub request")
        return None, (await self.installation_token(installation_id)).token

    async def _call(
        self,
        method: str,
        path: str,
        url_vars: Mapping[str, variable.VariableValue] | None,
        data: Any,
        *,
        auth: Auth,
        installation_id: int | None = None,
    ) -> Any:
        app_jwt, token = await self._credentials(auth, installation_id)
        _display_path.set(path)
        try:
            result, _, _ = await self._gh._make_request(
                method,
                path,
                dict(url_vars or {}),
                data,
                gidgethub.sansio.accept_format(),
                jwt=app_jwt,
                oauth_token=token,
            )
        except gidgethub.HTTPException as exc:
            raise self._http_error(method, path, exc) from None
        except (gidgethub.GitHubException, ValueError) as exc:
            raise ForgeError(f"GitHub {method} {path} failed: {type(exc).__name__}") from None
        return result

    @staticmethod
    def _http_error(method: str, path: str, exc: gidgethub.HTTPException) -> GitHubHTTPError:
        status = int(exc.status_code)
        # gidgethub puts GitHub's own `message` in args; it never echoes our credentials.
        detail = (
            str(exc.args[0]) if exc.args and exc.args[0] is not None else exc.status_code.phrase
        )
        if isinstance(exc, gidgethub.BadRequestUnknownError):
            detail = "unparseable error body"
        return GitHubHTTPError(status, f"GitHub {method} {path} answered {status}: {detail}")

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Mapping[str, str], bytes]:
        """The HTTP edge: bounded concurrency, a timeout on each request, retries with backoff."""
        path = _display_path.get()
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._semaphore:
                    response = await self._http.request(
                        method, url, headers=dict(headers), content=body, timeout=self._timeout
                    )
            except httpx.TransportError as exc:
                # A POST that timed out may have been applied; only retry it when it never left.
                safe = method in IDEMPOTENT_METHODS or isinstance(
                    exc, httpx.ConnectError | httpx.ConnectTimeout
                )
                if not safe or attempt >= self._max_attempts:
                    raise ForgeError(
                        f"GitHub {method} {path} failed: {type(exc).__name__}"
                    ) from None
                delay = SERVER_ERROR_BASE_DELAY * 2.0 ** (attempt - 1)
                log.warning(
                    "GitHub %s %s: %s; retry %d in %.0f s",
                    method,
                    path,
                    type(exc).__name__,
                    attempt,
                    delay,
                )
                await self._sleep(delay)
                continue
            delay_or_none = retry_delay(
                response.status_code,
                response.headers,
                response.content,
                attempt,
                self._clock(),
                max_attempts=self._max_attempts,
            )
            if delay_or_none is None:
                return response.status_code, response.headers, response.content
            if delay_or_none > self._max_wait:
                raise GitHubRateLimited(
                    delay_or_none,
                    f"GitHub {method} {path} is rate limited for {delay_or_none:.0f} s",
                )
            log.warning(
                "GitHub %s %s answered %d; retry %d in %.0f s",
                method,
                path,
                response.status_code,
                attempt,
                delay_or_none,
            )
            await self._sleep(delay_or_none)
