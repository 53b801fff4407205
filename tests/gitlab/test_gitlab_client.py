"""GitLabClient against the fake server: retries, threads, headers and token hygiene."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import requests

from bot.core.errors import ForgeError
from bot.forge.gitlab_client import (
    RECURSION_HEADER,
    GitLabAPIError,
    GitLabClient,
    project_path,
    retry_delay,
)
from tests.gitlab.fake_gitlab import FakeGitLab


async def test_get_sends_private_token_and_timeout(
    fake_gitlab: FakeGitLab, client: GitLabClient
) -> None:
    user = await client.get("/user")
    assert user["id"] == fake_gitlab.bot["id"]
    [request] = fake_gitlab.requests
    assert (request.method, request.path) == ("GET", "/user")
    assert request.header("PRIVATE-TOKEN") == fake_gitlab.token
    assert request.header("Authorization") is None


async def test_429_with_retry_after_is_retried_then_succeeds(
    fake_gitlab: FakeGitLab, client: GitLabClient, sleeps: list[float]
) -> None:
    fake_gitlab.fail("/user", times=2, status=429, retry_after=1)
    user = await client.get("/user")
    assert user["username"] == "deksdenflow-bot"
    assert [r.status for r in fake_gitlab.requests] == [429, 429, 200]
    assert sleeps == [1.0, 1.0]  # Retry-After honoured, through the injected sleep


async def test_502_is_retried_with_backoff(
    fake_gitlab: FakeGitLab, client: GitLabClient, sleeps: list[float]
) -> None:
    fake_gitlab.fail("/user", times=2, status=502)
    await client.get("/user")
    assert [r.status for r in fake_gitlab.requests] == [502, 502, 200]
    assert sleeps == [0.5, 1.0]


async def test_post_502_is_retried(fake_gitlab: FakeGitLab, client: GitLabClient) -> None:
    project = fake_gitlab.add_project("acme/x")
    issue = fake_gitlab.add_issue(project)
    fake_gitlab.fail(f"/projects/{project['id']}/issues/*/notes", status=502, method="POST")
    await client.post(f"/projects/{project['id']}/issues/{issue['iid']}/notes", {"body": "hi"})
    assert [r.status for r in fake_gitlab.requests] == [502, 201]
    assert len(fake_gitlab.notes_of(project, "issues", issue["iid"])) == 1


async def test_retries_are_bounded(fake_gitlab: FakeGitLab, sleeps: list[float]) -> None:
    fake_gitlab.fail("/user", times=100, status=503)
    gl = GitLabClient(fake_gitlab.url, fake_gitlab.token, max_retries=2, sleep=sleeps.append)
    try:
        with pytest.raises(GitLabAPIError) as caught:
            await gl.get("/user")
    finally:
        gl.close()
    assert caught.value.status_code == 503
    assert isinstance(caught.value, ForgeError)
    assert len(fake_gitlab.requests) == 3
    assert len(sleeps) == 2


async def test_4xx_is_not_retried(fake_gitlab: FakeGitLab, client: GitLabClient) -> None:
    with pytest.raises(GitLabAPIError) as caught:
        await client.get("/projects/999")
    assert caught.value.status_code == 404
    assert "404 Project Not Found" in str(caught.value)
    assert len(fake_gitlab.requests) == 1


async def test_huge_retry_after_is_capped(fake_gitlab: FakeGitLab, sleeps: list[float]) -> None:
    fake_gitlab.fail("/user", status=429, retry_after=86400)
    gl = GitLabClient(fake_gitlab.url, fake_gitlab.token, max_delay=30.0, sleep=sleeps.append)
    try:
        await gl.get("/user")
    finally:
        gl.close()
    assert sleeps == [30.0]


def test_retry_delay_forms() -> None:
    now = 1_700_000_000.0
    kw: dict[str, Any] = {"backoff": 0.5, "max_delay": 60.0, "now": now}
    assert retry_delay(429, {"retry-after": "3"}, 0, **kw) == 3.0
    http_date = "Tue, 14 Nov 2023 22:13:40 GMT"  # now + 20 s
    assert retry_delay(429, {"Retry-After": http_date}, 0, **kw) == pytest.approx(20.0)
    assert retry_delay(429, {"RateLimit-Reset": str(int(now) + 7)}, 0, **kw) == 7.0
    assert retry_delay(429, {"Retry-After": "soon"}, 2, **kw) == 2.0  # unparsable: backoff
    assert retry_delay(502, {"Retry-After": "9"}, 1, **kw) == 1.0  # only 429 reads it
    assert retry_delay(503, {}, 10, **kw) == 60.0


async def test_no_recursion_header_on_any_request(
    fake_gitlab: FakeGitLab, client: GitLabClient
) -> None:
    # Even if something upstream copied the webhook's header into the session, it never leaves.
    client.session.headers[RECURSION_HEADER] = "0f4bd1c6-1f1b-4b56-8f4e-3d0d6b0b0f0e"
    fake_gitlab.fail("/user", status=429, retry_after=0)
    await client.get("/user")
    await client.get("/users", {"username": "nobody"})
    assert len(fake_gitlab.requests) == 3
    for request in fake_gitlab.requests:
        assert request.header(RECURSION_HEADER) is None
        assert not any(k.lower().startswith("x-gitlab") for k in request.headers)


async def test_calls_run_off_the_event_loop(fake_gitlab: FakeGitLab, client: GitLabClient) -> None:
    loop_thread = threading.get_ident()
    sending_threads: list[int] = []

    def remember(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        sending_threads.append(threading.get_ident())

    client.session.hooks["response"].append(remember)
    # Two calls at once: both must progress while the loop stays free.
    await asyncio.gather(client.get("/user"), client.get("/users", {"username": "x"}))
    assert len(sending_threads) == 2
    assert loop_thread not in sending_threads


async def test_token_never_in_exception_text(fake_gitlab: FakeGitLab) -> None:
    secret = fake_gitlab.token
    # A misbehaving proxy that echoes the token back in its error body.
    fake_gitlab.fail("/user", status=400, body={"message": f"bad token {secret}"})
    gl = GitLabClient(fake_gitlab.url, secret, sleep=lambda _: None)
    try:
        with pytest.raises(GitLabAPIError) as caught:
            await gl.get("/user")
    finally:
        gl.close()
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)
    # Raised `from None`: no chained python-gitlab error can carry the text either.
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    assert secret not in repr(gl)


async def test_wrong_token_is_401_without_the_token(fake_gitlab: FakeGitLab) -> None:
    wrong = "glpat-not-the-right-one"
    gl = GitLabClient(fake_gitlab.url, wrong, sleep=lambda _: None)
    try:
        with pytest.raises(GitLabAPIError) as caught:
            await gl.get("/user")
    finally:
        gl.close()
    assert caught.value.status_code == 401
    assert wrong not in str(caught.value)
    assert len(fake_gitlab.requests) == 1  # 401 is not retried


async def test_connection_refused_is_retried_then_raised_without_token() -> None:
    # A port nobody listens on: bind one, read it, close it.
    fake = FakeGitLab().start()
    url = fake.url
    fake.stop()
    sleeps: list[float] = []
    gl = GitLabClient(url, "glpat-secret-value", max_retries=2, sleep=sleeps.append)
    try:
        with pytest.raises(GitLabAPIError) as caught:
            await gl.get("/user")
    finally:
        gl.close()
    assert caught.value.status_code is None
    assert "glpat-secret-value" not in str(caught.value)
    assert len(sleeps) == 2


async def test_paginate_follows_next_page(fake_gitlab: FakeGitLab, client: GitLabClient) -> None:
    project = fake_gitlab.add_project("acme/many")
    issue = fake_gitlab.add_issue(project)
    for n in range(5):
        fake_gitlab.add_note(project, "issues", issue["iid"], f"note {n}")
    path = f"/projects/{project['id']}/issues/{issue['iid']}/notes"
    bodies = [n["body"] async for n in client.paginate(path, {"sort": "asc"}, per_page=2)]
    assert bodies == [f"note {n}" for n in range(5)]
    assert [r.query["page"] for r in fake_gitlab.requests] == ["1", "2", "3"]


def test_project_path_encodes_namespaces() -> None:
    assert project_path(42) == "42"
    assert project_path("group/sub/proj") == "group%2Fsub%2Fproj"


def test_empty_token_is_refused() -> None:
    with pytest.raises(ForgeError):
        GitLabClient("https://gitlab.example.com", "")


async def test_read_timeout_on_get_is_retried(fake_gitlab: FakeGitLab, sleeps: list[float]) -> None:
    fake_gitlab.slow("/user", 1.0)
    gl = GitLabClient(fake_gitlab.url, fake_gitlab.token, timeout=0.2, sleep=sleeps.append)
    try:
        user = await gl.get("/user")
    finally:
        gl.close()
    assert user["id"] == fake_gitlab.bot["id"]
    assert len(sleeps) == 1


async def test_read_timeout_on_post_is_not_retried(
    fake_gitlab: FakeGitLab, sleeps: list[float]
) -> None:
    # The first POST may already have been applied: resending could post the note twice.
    project = fake_gitlab.add_project("acme/t")
    issue = fake_gitlab.add_issue(project)
    path = f"/projects/{project['id']}/issues/{issue['iid']}/notes"
    fake_gitlab.slow(path, 1.0, method="POST")
    gl = GitLabClient(fake_gitlab.url, fake_gitlab.token, timeout=0.2, sleep=sleeps.append)
    try:
        with pytest.raises(GitLabAPIError) as caught:
            await gl.post(path, {"body": "once"})
    finally:
        gl.close()
    assert "Timeout" in str(caught.value)
    assert sleeps == []
