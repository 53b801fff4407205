"""Webhook intake over HTTP: signatures, limits, bad bodies, samples, dedupe, health."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from bot.handlers.sansio import github_delivery
from bot.web.app import create_app
from tests.conftest import GITHUB_SECRET, LiveServer, make_settings
from tests.intake.helpers import comment_body, github_headers, gitlab_headers, rows, sign

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def count(client: TestClient) -> int:
    return len(rows(client.db_url, "SELECT id FROM webhook_deliveries"))  # type: ignore[attr-defined]


def wait_status(url: str, delivery_id: int, wanted: set[str], timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        found = rows(url, f"SELECT status FROM webhook_deliveries WHERE id = {int(delivery_id)}")
        status = found[0][0] if found else ""
        if status in wanted:
            return status
        time.sleep(0.05)
    return status


def test_valid_github_delivery_is_accepted_stored_and_processed(client: TestClient) -> None:
    body = comment_body()
    headers = github_headers(body, delivery="d-1")
    res = client.post("/webhooks/github", content=body, headers=headers)
    assert res.status_code == 202
    data = res.json()
    assert data["delivery"] == "d-1" and data["status"] == "accepted"
    assert wait_status(client.db_url, data["id"], {"processed"}) == "processed"  # type: ignore[attr-defined]
    events = rows(client.db_url, "SELECT event_type, delivery_id FROM events")  # type: ignore[attr-defined]
    assert ("delivery.received", data["id"]) in [tuple(e) for e in events]


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "sha256=",
        "sha256=deadbeef",
        "sha1=0123456789abcdef0123456789abcdef01234567",
        "garbage",
    ],
)
def test_bad_or_missing_signature_is_401_and_nothing_stored(
    client: TestClient, signature: str | None
) -> None:
    body = comment_body()
    headers = github_headers(body)
    if signature is None:
        del headers["X-Hub-Signature-256"]
    else:
        headers["X-Hub-Signature-256"] = signature
    res = client.post("/webhooks/github", content=body, headers=headers)
    assert res.status_code == 401
    assert count(client) == 0


def test_signature_of_another_body_is_rejected(client: TestClient) -> None:
    body = comment_body()
    headers = github_headers(body)
    res = client.post("/webhooks/github", content=body + b" ", headers=headers)
    assert res.status_code == 401
    assert count(client) == 0


def test_gitlab_wrong_token_is_401(client: TestClient) -> None:
    headers = gitlab_headers()
    headers["X-Gitlab-Token"] = "nope"
    res = client.post("/webhooks/gitlab", content=b"{}", headers=headers)
    assert res.status_code == 401
    del headers["X-Gitlab-Token"]
    assert client.post("/webhooks/gitlab", content=b"{}", headers=headers).status_code == 401
    assert count(client) == 0


def test_unconfigured_secret_answers_503_naming_the_variable(
    tmp_path: Path, sqlite_url: str
) -> None:
    settings = make_settings(
        tmp_path, db_url=sqlite_url, github_webhook_secret=None, gitlab_webhook_secret=None
    )
    with TestClient(create_app(settings)) as c:
        body = comment_body()
        res = c.post("/webhooks/github", content=body, headers=github_headers(body))
        assert res.status_code == 503
        assert "DEKSDENFLOW_GITHUB_WEBHOOK_SECRET" in res.json()["error"]
        res = c.post("/webhooks/gitlab", content=b"{}", headers=gitlab_headers())
        assert res.status_code == 503
        assert "DEKSDENFLOW_GITLAB_WEBHOOK_SECRET" in res.json()["error"]
    assert rows(sqlite_url, "SELECT id FROM webhook_deliveries") == []


@pytest.mark.parametrize("body", [b"not json", b"{", b"[1, 2]", b'"text"', b"null", b"\xff\xfe"])
def test_malformed_body_is_400(client: TestClient, body: bytes) -> None:
    res = client.post("/webhooks/github", content=body, headers=github_headers(body))
    assert res.status_code == 400
    res = client.post("/webhooks/gitlab", content=body, headers=gitlab_headers())
    assert res.status_code == 400
    assert count(client) == 0


def test_declared_oversize_body_is_413_without_reading(client: TestClient) -> None:
    body = b"{}"
    headers = github_headers(body)
    headers["Content-Length"] = str(26 * 1024 * 1024)
    res = client.post("/webhooks/github", content=body, headers=headers)
    assert res.status_code == 413


def test_streamed_oversize_body_is_413_as_soon_as_it_passes_the_limit(
    tmp_path: Path, sqlite_url: str, live_server: type[LiveServer]
) -> None:
    settings = make_settings(tmp_path, db_url=sqlite_url, max_body_bytes=64 * 1024)
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(1000):  # 4 MB if fully read
            sent.append(i)
            yield b" " * 4096

    with live_server(create_app(settings)) as server, httpx.Client(timeout=10) as http:
        try:
            res = http.post(
                server.url + "/webhooks/github", content=chunks(), headers=github_headers(b"")
            )
            assert res.status_code == 413
        except httpx.HTTPError:
            pass  # the server may close the connection mid-upload; either way it stopped reading
    assert rows(sqlite_url, "SELECT id FROM webhook_deliveries") == []


async def test_body_reader_stops_pulling_chunks_past_the_limit() -> None:
    from starlette.requests import Request

    from bot.core.errors import WebhookError
    from bot.web.app import read_body_limited

    pulled = 0

    async def receive() -> dict[str, object]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 1024, "more_body": pulled < 10_000}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(WebhookError) as err:
        await read_body_limited(request, 8 * 1024)
    assert err.value.status_code == 413
    assert pulled == 9  # 9 KiB read, then it gave up: the other 9,991 chunks were never pulled


def test_25_mb_default_limit(client: TestClient) -> None:
    body = b'{"a": "' + b"x" * (25 * 1024 * 1024) + b'"}'
    res = client.post("/webhooks/github", content=body, headers=github_headers(body))
    assert res.status_code == 413


def test_unknown_event_is_ignored_with_202(client: TestClient) -> None:
    body = b'{"zen": "x"}'
    res = client.post("/webhooks/github", content=body, headers=github_headers(body, event="star"))
    assert res.status_code == 202
    assert res.json()["status"] == "ignored"
    res = client.post(
        "/webhooks/gitlab", content=b'{"object_kind": "push"}', headers=gitlab_headers("Push Hook")
    )
    assert res.status_code == 202 and res.json()["status"] == "ignored"


def test_github_ping_answers_200(client: TestClient) -> None:
    body = b'{"zen": "Keep it logically awesome.", "hook_id": 1}'
    res = client.post("/webhooks/github", content=body, headers=github_headers(body, event="ping"))
    assert res.status_code == 200
    assert res.json()["status"] == "pong"


def test_sequential_duplicates_answer_200_duplicate(client: TestClient) -> None:
    body = comment_body()
    headers = github_headers(body, delivery="same-id")
    first = client.post("/webhooks/github", content=body, headers=headers)
    second = client.post("/webhooks/github", content=body, headers=headers)
    assert first.status_code == 202 and first.json()["status"] == "accepted"
    assert second.status_code == 200 and second.json()["status"] == "duplicate"
    assert second.json()["id"] == first.json()["id"]
    assert count(client) == 1


def test_gitlab_dedupe_by_idempotency_key_then_body_hash(client: TestClient) -> None:
    body = b'{"object_kind": "note", "object_attributes": {"note": "/status"}}'
    a = client.post("/webhooks/gitlab", content=body, headers=gitlab_headers(key="k-1"))
    b = client.post("/webhooks/gitlab", content=body, headers=gitlab_headers(key="k-1"))
    assert (a.status_code, b.status_code) == (202, 200)
    c = client.post("/webhooks/gitlab", content=body, headers=gitlab_headers())
    d = client.post("/webhooks/gitlab", content=body, headers=gitlab_headers())
    assert (c.status_code, d.status_code) == (202, 200)
    assert d.json()["delivery"].startswith("sha256:")
    assert count(client) == 2


def _github_samples() -> list[Path]:
    return (
        sorted(p for p in (SAMPLES / "github").iterdir() if p.is_dir())
        if (SAMPLES / "github").exists()
        else []
    )


@pytest.mark.parametrize("sample", _github_samples(), ids=lambda p: p.name)
def test_recorded_github_deliveries(client: TestClient, sample: Path) -> None:
    headers = json.loads((sample / "headers.json").read_text())
    body = (sample / "body").read_bytes()
    headers["X-Hub-Signature-256"] = sign(body)
    res = client.post("/webhooks/github", content=body, headers=headers)
    if headers["X-GitHub-Event"] == "ping":
        assert res.status_code == 200
        return
    assert res.status_code == 202, res.text
    data = res.json()
    assert data["delivery"] == headers["X-GitHub-Delivery"]
    if data["status"] == "accepted":
        db_url = client.db_url  # type: ignore[attr-defined]
        assert wait_status(db_url, data["id"], {"processed", "ignored"}) in {"processed", "ignored"}


def _gitlab_samples() -> list[tuple[str, Path]]:
    index = SAMPLES / "gitlab" / "index.json"
    if not index.exists():
        return []
    return [
        (e["x_gitlab_event_header"], SAMPLES / "gitlab" / e["file"])
        for e in json.loads(index.read_text())
    ]


@pytest.mark.parametrize(
    "event,sample", _gitlab_samples(), ids=lambda v: v.name if isinstance(v, Path) else v
)
def test_gitlab_documentation_examples(client: TestClient, event: str, sample: Path) -> None:
    body = sample.read_bytes()
    res = client.post(
        "/webhooks/gitlab", content=body, headers=gitlab_headers(event, key=sample.name)
    )
    assert res.status_code == 202, res.text
    data = res.json()
    if data["status"] == "accepted":
        assert wait_status(client.db_url, data["id"], {"processed", "ignored"}) == "processed"  # type: ignore[attr-defined]


ODD_SHAPES: list[object] = [
    {},
    {"action": None},
    {"action": 5, "issue": None, "comment": "x"},
    {"action": "created", "comment": {"body": None, "user": None}, "repository": []},
    {"action": ["created"], "repository": {"full_name": 12}, "sender": {"login": {"x": 1}}},
    {"installation": "abc", "issue": {"number": "7"}, "pull_request": {"number": None}},
]


@pytest.mark.parametrize("payload", ODD_SHAPES)
@pytest.mark.parametrize(
    "event",
    ["issue_comment", "issues", "pull_request", "check_suite", "workflow_run", "installation"],
)
def test_any_github_payload_shape_never_5xx(
    client: TestClient, payload: object, event: str
) -> None:
    body = json.dumps(payload).encode()
    res = client.post("/webhooks/github", content=body, headers=github_headers(body, event=event))
    assert res.status_code == 202
    db_url = client.db_url  # type: ignore[attr-defined]
    done = wait_status(db_url, res.json()["id"], {"processed", "ignored", "failed"})
    assert done == "processed"


@pytest.mark.parametrize(
    "payload", [*ODD_SHAPES, {"object_attributes": None}, {"object_attributes": {"action": 3}}]
)
@pytest.mark.parametrize(
    "event", ["Note Hook", "Issue Hook", "Merge Request Hook", "Pipeline Hook"]
)
def test_any_gitlab_payload_shape_never_5xx(
    client: TestClient, payload: object, event: str
) -> None:
    body = json.dumps(payload).encode()
    res = client.post("/webhooks/gitlab", content=body, headers=gitlab_headers(event))
    assert res.status_code == 202
    db_url = client.db_url  # type: ignore[attr-defined]
    done = wait_status(db_url, res.json()["id"], {"processed", "ignored", "failed"})
    assert done == "processed"


def test_health_ready_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    body = comment_body()
    client.post("/webhooks/github", content=body, headers=github_headers(body))
    text_ = client.get("/metrics").text
    accepted = (
        'deksdenflow_deliveries_total{event="issue_comment",provider="github",status="accepted"}'
    )
    assert f"{accepted} 1.0" in text_
    assert "deksdenflow_intake_seconds_bucket" in text_
    assert "deksdenflow_queue_depth" in text_


def test_readyz_names_the_failing_queue(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, db_url=sqlite_url, redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings, embedded_worker=False)) as c:
        res = c.get("/readyz")
        assert res.status_code == 503
        assert "queue" in res.json()["failing"]
        assert "database" not in res.json()["failing"]


def test_a_handler_reads_an_integer_beyond_64_bits_exactly() -> None:
    """A forge's id past 2**64 (or a crafted one) reaches the handlers as the same integer,
    never rounded to a float."""
    big = 2**70 + 1
    body = json.dumps({"action": "created", "comment": {"id": big}, "n": 1.5}).encode()
    delivery = github_delivery(github_headers(body), body, GITHUB_SECRET)
    assert delivery.payload["comment"]["id"] == big
    assert delivery.payload["n"] == 1.5
