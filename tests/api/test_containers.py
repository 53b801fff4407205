"""Container files: non-root image with git, the pinned Codex CLI and a healthcheck; a valid compose stack."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 3  # multi-stage
    assert "python:3.11-slim" in text and "USER deksdenflow" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert " git " in text
    pinned = json.loads((ROOT / "package.json").read_text())["dependencies"]["@openai/codex"]
    assert f"@openai/codex@{pinned}" in text


def test_compose_services_and_order() -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"api", "worker", "redis", "postgres", "migrate"} <= set(services)
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]


@pytest.mark.skipif(
    not (shutil.which("docker-compose") or shutil.which("docker")), reason="no compose client installed"
)
def test_compose_config_validates() -> None:
    if shutil.which("docker-compose"):
        command = ["docker-compose", "config", "-q"]
    else:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip("docker has no compose plugin")
        command = ["docker", "compose", "config", "-q"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
