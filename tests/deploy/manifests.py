"""Render the kustomize overlays under deploy/ and look objects up in the result (test helper)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
# dev: the default values (scripted engine, in-cluster Postgres/Redis); production: the
# production-like ones (managed databases, pinned digest, larger limits)
OVERLAYS = ("dev", "production")

Manifest = dict[str, Any]


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(overlay: str) -> list[Manifest]:
    """`kubectl kustomize deploy/overlays/<overlay>` as a list of objects."""
    binary = kubectl()
    assert binary is not None
    out = subprocess.run(
        [binary, "kustomize", str(DEPLOY_DIR / "overlays" / overlay)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_text(overlay: str) -> str:
    return yaml.safe_dump_all(render(overlay), sort_keys=False)


def one(objects: list[Manifest], kind: str, name: str) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    """(name, pod spec) of every workload that runs pods."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]
        elif obj["kind"] == "CronJob":
            yield obj["metadata"]["name"], obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def all_containers(pod: Manifest) -> list[Manifest]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}
