"""Fixtures for the GitHub adapter tests: an app key, a fake clock, recorded sleeps, respx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bot.forge.github import GitHubForge, github_time
from bot.forge.github_client import GitHubClient

API = "https://api.github.com"
APP_ID = 4242
INSTALLATION_ID = 77
NOW = 1_700_000_000.0
TOKEN = "ghs_installationtokenSECRET1"


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SleepRecorder:
    """An injectable sleep that records the delays and returns at once."""

    def __init__(self, clock: FakeClock) -> None:
        self.delays: list[float] = []
        self._clock = clock

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self._clock.now += seconds


def token_response(
    token: str = TOKEN, expires_in: float = 3600, now: float = NOW
) -> httpx.Response:
    return httpx.Response(201, json={"token": token, "expires_at": github_time(now + expires_in)})


@pytest.fixture(scope="session")
def private_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="session")
def public_key(private_key: str) -> str:
    key = serialization.load_pem_private_key(private_key.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeps(clock: FakeClock) -> SleepRecorder:
    return SleepRecorder(clock)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=API, assert_all_called=False) as router:
        yield router


@pytest.fixture
async def client(
    private_key: str, clock: FakeClock, sleeps: SleepRecorder
) -> AsyncIterator[GitHubClient]:
    async with GitHubClient(app_id=APP_ID, private_key=private_key, sleep=sleeps, clock=clock) as c:
        yield c


@pytest.fixture
async def forge(client: GitHubClient, clock: FakeClock) -> GitHubForge:
    return GitHubForge(client, app_slug="deksdenflow", clock=clock)


@pytest.fixture
def token_route(mock: respx.MockRouter) -> respx.Route:
    return mock.post(f"/app/installations/{INSTALLATION_ID}/access_tokens").mock(
        return_value=token_response()
    )


@pytest.fixture
def make_token() -> Callable[..., httpx.Response]:
    """Builds access_tokens answers (test modules cannot import this conftest)."""
    return token_response
