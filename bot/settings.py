"""Configuration: one pydantic-settings object, built at start-up, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.errors import ConfigError

ENV_PREFIX = "DEKSDENFLOW_"


class Settings(BaseSettings):
    """Every knob of the service; env names are `DEKSDENFLOW_<FIELD>` in upper case."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore", frozen=True
    )

    # storage
    db_url: str | None = None
    db_path: Path | None = None
    data_dir: Path = Path(".deksdenflow")
    redis_url: str = "memory://"

    # tokens and secrets
    api_token: SecretStr | None = None
    webhook_token: SecretStr | None = None
    github_app_id: int | None = None
    github_private_key: SecretStr | None = None
    github_private_key_path: Path | None = None
    github_webhook_secret: SecretStr | None = None
    github_api_url: str = "https://api.github.com"
    github_app_slug: str | None = None
    gitlab_url: str = "https://gitlab.com"
    gitlab_token: SecretStr | None = None
    gitlab_webhook_secret: SecretStr | None = None

    # protocol behaviour
    engine: str = "codex"
    codex_bin: str = "codex"
    scripted_script: Path | None = None
    protocol_planning_model: str | None = None
    protocol_decompose_model: str | None = None
    protocol_exec_model: str | None = None
    protocol_qa_model: str | None = None
    protocol_discovery_model: str | None = None
    auto_qa_after_exec: bool = True
    auto_qa_on_ci: bool = True
    max_tokens_per_step: int = Field(default=0, ge=0)
    max_tokens_per_protocol: int = Field(default=0, ge=0)
    token_budget_mode: Literal["strict", "warn", "off"] = "strict"
    max_inline_trigger_depth: int = Field(default=3, ge=0, le=20)
    engine_timeout_s: float = Field(default=1800.0, gt=0)
    git_timeout_s: float = Field(default=300.0, gt=0)
    warm_worktrees: bool = True
    label_plan: str = "deksdenflow:plan"
    label_auto: str = "deksdenflow:auto"
    bot_name: str = "DeksdenFlow"
    bot_email: str = "deksdenflow@users.noreply.local"

    # intake
    max_body_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    intake_batch_max: int = Field(default=256, ge=1)
    relay_interval_s: float = Field(default=5.0, gt=0)
    delivery_retention_days: float = Field(default=30.0, ge=0)

    # worker
    worker_max_jobs: int = Field(default=10, ge=1)
    worker_poll_delay_s: float = Field(default=0.05, gt=0)
    job_timeout_s: int = Field(default=3600, ge=1)
    # SIGTERM: how long a running step may go on before it is handed back (bot/jobs/shutdown.py)
    worker_shutdown_grace_s: float = Field(default=100.0, ge=0)

    # logs
    log_json: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://", "memory://")):
            raise ValueError("must start with redis://, rediss://, unix:// or memory://")
        return value

    @field_validator("github_api_url", "gitlab_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("db_url")
    @classmethod
    def _db_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError("must be a sqlite:// or postgresql:// SQLAlchemy URL")
        return value

    # derived values -----------------------------------------------------------------

    @property
    def memory_queue(self) -> bool:
        return self.redis_url.startswith("memory://")

    @property
    def sqlite_path(self) -> Path:
        return self.db_path or (self.data_dir / "deksdenflow.sqlite3")

    @property
    def database_url(self) -> str:
        """The sync SQLAlchemy URL (Alembic); `async_database_url` is for the app."""
        if self.db_url:
            url = self.db_url
            if url.startswith("postgres://"):
                url = "postgresql://" + url[len("postgres://") :]
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://") :]
            return url
        return f"sqlite:///{self.sqlite_path}"

    @property
    def async_database_url(self) -> str:
        url = self.database_url
        if url.startswith("sqlite:///"):
            return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
        if url.startswith("sqlite://"):
            return "sqlite+aiosqlite://" + url[len("sqlite://") :]
        return url

    @property
    def github_web_url(self) -> str:
        """Where repositories live: github.com, or the Enterprise host of `GITHUB_API_URL`."""
        if self.github_api_url == "https://api.github.com":
            return "https://github.com"
        return self.github_api_url.removesuffix("/api/v3")

    def github_private_key_pem(self) -> str | None:
        if self.github_private_key is not None:
            return self.github_private_key.get_secret_value()
        if self.github_private_key_path is not None:
            return self.github_private_key_path.read_text()
        return None

    def phase_models(self) -> dict[str, str]:
        pairs = {
            "planning": self.protocol_planning_model,
            "decompose": self.protocol_decompose_model,
            "execute": self.protocol_exec_model,
            "qa": self.protocol_qa_model,
            "discovery": self.protocol_discovery_model,
        }
        return {phase: model for phase, model in pairs.items() if model}

    def secret_values(self) -> list[str]:
        """Every configured secret, so logs can redact them."""
        values: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
                if raw:
                    values.append(raw)
        return values


def _describe(error: dict[str, object]) -> str:
    loc = error.get("loc") or ()
    field = str(loc[0]) if isinstance(loc, tuple) and loc else "?"
    msg = str(error.get("msg", "invalid value"))
    return f"{ENV_PREFIX}{field.upper()}: {msg}"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; a bad value raises ConfigError with one line."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(_describe(dict(first))) from None
