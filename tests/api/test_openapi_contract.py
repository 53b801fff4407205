"""The OpenAPI document is valid, and the API it describes never answers 5xx to what it allows.

schemathesis generates requests from the document itself (paths, parameters, bodies) and sends
them through starlette's TestClient to the real app on SQLite and the test Redis; the only check
is that no answer is a server error. Bounded by examples and a deadline per example.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from sqlalchemy import create_engine, update
from starlette.testclient import TestClient

from bot.storage.models import Project
from bot.web.api.table import OPERATIONS, api_routes, build_openapi
from bot.web.app import create_app
from tests.api.seed import seed
from tests.conftest import make_settings
from tests.gitutil import make_origin

AUTH = {"Authorization": "Bearer api-test-token-0123456789"}
SENT = {
    "method",
    "url",
    "headers",
    "params",
    "json",
    "content",
    "data",
    "files",
}  # no cookies: none are generated


def test_openapi_document_is_valid() -> None:
    validate(build_openapi())  # raises OpenAPIValidationError naming the bad node


def test_routes_and_document_come_from_one_table() -> None:
    routes = {
        (method.lower(), str(getattr(route, "path", "")).replace(":int", ""))
        for route in api_routes()
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
    }
    described = {(m, p) for p, ops in build_openapi()["paths"].items() for m in ops}
    assert (
        routes - {("get", "/api/openapi.json")}
        == described
        == {(op.method, op.path) for op in OPERATIONS}
    )


@pytest.fixture
def app_client(tmp_path: Path, sqlite_url: str, redis_url: str) -> Iterator[TestClient]:
    # a real origin: a 502 for the seed's missing remote would be a true answer, not a server bug
    ids = seed(sqlite_url)
    origin = make_origin(tmp_path)
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            update(Project).where(Project.id == ids["project"]).values(git_url=str(origin))
        )
    engine.dispose()
    settings_ = make_settings(tmp_path, db_url=sqlite_url, redis_url=redis_url)
    with TestClient(
        create_app(settings_, embedded_worker=False), raise_server_exceptions=False
    ) as client:
        yield client


schema = schemathesis.openapi.from_dict(build_openapi())


@schema.parametrize()
@settings(
    max_examples=8,
    deadline=5000,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_never_answers_5xx(case: Any, app_client: TestClient) -> None:
    # the request as schemathesis serializes it, sent through the running app's TestClient (whose
    # lifespan opened the database and Redis), then judged by schemathesis's server-error check
    kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=AUTH)
    sent = {k: v for k, v in kwargs.items() if k in SENT}
    if isinstance(sent.get("data"), bytes | str):  # raw bodies go as `content` for httpx
        sent["content"] = sent.pop("data")
    response = app_client.request(**sent)
    assert response.status_code < 500, (kwargs["method"], kwargs["url"], response.text[:300])
    case.validate_response(response, checks=[not_a_server_error])
