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


def parse_repo_config(text: str) -> dict[str, Any]:
    """Validate the file's shape (pure). Unknown keys are ignored; bad values raise SpecError."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise SpecError(f"{CONFIG_FILE} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{CONFIG_FILE} must be a mapping at the top level")
    errors: list[str] = []
    out: dict[str, Any] = {}
    engine = data.get("engine")
    if engine is not None:
        if isinstance(engine, str) and engine:
            out["engine"] = engine
        else:
            errors.append("engine: must be an engine id such as codex or scripted")
    out["models"] = _str_map(data.get("models"), "models", errors)
    labels = _str_map(data.get("labels"), "labels", errors)
    bad_labels = [k for k, v in labels.items() if v not in ("plan", "auto", "")]
    errors += [f"labels.{k}: must be plan, auto or empty" for k in bad_labels]
    out["labels"] = {k: v for k, v in labels.items() if k not in bad_labels}
    permissions = _str_map(data.get("permissions"), "permissions", errors)
    bad_perms = [k for k, v in permissions.items() if v not in LEVELS]
    errors += [f"permissions.{k}: must be one of {', '.join(LEVELS)}" for k in bad_perms]
    out["permissions"] = {k: v for k, v in permissions.items() if k not in bad_perms}
    policies = data.get("policies") or {}
    if not isinstance(policies, Mapping):
        errors.append("policies: must be a mapping")
        policies = {}
    if "qa_policy" in policies and policies["qa_policy"] not in QA_POLICIES:
        errors.append(f"policies.qa_policy: must be one of {', '.join(QA_POLICIES)}")
    for key in ("max_tokens", "max_tokens_per_step", "max_fix_attempts", "max_inline_depth"):
        value = policies.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            errors.append(f"policies.{key}: must be a whole number, 0 or more")
    if "ci_gates" in policies and not isinstance(policies["ci_gates"], bool):
        errors.append("policies.ci_gates: must be true or false")
    par = policies.get("max_parallel_steps")
    if par is not None and (
        not isinstance(par, int) or isinstance(par, bool) or not 1 <= par <= 32
    ):
        errors.append("policies.max_parallel_steps: must be a whole number from 1 to 32")
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
