"""Request limits (issue 20, point 15): JSON nesting capped on every endpoint that reads JSON,
header and body read deadlines that drop slow connections, run through `deksdenflow serve`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from bot.core.jsonlimits import MAX_JSON_DEPTH, too_deep
from bot.web.app import create_app
from tests.conftest import free_port, make_settings
from tests.faults.conftest import ROOT
from tests.intake.helpers import github_headers, gitlab_headers

DEEP = b'{"a":' * 2000 + b"1" + b"}" * 2000
API_TOKEN = "api-test-token-0123456789"
CI_TOKEN = "ci-hook-token-0123456789"


@pytest.mark.parametrize(
    ("body", "deep"),
    [
        (b"{}", False),
        (b"[" * 512 + b"]" * 512, False),
        (b"[" * 513 + b"]" * 513, True),
        (json.dumps({"s": "[" * 5000}).encode(), False),  # brackets inside a string do not nest
        (json.dumps({"s": '\\"[' * 600}).encode(), False),
        (b"[" * 600, True),
        (b"[]" * 5000, False),  # many brackets, shallow
    ],
)
def test_too_deep(body: bytes, deep: bool) -> None:
    assert too_deep(body) is deep
    assert MAX_JSON_DEPTH == 512


def test_2000_deep_json_is_400_on_every_json_endpoint(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, db_url=sqlite_url, webhook_token=CI_TOKEN)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        answers = {
            "github": client.post("/webhooks/github", content=DEEP, headers=github_headers(DEEP)),
            "gitlab": client.post("/webhooks/gitlab", content=DEEP, headers=gitlab_headers()),
            "ci": client.post(
                "/webhooks/ci", content=DEEP, headers={"X-DeksdenFlow-Token": CI_TOKEN}
            ),
            "api": client.post(
                "/api/projects", content=DEEP, headers={"Authorization": f"Bearer {API_TOKEN}"}
            ),
        }
    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(answers, 400)
    for answer in answers.values():
        assert "deeper than 512" in answer.text


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """`deksdenflow serve` with its defaults (SQLite, in-process queue): (port, pid)."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DEKSDENFLOW_")},
        "DEKSDENFLOW_DATA_DIR": str(tmp_path / "data"),
        "DEKSDENFLOW_ENGINE": "scripted",
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "serve.log"
            ).read_text()
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _slowloris(port: int, n: int, seconds: float) -> int:
    """n connections that trickle a byte every 2 s; how many the server closed within `seconds`."""
    streams = []
    for i in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if i % 2:  # headers that never end
            writer.write(b"POST /webhooks/github HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        else:  # complete headers, then a body that never ends
            writer.write(
                b"POST /api/projects HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n{"
            )
        streams.append((reader, writer))
    closed: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(closed) < n:
        for i, (reader, writer) in enumerate(streams):
            if i in closed:
                continue
            if reader.at_eof() or writer.is_closing():
                closed.add(i)
                continue
            try:
                writer.write(b"X" if i % 2 else b" ")
                await writer.drain()
            except (ConnectionError, OSError):
                closed.add(i)
        await asyncio.sleep(2)
        for i, (reader, _writer) in enumerate(streams):  # an EOF or a reset counts as dropped
            if i not in closed:
                try:
                    await asyncio.wait_for(reader.read(65536), timeout=0.001)
                except TimeoutError:
                    continue
                except (ConnectionError, OSError):
                    pass
                if reader.at_eof():
                    closed.add(i)
    for _reader, writer in streams:
        writer.close()
    return len(closed)


def test_slow_connections_are_dropped_by_the_deadline(served: tuple[int, int]) -> None:
    port, pid = served
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    baseline = open_fds(pid)
    dropped = asyncio.run(_slowloris(port, 300, seconds=30))
    assert dropped == 300
    deadline = time.monotonic() + 10
    while open_fds(pid) > baseline + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_fds(pid) <= baseline + 2
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
