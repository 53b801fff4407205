"""Repository onboarding: the starter files protocols need, and writing them into a checkout."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bot.core.errors import GitError

ASSETS = Path(__file__).resolve().parent / "assets" / "onboarding"
HOOKS: tuple[str, ...] = ("bootstrap", "lint", "typecheck", "test", "build")
SETUP_BRANCH = "deksdenflow-setup"
CONFIG_FILE = ".deksdenflow.yml"
GITHUB_WORKFLOW = ".github/workflows/deksdenflow-ci.yml"
GITLAB_CI = ".gitlab-ci.yml"


@dataclass(frozen=True)
class StarterFile:
    """One file `setup` adds: where it goes, its text, and whether it must be executable."""

    path: str
    content: str
    executable: bool = False


def hook_path(hook: str) -> str:
    return f"scripts/ci/{hook}.sh"


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def starter_files() -> tuple[StarterFile, ...]:
    """Every starter file, in the order they are reported (pure apart from reading the assets)."""
    files = [
        StarterFile(CONFIG_FILE, _asset("deksdenflow.yml")),
        StarterFile(".protocols/README.md", _asset("protocols-README.md")),
    ]
    files += [StarterFile(hook_path(h), _asset(f"ci/{h}.sh"), executable=True) for h in HOOKS]
    files.append(StarterFile("scripts/ci/report.sh", _asset("ci/report.sh"), executable=True))
    files.append(StarterFile(GITHUB_WORKFLOW, _asset("github-workflow.yml")))
    files.append(StarterFile(GITLAB_CI, _asset("gitlab-ci.yml")))
    return tuple(files)


def starter_paths() -> list[str]:
    return [f.path for f in starter_files()]


def missing_starter_files(present: Iterable[str]) -> list[StarterFile]:
    """The starter files whose path is not in `present` (pure)."""
    have = set(present)
    return [f for f in starter_files() if f.path not in have]


def pr_body(paths: Iterable[str], discovery: list[str] | None) -> str:
    """The setup PR/MR description: what was added and what to review."""
    lines = [
        "DeksdenFlow setup: the files protocols and CI need. Nothing already in the repository "
        "is changed.",
        "",
        "Added:",
        *[f"- `{p}`" for p in paths],
        "",
        "CI runs `scripts/ci/{bootstrap,lint,typecheck,test,build}.sh` and prints `skip` for a "
        "hook that is missing or not executable, so the pipeline stays green until they are "
        "filled in.",
    ]
    if discovery is not None:
        lines += [
            "",
            "CI discovery filled in the hooks for the detected stack; review these changes:",
            *([f"- `{p}`" for p in discovery] or ["- (discovery changed nothing)"]),
        ]
    return "\n".join(lines) + "\n"


# -- writing into a local checkout ----------------------------------------------------------


@dataclass
class LocalSetupReport:
    """What `write_starter_files` did."""

    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)  # each with `<path>.bak` beside it
    warnings: list[str] = field(default_factory=list)
    initialized: bool = False
    discovery_changed: list[str] | None = None
    discovery_branch: str | None = None


def write_file(root: Path, item: StarterFile) -> None:
    target = root / item.path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(item.content, encoding="utf-8")
    if item.executable:
        target.chmod(target.stat().st_mode | 0o755)


def write_starter_files(root: Path, *, force: bool = False) -> LocalSetupReport:
    """Write the starter files under `root`; existing files are kept unless `force` (then backed
    up)."""
    report = LocalSetupReport()
    for item in starter_files():
        target = root / item.path
        if target.exists() or target.is_symlink():
            if not force:
                report.kept.append(item.path)
                continue
            backup = target.with_name(target.name + ".bak")
            # a second --force must not lose the user's original: keep the first backup
            if not backup.exists():
                shutil.copy2(target, backup, follow_symlinks=False)
            report.overwritten.append(item.path)
        else:
            report.created.append(item.path)
        write_file(root, item)
    return report


async def git(root: Path, *args: str, check: bool = True) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "git",
        "-C",
        str(root),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
    )
    out, _ = await proc.communicate()
    text = out.decode("utf-8", "replace")
    if check and proc.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed in {root}: {text.strip()}")
    return int(proc.returncode or 0), text


async def is_git_repo(root: Path) -> bool:
    code, out = await git(root, "rev-parse", "--is-inside-work-tree", check=False)
    return code == 0 and out.strip() == "true"


async def repo_warnings(root: Path, base: str) -> list[str]:
    """Warnings for a checkout that protocols cannot use yet: no origin, no base branch."""
    warnings: list[str] = []
    code, _ = await git(root, "remote", "get-url", "origin", check=False)
    if code != 0:
        warnings.append(
            "no `origin` remote: protocols push their branches to origin; add one with "
            "`git remote add origin <url>`"
        )
    code, _ = await git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{base}", check=False)
    if code != 0:
        warnings.append(
            f"base branch {base!r} does not exist yet: commit the setup files on it "
            f"(`git add -A && git commit -m 'chore: DeksdenFlow setup'`)"
        )
    return warnings
