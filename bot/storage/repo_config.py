"""`.deksdenflow.yml`: a repository's own settings, read from its base branch only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from sqlalchemy import update

from bot import git
from bot.core.errors import SpecError
from bot.storage.db import Database
from bot.storage.models import Project

CONFIG_FILE = ".deksdenflow.yml"
LEVELS = ("admin", "write", "read", "none")
QA_POLICIES = ("skip", "light", "full")
# applied by bot/domain/loop_policy.py (precedence: StepSpec, then this file, then the environment)
POLICY_KEYS = (
    "qa_policy",
    "max_inline_depth",
    "max_tokens",
    "max_tokens_per_step",
    "max_fix_attempts",
    "ci_gates",
    "max_parallel_steps",
)


def _str_map(value: Any, field: str, errors: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        errors.append(f"{field}: must map names to strings")
        return {}
    return dict(value)


_WHOLE_NUMBER_POLICIES = (
    "max_tokens",
    "max_tokens_per_step",
    "max_fix_attempts",
    "max_inline_depth",
)


def _load_mapping(text: str) -> Mapping[Any, Any]:
    """The file's top level as a mapping (an empty file is an empty mapping)."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{CONFIG_FILE} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{CONFIG_FILE} must be a mapping at the top level")
    return data


def _engine(value: Any, errors: list[str]) -> dict[str, str]:
    """{"engine": id} when the file names one; {} when absent or invalid (noted in errors)."""
    if value is None:
        return {}
    if isinstance(value, str) and value:
        return {"engine": value}
    errors.append("engine: must be an engine id such as codex or scripted")
    return {}


def _allowed_values(
    value: Any, field: str, allowed: tuple[str, ...], expected: str, errors: list[str]
) -> dict[str, str]:
    """A name → string map keeping only the entries whose value is in `allowed`; each other
    entry is noted in errors as `field.name: must be <expected>`."""
    mapping = _str_map(value, field, errors)
    bad = [k for k, v in mapping.items() if v not in allowed]
    errors += [f"{field}.{k}: must be {expected}" for k in bad]
    return {k: v for k, v in mapping.items() if k not in bad}


def _policies(value: Any, errors: list[str]) -> Mapping[Any, Any]:
    """The `policies` section; an absent or empty one is {}, a non-mapping one is an error."""
    policies = value or {}
    if not isinstance(policies, Mapping):
        errors.append("policies: must be a mapping")
        return {}
    return policies


def _is_count(value: Any, low: int, high: int | None = None) -> bool:
    """A whole number (never a bool, which YAML's true/false parse to) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return value >= low and (high is None or value <= high)


def _policy_problems(policies: Mapping[Any, Any]) -> list[str]:
    """What is wrong with the values of the known policies, in the order they are checked."""
    problems: list[str] = []
    if "qa_policy" in policies and policies["qa_policy"] not in QA_POLICIES:
        problems.append(f"policies.qa_policy: must be one of {', '.join(QA_POLICIES)}")
    for key in _WHOLE_NUMBER_POLICIES:
        value = policies.get(key)
        if value is not None and not _is_count(value, 0):
            problems.append(f"policies.{key}: must be a whole number, 0 or more")
    if "ci_gates" in policies and not isinstance(policies["ci_gates"], bool):
        problems.append("policies.ci_gates: must be true or false")
    par = policies.get("max_parallel_steps")
    if par is not None and not _is_count(par, 1, 32):
        problems.append("policies.max_parallel_steps: must be a whole number from 1 to 32")
    return problems


def parse_repo_config(text: str) -> dict[str, Any]:
    """Validate the file's shape (pure). Unknown keys are ignored; bad values raise SpecError."""
    data = _load_mapping(text)
    errors: list[str] = []
    out: dict[str, Any] = _engine(data.get("engine"), errors)
    out["models"] = _str_map(data.get("models"), "models", errors)
    out["labels"] = _allowed_values(
        data.get("labels"), "labels", ("plan", "auto", ""), "plan, auto or empty", errors
    )
    out["permissions"] = _allowed_values(
        data.get("permissions"), "permissions", LEVELS, f"one of {', '.join(LEVELS)}", errors
    )
    policies = _policies(data.get("policies"), errors)
    errors += _policy_problems(policies)
    out["policies"] = {k: v for k, v in policies.items() if k in POLICY_KEYS}
    out["allow_fork_commands"] = bool(
        policies.get("allow_fork_commands", data.get("allow_fork_commands", False))
    )
    if errors:
        raise SpecError(f"{CONFIG_FILE} has invalid values: " + "; ".join(errors), errors=errors)
    return out


def merged_project_values(
    project_config: Mapping[str, Any], repo: Mapping[str, Any]
) -> dict[str, Any]:
    """What a project row takes from the repository file: config keys and default models (pure)."""
    config = {**project_config, "repo": dict(repo)}
    for key in ("labels", "permissions", "allow_fork_commands", "policies"):
        config[key] = repo.get(key)
    models = dict(repo.get("models") or {})
    if repo.get("engine"):
        models["engine"] = repo["engine"]
    return {"config": config, "models": models}


async def refresh_repo_config(db: Database, project: Project, mirror: Any) -> dict[str, Any] | None:
    """Read the file from the base branch in the (freshly fetched) mirror and store it on the
    project.

    Only the base branch counts: a protocol branch, or a pull request's head, could otherwise
    change who may run commands or which engine runs.
    """
    text = await git.read_file_at(mirror, project.base_branch, CONFIG_FILE)
    repo = parse_repo_config(text or "")
    values = merged_project_values(project.config or {}, repo)
    # the operator's defaults (API, demo) stay; the repository's file wins where it speaks
    models = {**(project.default_models or {}), **values["models"]}
    async with db.sessions.begin() as session:
        await session.execute(
            update(Project)
            .where(Project.id == project.id)
            .values(config=values["config"], default_models=models)
        )
    project.config = values["config"]
    project.default_models = models
    return repo
