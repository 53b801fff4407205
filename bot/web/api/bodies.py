"""Request bodies of the operator API (pydantic): they validate input and describe it in OpenAPI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bot.domain.security import (
    ref_name_problem,
)
from bot.web.api.core import MAX_ID

Name = Field(min_length=1, max_length=255)


def _check_branch(value: str | None) -> str | None:
    problem = None if value is None else ref_name_problem(value)
    if problem:
        raise ValueError(f"base_branch {problem}")
    return value


class ProjectCreate(BaseModel):
    """A new project. `secrets` are stored and never returned."""

    model_config = ConfigDict(extra="forbid")
    name: str = Name
    provider: Literal["github", "gitlab", "local"] = "local"
    git_url: str = Field(min_length=1, max_length=4000)
    base_branch: str = Field(default="main", min_length=1, max_length=255)
    ci_provider: str | None = Field(default=None, max_length=32)
    default_models: dict[str, str] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    installation_id: int | None = Field(default=None, ge=0)
    forge_id: str | None = Field(default=None, max_length=255)
    enabled: bool = True

    _branch = field_validator("base_branch")(_check_branch)


class ProjectUpdate(BaseModel):
    """Fields to change; `secrets` merge (a null value deletes that secret)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=255)
    git_url: str | None = Field(default=None, min_length=1, max_length=4000)
    base_branch: str | None = Field(default=None, min_length=1, max_length=255)
    ci_provider: str | None = Field(default=None, max_length=32)
    default_models: dict[str, str] | None = None
    secrets: dict[str, str | None] | None = None
    config: dict[str, Any] | None = None
    enabled: bool | None = None

    _branch = field_validator("base_branch")(_check_branch)


class ProtocolCreate(BaseModel):
    """Create a protocol run for a task and start its planning."""

    model_config = ConfigDict(extra="forbid")
    project_id: int = Field(ge=1, le=MAX_ID)
    task: str = Field(min_length=1, max_length=2000)
    auto: bool = False
    issue_number: int | None = Field(default=None, ge=1, le=MAX_ID)
    issue_body: str = Field(default="", max_length=60000)


class ActionBody(BaseModel):
    """Optional action arguments: the step number for run/rerun/run_qa/approve."""

    model_config = ConfigDict(extra="forbid")
    step: int | None = Field(default=None, ge=0, le=10000)


# --- projects --------------------------------------------------------------------------------


class CodeMachineImport(BaseModel):
    """A CodeMachine workspace sent as text.

    A server-side path would let callers read the server's files.
    """

    files: dict[str, str] = Field(max_length=2000, description="repository path → file text")
    workflow: str | None = Field(default=None, max_length=255, description="workflow file or name")
    engine: str | None = Field(default=None, max_length=255)
    auto: bool = False
