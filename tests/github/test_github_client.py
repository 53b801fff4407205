"""GitHubClient: app JWT, installation-token cache, rate limits, retries, secrets kept out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
import respx

from bot.core.errors import ForgeError
from bot.forge.github import convert_manifest
from bot.forge.github_client import (
    GitHubClient,
    GitHubHTTPError,
    GitHubRateLimited,
    app_jwt_claims,
    basic_git_auth,
    retry_delay,
    token_is_fresh,
)

API = "https://api.github.com"
APP_ID = 4242
INSTALLATION_ID = 77
NOW = 1_700_000_000.0
TOKEN = "ghs_installationtokenSECRET1"
TOKEN_PATH = f"/app/installations/{INSTALLATION_ID}/access_tokens"

MakeToken = Callable[..., httpx.Response]


# --- pure helpers -------------------------------------------------------------------------------


def test_token_is_fresh_respects_margin() -> None:
    assert token_is_fresh(1000.0, now=600.0, margin=300.0)
    assert not token_is_fresh(1000.0, now=700.0, margin=300.0)
    assert not token_is_fresh(1000.0, now=1001.0, margin=0.0)


def test_app_jwt_claims() -> None:
    claims = app_jwt_claims("42", NOW)
    assert claims["iss"] == "42"
    assert claims["iat"] == NOW - 60
    assert int(claims["exp"]) - NOW <= 600


@pytest.mark.parametrize(
    ("status", "headers", "body", "attempt", "expected"),
    [
        (403, {"retry-after": "30"}, b"{}", 1, 30.0),
        (429, {"retry-after": "5"}, b"", 1, 5.0),
        (
            403,
            {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) + 120)},
            b'{"message": "API rate limit exceeded"}',
            1,
            121.0,
        ),
        # a reset already in the past: go (after the 1 s pad)
        (403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) - 5)}, b"", 1, 1.0),
        (403, {}, b'{"message": "You have exceeded a secondary rate limit."}', 1, 60.0),
        (403, {}, b'{"message": "You have exceeded a secondary rate limit."}', 2, 120.0),
        (429, {}, b"", 1, 60.0),
        (403, {}, b'{"message": "Resource not accessible by integration"}', 1, None),
        (403, {"x-ratelimit-remaining": "4999", "x-ratelimit-reset": "1"}, b"{}", 1, None),
        (502, {}, b"", 1, 1.0),
        (502, {}, b"", 2, 2.0),
        (503, {"retry-after": "7"}, b"", 1, 7.0),
        (502, {}, b"", 3, None),  # attempts exhausted
        (403, {"retry-after": "30"}, b"", 3, None),
        (404, {}, b"", 1, None),
        (422, {}, b"", 1, None),
        (401, {}, b"", 1, None),
        (501, {}, b"", 1, None),
    ],
)
def test_retry_delay(
    status: int, headers: dict[str, str], body: bytes, attempt: int, expected: float | None
) -> None:
    assert retry_delay(status, headers, body, attempt, NOW) == expected


def test_retry_delay_http_date() -> None:
    headers = {"retry-after": "Tue, 14 Nov 2023 22:14:00 GMT"}  # NOW is 22:13:20 UTC
    assert retry_delay(429, headers, b"", 1, NOW) == 40.0


def test_basic_git_auth() -> None:
    # base64("x-access-token:abc")
    assert basic_git_auth("abc") == "Basic eC1hY2Nlc3MtdG9rZW46YWJj"


# --- app JWT ------------------------------------------------------------------------------------


def test_app_jwt_is_rs256_with_claims(client: GitHubClient, public_key: str) -> None:
    token = client.app_jwt()
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    claims = jwt.decode(
        token, public_key, algorithms=["RS256"], options={"verify_exp": False, "verify_iat": False}
    )
    assert claims["iss"] == str(APP_ID)
    assert claims["iat"] == NOW - 60
    assert NOW < claims["exp"] <= NOW + 600


def test_app_jwt_cached_then_renewed(client: GitHubClient, clock: Any) -> None:
    first = client.app_jwt()
    clock.now += 60
    assert client.app_jwt() == first
    clock.now += 8 * 60  # within a minute of exp
    renewed = client.app_jwt()
    assert renewed != first
    assert jwt.decode(renewed, options={"verify_signature": False})["iat"] == clock.now - 60


async def test_unusable_private_key_does_not_leak() -> None:
    bad = "-----BEGIN RSA PRIVATE KEY-----\nNOTAKEYSECRETSTUFF\n-----END RSA PRIVATE KEY-----\n"
    async with GitHubClient(app_id=1, private_key=bad) as client:
        with pytest.raises(ForgeError) as info:
            client.app_jwt()
    assert "NOTAKEYSECRETSTUFF" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --- installation tokens ------------------------------------------------------------------------


async def test_installation_token_request_uses_app_jwt_and_is_cached(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route
) -> None:
    repo_route = mock.get("/repos/o/r").mock(return_value=httpx.Response(200, json={"id": 1}))
    await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    assert token_route.call_count == 1
    assert token_route.calls[0].request.headers["authorization"] == f"bearer {client.app_jwt()}"
    assert repo_route.call_count == 2
    for call in repo_route.calls:
        assert call.request.headers["authorization"] == f"token {TOKEN}"


async def test_concurrent_first_use_fetches_one_token(
    client: GitHubClient, token_route: respx.Route
) -> None:
    tokens = await asyncio.gather(*(client.installation_token(INSTALLATION_ID) for _ in range(5)))
    assert {t.token for t in tokens} == {TOKEN}
    assert token_route.call_count == 1


async def test_installation_token_refreshed_near_expiry(
    client: GitHubClient, clock: Any, mock: respx.MockRouter, make_token: MakeToken
) -> None:
    # A 20-minute token (don't assume one hour): renewed 5 minutes before it runs out.
    route = mock.post(TOKEN_PATH).mock(
        side_effect=[
            make_token("ghs_first", expires_in=20 * 60),
            make_token("ghs_second", expires_in=20 * 60, now=NOW + 16 * 60),
        ]
    )
    assert (await client.installation_token(INSTALLATION_ID)).token == "ghs_first"
    clock.now += 14 * 60
    assert (await client.installation_token(INSTALLATION_ID)).token == "ghs_first"
    clock.now += 2 * 60
    assert (await client.installation_token(INSTALLATION_ID)).token == "ghs_second"
    assert route.call_count == 2


async def test_401_refreshes_token_and_retries_once(
    client: GitHubClient, mock: respx.MockRouter, make_token: MakeToken
) -> None:
    mock.post(TOKEN_PATH).mock(side_effect=[make_token("ghs_revoked"), make_token("ghs_fresh")])
    route = mock.get("/repos/o/r").mock(
        side_effect=[
            httpx.Response(401, json={"message": "Bad credentials"}),
            httpx.Response(200, json={"default_branch": "main"}),
        ]
    )
    data = await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    assert data == {"default_branch": "main"}
    assert [c.request.headers["authorization"] for c in route.calls] == [
        "token ghs_revoked",
        "token ghs_fresh",
    ]


async def test_persistent_401_is_an_error(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route
) -> None:
    route = mock.get("/repos/o/r").mock(
        return_value=httpx.Response(401, json={"message": "Bad credentials"})
    )
    with pytest.raises(GitHubHTTPError) as info:
        await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    assert info.value.status_code == 401
    assert route.call_count == 2
    assert token_route.call_count == 2


# --- rate limits and retries --------------------------------------------------------------------


async def test_secondary_rate_limit_waits_retry_after(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route, sleeps: Any
) -> None:
    route = mock.post("/repos/o/r/issues/1/comments").mock(
        side_effect=[
            httpx.Response(
                403,
                headers={"retry-after": "30"},
                json={"message": "You have exceeded a secondary rate limit."},
            ),
            httpx.Response(201, json={"id": 9}),
        ]
    )
    data = await client.request(
        "POST", "/repos/o/r/issues/1/comments", data={"body": "x"}, installation_id=INSTALLATION_ID
    )
    assert data == {"id": 9}
    assert sleeps.delays == [30.0]
    assert route.call_count == 2


async def test_primary_rate_limit_waits_until_reset(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route, sleeps: Any
) -> None:
    reset = int(NOW) + 90
    route = mock.get("/repos/o/r").mock(
        side_effect=[
            httpx.Response(
                403,
                headers={
                    "x-ratelimit-limit": "5000",
                    "x-ratelimit-remaining": "0",
                    "x-ratelimit-reset": str(reset),
                },
                json={"message": "API rate limit exceeded for installation."},
            ),
            httpx.Response(200, json={}),
        ]
    )
    await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    assert sleeps.delays == [reset - NOW + 1]
    assert route.call_count == 2


async def test_rate_limit_longer_than_max_wait_is_deferred(
    private_key: str, clock: Any, sleeps: Any, mock: respx.MockRouter, token_route: respx.Route
) -> None:
    mock.get("/repos/o/r").mock(
        return_value=httpx.Response(
            403,
            headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(NOW) + 1800)},
            json={"message": "API rate limit exceeded"},
        )
    )
    async with GitHubClient(
        app_id=APP_ID, private_key=private_key, sleep=sleeps, clock=clock, max_wait=300
    ) as client:
        with pytest.raises(GitHubRateLimited) as info:
            await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    assert info.value.retry_after == 1801
    assert sleeps.delays == []


async def test_permission_403_not_retried(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route, sleeps: Any
) -> None:
    route = mock.post("/repos/o/r/pulls").mock(
        return_value=httpx.Response(403, json={"message": "Resource not accessible by integration"})
    )
    with pytest.raises(GitHubHTTPError) as info:
        await client.request("POST", "/repos/o/r/pulls", data={}, installation_id=INSTALLATION_ID)
    assert info.value.status_code == 403
    assert "Resource not accessible by integration" in str(info.value)
    assert route.call_count == 1
    assert sleeps.delays == []


async def test_502_retried_then_success(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route, sleeps: Any
) -> None:
    route = mock.get("/repos/o/r").mock(
        side_effect=[httpx.Response(502), httpx.Response(200, json={"ok": True})]
    )
    assert await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID) == {
        "ok": True
    }
    assert route.call_count == 2
    assert sleeps.delays == [1.0]


async def test_5xx_exhausted_raises_forge_error(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route, sleeps: Any
) -> None:
    route = mock.get("/repos/o/r").mock(return_value=httpx.Response(503))
    with pytest.raises(ForgeError) as info:
        await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    assert isinstance(info.value, GitHubHTTPError) and info.value.status_code == 503
    assert route.call_count == 3
    assert sleeps.delays == [1.0, 2.0]


async def test_timeout_on_get_retried_then_error(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route, sleeps: Any
) -> None:
    route = mock.get("/repos/o/r").mock(side_effect=httpx.ReadTimeout("timed out"))
    with pytest.raises(ForgeError, match="ReadTimeout"):
        await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    assert route.call_count == 3
    assert sleeps.delays == [1.0, 2.0]


async def test_timeout_on_post_not_retried(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route, sleeps: Any
) -> None:
    # The comment may have been created: posting again could duplicate it.
    route = mock.post("/repos/o/r/issues/1/comments").mock(
        side_effect=httpx.ReadTimeout("timed out")
    )
    with pytest.raises(ForgeError):
        await client.request(
            "POST", "/repos/o/r/issues/1/comments", data={}, installation_id=INSTALLATION_ID
        )
    assert route.call_count == 1
    assert sleeps.delays == []


async def test_every_request_has_a_timeout(
    private_key: str, mock: respx.MockRouter, token_route: respx.Route
) -> None:
    route = mock.get("/repos/o/r").mock(return_value=httpx.Response(200, json={}))
    async with httpx.AsyncClient() as http:  # a caller's client without its own timeout
        client = GitHubClient(app_id=APP_ID, private_key=private_key, http=http, timeout=12.5)
        await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    timeouts = [token_route.calls[0].request, route.calls[0].request]
    for request in timeouts:
        assert request.extensions["timeout"] == {
            "connect": 12.5,
            "read": 12.5,
            "write": 12.5,
            "pool": 12.5,
        }


async def test_concurrency_is_capped(
    private_key: str, mock: respx.MockRouter, token_route: respx.Route
) -> None:
    in_flight = 0
    peak = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return httpx.Response(200, json={})

    mock.get("/repos/o/r").mock(side_effect=slow)
    async with GitHubClient(app_id=APP_ID, private_key=private_key, max_concurrency=3) as client:
        await asyncio.gather(
            *(
                client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
                for _ in range(10)
            )
        )
    assert peak == 3


async def test_enterprise_base_url(
    private_key: str, clock: Any, sleeps: Any, make_token: MakeToken
) -> None:
    with respx.mock(base_url="https://ghe.example.com/api/v3") as ghe:
        token = ghe.post(TOKEN_PATH).mock(return_value=make_token())
        pulls = ghe.get("/repos/o/r/pulls", params={"state": "open"}).mock(
            return_value=httpx.Response(200, json=[])
        )
        async with GitHubClient(
            app_id=APP_ID,
            private_key=private_key,
            api_url="https://ghe.example.com/api/v3/",
            sleep=sleeps,
            clock=clock,
        ) as client:
            await client.request(
                "GET", "/repos/o/r/pulls?state=open", installation_id=INSTALLATION_ID
            )
        assert token.called and pulls.called
        assert str(pulls.calls[0].request.url) == (
            "https://ghe.example.com/api/v3/repos/o/r/pulls?state=open"
        )


async def test_pagination_follows_link_header(
    client: GitHubClient, mock: respx.MockRouter, token_route: respx.Route
) -> None:
    page2 = f"{API}/repositories/1/issues/1/comments?per_page=2&page=2"
    mock.get("/repos/o/r/issues/1/comments", params={"per_page": "2"}).mock(
        return_value=httpx.Response(
            200, json=[{"id": 1}, {"id": 2}], headers={"link": f'<{page2}>; rel="next"'}
        )
    )
    mock.get(page2).mock(return_value=httpx.Response(200, json=[{"id": 3}]))
    items = await client.get_all(
        "/repos/o/r/issues/1/comments?per_page=2", installation_id=INSTALLATION_ID
    )
    assert [i["id"] for i in items] == [1, 2, 3]


# --- secrets ------------------------------------------------------------------------------------


async def test_secrets_never_in_errors_or_logs(
    client: GitHubClient,
    private_key: str,
    mock: respx.MockRouter,
    make_token: MakeToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    mock.post(TOKEN_PATH).mock(return_value=make_token())
    mock.get("/repos/o/r").mock(
        side_effect=[
            httpx.Response(502),
            httpx.Response(401, json={"message": "Bad credentials"}),
            httpx.Response(401, json={"message": "Bad credentials"}),
        ]
    )
    mock.post("/app-manifests/{code}/conversions".format(code="manifestcodeSECRET")).mock(
        return_value=httpx.Response(404, json={"message": "Not Found"})
    )
    errors: list[BaseException] = []
    with pytest.raises(ForgeError) as info:
        await client.request("GET", "/repos/o/r", installation_id=INSTALLATION_ID)
    errors.append(info.value)
    with pytest.raises(ForgeError) as info:
        await convert_manifest("manifestcodeSECRET")
    errors.append(info.value)
    repr_client = repr(client) + repr(await client.installation_token(INSTALLATION_ID))

    secrets = [TOKEN, client.app_jwt(), *private_key.splitlines()[1:3]]
    texts = [caplog.text, repr_client]
    for error in errors:
        texts += [str(error), repr(error), str(error.__cause__), str(error.__context__)]
    for text in texts:
        for secret in secrets:
            assert secret not in text
    # The one-time manifest code stays out of our own logs and errors (httpx's own INFO line
    # logs every URL; that logger is the deployment's to configure).
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("bot.")]
    assert ours and not any("manifestcodeSECRET" in m for m in ours)
    assert all("manifestcodeSECRET" not in t for t in texts[1:])
    assert "/app-manifests/{code}/conversions" in str(errors[1])
