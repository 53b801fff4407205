"""GitHub loop figures: comment → 👀 latency over real Redis, and GitHub requests per executed step.

    .venv/bin/python -m bench.github_flow [--deliveries 200]

(1) The app (uvicorn, 127.0.0.1) with the real Redis (db 13) and a worker task; a fake GitHub on
127.0.0.1 (the e2e tests' FakeGitHub behind starlette) records when each 👀 arrives. Time =
from the start of the delivery's POST to the reaction request reaching the fake.
(2) The e2e flow in process (respx as GitHub, a bare origin): the requests one `/run-step` made,
split into the handler's (permission, 👀) and the execute_step job's own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis as redis_sync
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import LiveServer, make_settings
from tests.github_e2e.conftest import GitHubLoop, sign
from tests.github_e2e.fake_github import APP_ID, APP_SLUG, FakeGitHub

REDIS_URL = "redis://127.0.0.1:6379/13"


def fake_github_app(fake: FakeGitHub) -> Starlette:
    async def endpoint(request: Request) -> Response:
        body = await request.body()
        raw = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        status, headers, data = fake.handle(
            request.method, raw, request.headers.get("authorization"), body
        )
        return JSONResponse(data, status_code=status, headers=headers)

    methods = ["GET", "POST", "PATCH", "PUT", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def comment_to_eyes(deliveries: int, key: str, tmp: Path) -> None:
    redis_sync.Redis.from_url(REDIS_URL).flushdb()
    fake = FakeGitHub(str(tmp / "unused.git"))
    arrived: dict[int, float] = {}
    seen = threading.Condition()

    def on_call(call: Any) -> None:
        if (
            call.method == "POST"
            and call.path.endswith("/reactions")
            and call.body == {"content": "eyes"}
        ):
            with seen:
                arrived[int(call.path.split("/")[-2])] = time.perf_counter()
                seen.notify_all()

    fake.on_call = on_call
    with LiveServer(fake_github_app(fake)) as github:
        settings = make_settings(
            tmp,
            db_url=f"sqlite:///{tmp / 'bench.sqlite3'}",
            redis_url=REDIS_URL,
            github_app_id=APP_ID,
            github_private_key=key,
            github_app_slug=APP_SLUG,
            github_api_url=github.url,
            worker_poll_delay_s=0.01,
            log_level="WARNING",
        )
        from bot.web.app import create_app

        with (
            LiveServer(create_app(settings, embedded_worker=True)) as app,
            httpx.Client(base_url=app.url) as client,
        ):
            loop = GitHubLoop.__new__(GitHubLoop)  # only for its payload builders
            loop.origin = tmp / "unused.git"
            loop._comment_ids = iter(range(10_000, 100_000))
            latencies: list[float] = []
            for i in range(
                deliveries + 5
            ):  # the first 5 warm up (token, first project, connections)
                payload = loop.comment("/help", comment_id=20_000 + i)
                body = json.dumps(payload).encode()
                started = time.perf_counter()
                response = client.post(
                    "/webhooks/github",
                    content=body,
                    headers={
                        "X-GitHub-Event": "issue_comment",
                        "X-GitHub-Delivery": f"bench-{i}-{time.time_ns()}",
                        "X-Hub-Signature-256": sign(body),
                        "Content-Type": "application/json",
                    },
                )
                assert response.status_code == 202, response.text
                with seen:
                    if not seen.wait_for(lambda i=i: 20_000 + i in arrived, timeout=10):  # type: ignore[misc]
                        raise SystemExit(f"no 👀 for delivery {i}")
                if i >= 5:
                    latencies.append((arrived[20_000 + i] - started) * 1000)
    print(f"comment → 👀 over real Redis ({REDIS_URL}), {len(latencies)} deliveries, sequential:")
    print(
        f"  p50 {percentile(latencies, 0.5):.1f} ms  p95 {percentile(latencies, 0.95):.1f} ms  "
        f"max {max(latencies):.1f} ms  mean {statistics.mean(latencies):.1f} ms   "
        "(goal p95 < 300 ms)"
    )
    redis_sync.Redis.from_url(REDIS_URL).flushdb()


def requests_per_step(key: str, tmp: Path) -> None:
    import respx
    from starlette.testclient import TestClient

    from bot.web.app import create_app
    from tests.github_e2e.conftest import make_origin

    origin = make_origin(tmp)
    fake = FakeGitHub(str(origin))
    with respx.mock(base_url="https://api.github.com", assert_all_called=False) as mock:
        mock.route().mock(side_effect=fake.respx_handler)
        settings = make_settings(
            tmp,
            db_url=f"sqlite:///{tmp / 'flow.sqlite3'}",
            github_app_id=APP_ID,
            github_private_key=key,
            github_app_slug=APP_SLUG,
            auto_qa_after_exec=False,
            relay_interval_s=59,
            log_level="WARNING",
        )
        with TestClient(create_app(settings)) as client:
            gh = GitHubLoop(client, fake, origin)
            gh.deliver("installation", gh.installation_created())
            gh.deliver("issue_comment", gh.comment("/plan"))
            gh.deliver("issue_comment", gh.comment("/approve"))
            for step in (1, 2):
                mark = fake.mark()
                gh.deliver("issue_comment", gh.comment(f"/run-step {step}"))
                calls = fake.since(mark)
                handler = calls[:2]
                job = calls[2:]
                tokens = sum(1 for c in calls if c.path.endswith("/access_tokens"))
                print(
                    f"step {step:02d}: {len(calls)} GitHub requests for the delivery = "
                    f"{len(handler)} handler (permission, 👀) + {len(job)} execute_step "
                    f"(incl. {tokens} token fetches)   (goal ≤ 6 per executed step)"
                )
                for c in job:
                    print(f"    {c.method:5} {c.path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=200)
    args = parser.parse_args()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        comment_to_eyes(args.deliveries, pem, Path(one))
        requests_per_step(pem, Path(two))


if __name__ == "__main__":
    main()
