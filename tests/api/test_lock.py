"""The locks: every dependency of pyproject.toml pinned (a stale lock fails here), hashes on every
pin, the test tools' lock agreeing with the image's, and CI and `make` installing from them.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", re.MULTILINE)


def pins(lock_text: str) -> dict[str, str]:
    """name → pinned version, from a pip-compile lock (pure)."""
    return {canonicalize_name(m.group(1)): m.group(2) for m in PIN.finditer(lock_text)}


def lock_gaps(requirements: Iterable[str], lock_text: str) -> list[str]:
    """What a lock lacks for these requirement strings (pure): a dependency with no pin, or a
    pin outside the specifier pyproject asks for. Requirements whose marker excludes this
    platform are skipped; extras are checked by `extra_gaps`."""
    pinned = pins(lock_text)
    gaps: list[str] = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        version = pinned.get(name)
        if version is None:
            gaps.append(f"{req.name}: not pinned")
        elif req.specifier and not req.specifier.contains(version, prereleases=True):
            gaps.append(f"{req.name}: pinned {version}, pyproject asks {req.specifier}")
    return gaps


def extra_gaps(requirements: Iterable[str], lock_text: str) -> list[str]:
    """Packages an extra (`gidgethub[httpx]`) brings that the lock does not pin, read from the
    installed distributions' metadata."""
    pinned = pins(lock_text)
    gaps: list[str] = []
    for text in requirements:
        req = Requirement(text)
        for extra in req.extras:
            for dep in importlib.metadata.requires(req.name) or []:
                sub = Requirement(dep)
                if sub.marker is None or not sub.marker.evaluate({"extra": extra}):
                    continue
                if canonicalize_name(sub.name) not in pinned:
                    gaps.append(f"{req.name}[{extra}] needs {sub.name}: not pinned")
    return gaps


def project() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"runtime": data["dependencies"], "dev": data["optional-dependencies"]["dev"]}


def test_the_runtime_lock_covers_pyproject() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    deps = project()["runtime"]
    assert lock_gaps(deps, lock) == []
    assert extra_gaps(deps, lock) == []


def test_the_dev_lock_covers_runtime_and_test_tools() -> None:
    lock = (ROOT / "requirements-dev.lock").read_text()
    deps = project()["runtime"] + project()["dev"]
    assert lock_gaps(deps, lock) == []
    assert extra_gaps(deps, lock) == []


def test_the_tests_run_on_the_versions_the_image_ships() -> None:
    runtime = pins((ROOT / "requirements.lock").read_text())
    dev = pins((ROOT / "requirements-dev.lock").read_text())
    differ = {name: (v, dev.get(name)) for name, v in runtime.items() if dev.get(name) != v}
    assert differ == {}, "requirements-dev.lock disagrees with requirements.lock; run `make lock`"


def test_every_pin_carries_hashes() -> None:
    for name in ("requirements.lock", "requirements-dev.lock", "requirements-checkov.lock"):
        text = (ROOT / name).read_text()
        blocks = re.split(r"^(?=[A-Za-z0-9_.-]+==)", text, flags=re.MULTILINE)[1:]
        assert blocks and all("--hash=sha256:" in block for block in blocks), name
        assert "--generate-hashes" in text and "--strip-extras" in text


def test_a_stale_lock_is_caught() -> None:
    lock = "starlette==0.40.0 \\\n    --hash=sha256:00\nhttpx==0.28.1 \\\n    --hash=sha256:11\n"
    assert lock_gaps(["starlette>=0.40", "httpx"], lock) == []
    # a new dependency, a raised floor, a platform-only one that applies here
    assert lock_gaps(["starlette>=0.41", "httpx", "newthing>=1"], lock) == [
        "starlette: pinned 0.40.0, pyproject asks >=0.41",
        "newthing: not pinned",
    ]
    assert lock_gaps(["winonly>=1; sys_platform == 'win32'"], lock) == []
    assert extra_gaps(["pyjwt[crypto]"], lock) == ["pyjwt[crypto] needs cryptography: not pinned"]


def test_make_and_ci_install_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements-dev.lock" in makefile
    assert "pip install --quiet --no-deps -e ." in makefile
    assert '-e ".[dev]"' not in makefile and "-e .[dev]" not in makefile
    # the venv is rebuilt when the lock changes
    assert re.search(r"^\$\(STAMP\): .*requirements-dev\.lock", makefile, re.MULTILINE)
    assert "pip install --quiet --require-hashes -r requirements-checkov.lock" in makefile
    checkov = (ROOT / "requirements-checkov.lock").read_text()
    wanted = (ROOT / "requirements-checkov.in").read_text().splitlines()
    assert lock_gaps([w for w in wanted if w.strip() and not w.startswith("#")], checkov) == []
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "pip install" not in ci  # CI installs through the Makefile
