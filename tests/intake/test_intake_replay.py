"""Replay-safe intake (issue 20, point 7): a signed body replayed under a new delivery id is the
same object version (its semantic key), answered `duplicate`, stored and enqueued once."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot.handlers.sansio import github_delivery, gitlab_delivery
from bot.web.app import create_app
from tests.conftest import GITHUB_SECRET, GITLAB_SECRET, LiveServer, make_settings
from tests.intake.helpers import github_headers, gitlab_headers, rows

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def comment(updated_at: str = "2026-11-30T08:00:00Z", comment_id: int = 4242) -> bytes:
    payload = {
        "action": "created",
        "issue": {
            "id": 1,
            "number": 7,
            "title": "Add a README",
            "body": "please",
            "updated_at": updated_at,
        },
        "comment": {
            "id": comment_id,
            "body": "/plan",
            "user": {"login": "alice", "type": "User"},
            "created_at": "2026-11-30T08:00:00Z",
            "updated_at": updated_at,
        },
        "repository": {
            "full_name": "acme/widgets",
            "clone_url": "https://github.com/acme/widgets.git",
        },
        "sender": {"login": "alice", "type": "User"},
        "installation": {"id": 42},
    }
    return json.dumps(payload).encode()


async def _post_all(url: str, requests: list[tuple[bytes, dict[str, str]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(*[http.post(url, content=b, headers=h) for b, h in requests])


def test_replay_under_a_new_delivery_id_is_a_duplicate(
    tmp_path: Path, db_url: str, redis_url: str, live_server: type[LiveServer]
) -> None:
    settings = make_settings(tmp_path, db_url=db_url, redis_url=redis_url)
    body = comment()
    with live_server(create_app(settings, embedded_worker=False)) as server:
        url = server.url + "/webhooks/github"
        first = httpx.post(url, content=body, headers=github_headers(body))
        replay = httpx.post(
            url, content=body, headers=github_headers(body)
        )  # a fresh X-GitHub-Delivery
        assert (first.status_code, first.json()["status"]) == (202, "accepted")
        assert (replay.status_code, replay.json()["status"]) == (200, "duplicate")
        assert replay.json()["id"] == first.json()["id"]
        # an edit is a new version of the comment, another comment is another object
        edited = comment(updated_at="2026-11-30T08:05:00Z")
        other = comment(comment_id=4243)
        for new in (edited, other):
            answer = httpx.post(url, content=new, headers=github_headers(new))
            assert (answer.status_code, answer.json()["status"]) == (202, "accepted")
        # the same replay many times at once, each under its own id: one row between them
        storm = comment(comment_id=4244)
        answers = asyncio.run(_post_all(url, [(storm, github_headers(storm)) for _ in range(30)]))
        statuses = sorted(a.json()["status"] for a in answers)
        assert statuses.count("accepted") == 1 and statuses.count("duplicate") == 29
        assert len({a.json()["id"] for a in answers}) == 1
    assert len(rows(db_url, "SELECT id FROM webhook_deliveries")) == 4


def test_gitlab_note_replayed_with_a_new_idempotency_key_is_a_duplicate(
    tmp_path: Path, db_url: str, redis_url: str, live_server: type[LiveServer]
) -> None:
    settings = make_settings(tmp_path, db_url=db_url, redis_url=redis_url)
    note = json.dumps(
        {
            "object_kind": "note",
            "object_attributes": {
                "id": 9,
                "note": "/plan",
                "updated_at": "2026-11-30 08:00:00 UTC",
            },
        }
    ).encode()
    with live_server(create_app(settings, embedded_worker=False)) as server:
        url = server.url + "/webhooks/gitlab"
        a = httpx.post(url, content=note, headers=gitlab_headers(key=str(uuid.uuid4())))
        b = httpx.post(url, content=note, headers=gitlab_headers(key=str(uuid.uuid4())))
    assert (a.status_code, b.status_code) == (202, 200)
    assert b.json()["status"] == "duplicate"


def _sample(provider: str, case: str) -> bytes:
    return (SAMPLES / provider / case / "body").read_bytes()


@pytest.mark.parametrize(
    ("event", "case", "expected"),
    [
        (
            "issue_comment",
            "issue_comment_created",
            "issue_comment:created:492700400:2019-05-15T15:20:21Z:::",
        ),
        ("issues", "issues_labeled", "issues:labeled:444500041:2019-05-15T15:20:18Z:bug::"),
        (
            "pull_request",
            "pull_request_closed",
            "pull_request:closed:279147437:2019-05-15T15:21:18Z::ec26c3e57ca3a959ca5aad62de7213c562f8c821:",
        ),
        (
            "workflow_run",
            "workflow_run_completed",
            "workflow_run:completed:289782451:2020-10-05T16:33:49Z::3484a3fb816e0859fd6e1cea078d76385ff50625:1",
        ),
        (
            "check_suite",
            "check_suite_completed",
            "check_suite:completed:118578147:2019-05-15T15:21:14Z::ec26c3e57ca3a959ca5aad62de7213c562f8c821:",
        ),
        ("check_run", "check_run_requested_action", None),
        ("installation", "installation_created", None),
    ],
)
def test_github_semantic_keys(event: str, case: str, expected: str | None) -> None:
    body = _sample("github", case)
    headers = {k.lower(): v for k, v in github_headers(body, event=event).items()}
    assert github_delivery(headers, body, GITHUB_SECRET).semantic_key == expected


def test_gitlab_semantic_keys() -> None:
    found: dict[str, Any] = {}
    index = json.loads((SAMPLES / "gitlab" / "index.json").read_text())
    for entry in index if isinstance(index, list) else index.values():
        if not isinstance(entry, dict) or "file" not in entry:
            continue
        body = (SAMPLES / "gitlab" / entry["file"]).read_bytes()
        event = entry.get("x_gitlab_event_header", "")
        found[entry["file"]] = gitlab_delivery(
            gitlab_headers(event), body, GITLAB_SECRET
        ).semantic_key
    notes = {k: v for k, v in found.items() if k.startswith("note_hook")}
    assert notes and all(v and v.startswith("note hook:") for v in notes.values())
    assert len(set(notes.values())) == len(notes)


def test_odd_shapes_have_no_semantic_key() -> None:
    for payload in (
        {"comment": "x", "action": "created"},
        {"comment": {"id": True, "updated_at": 5}},
        {"comment": {"id": 1}},
    ):
        body = json.dumps(payload).encode()
        headers = {k.lower(): v for k, v in github_headers(body).items()}
        assert github_delivery(headers, body, GITHUB_SECRET).semantic_key is None
