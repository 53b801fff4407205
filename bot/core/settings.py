"""Configuration: one pydantic-settings object, built at start-up, never at import."""

from __future__ import annotations

import os
import ssl
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from bot.core.errors import ConfigError
from bot.core.urls import host_of

ENV_PREFIX = "DEKSDENFLOW_"
# Settings that are not SecretStr but may still carry a password (a URL with userinfo): they
# accept `…_FILE` like the secrets do.
FILE_FIELDS_EXTRA = frozenset({"db_url", "redis_url"})


def _is_secret_field(info: FieldInfo) -> bool:
    annotation = info.annotation
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def file_fields(settings_cls: type[BaseSettings]) -> list[str]:
    """The settings that also accept `DEKSDENFLOW_<NAME>_FILE` (docker / Kubernetes secrets)."""
    return sorted(
        name
        for name, info in settings_cls.model_fields.items()
        if _is_secret_field(info) or name in FILE_FIELDS_EXTRA
    )


def _env_lookup(environ: typing.Mapping[str, str], name: str) -> str | None:
    # Settings are case-insensitive, so the _FILE variables are too.
    wanted = name.upper()
    for key, value in environ.items():
        if key.upper() == wanted:
            return value
    return None


class SecretFileSource(PydanticBaseSettingsSource):
    """`DEKSDENFLOW_<NAME>_FILE=/run/secrets/x` reads the value of <NAME> from that file.

    The file's content is taken whole, less one trailing newline (what `echo` and most secret
    stores leave); an empty file counts as unset. Setting both the variable and its _FILE twin is
    refused: which one wins would otherwise be a guess.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], environ: typing.Mapping[str, str] | None = None
    ) -> None:
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything is done in __call__

    def __call__(self) -> dict[str, Any]:
        environ = os.environ if self._environ is None else self._environ
        values: dict[str, Any] = {}
        for name in file_fields(self.settings_cls):
            var = f"{ENV_PREFIX}{name.upper()}"
            path = _env_lookup(environ, f"{var}_FILE")
            if not path:
                continue
            if _env_lookup(environ, var):
                raise ConfigError(f"{var} and {var}_FILE are both set: keep one")
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigError(
                    f"{var}_FILE: cannot read {path}: {exc.strerror or type(exc).__name__}"
                ) from None
            text = text[:-1] if text.endswith("\n") else text
            if text:  # an empty secret (compose: an unused one, /dev/null) counts as unset
                values[name] = text
        return values


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$XDG_DATA_HOME/deksdenflow, else ~/.local/share/deksdenflow (read when settings are
    built)."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_DATA_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "deksdenflow"


class Settings(BaseSettings):
    """Every knob of the service; env names are `DEKSDENFLOW_<FIELD>` in upper case."""

    # env_ignore_empty: `VAR=` (what compose's `${VAR:-}` gives) means unset, not "" — an
    # empty DEKSDENFLOW_GITHUB_APP_ID would otherwise stop a GitLab-only install from starting
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,
    )

    # storage
    db_url: str | None = None
    db_path: Path | None = None
    # per user, not per working directory: a CLI run in a repository must not leave an
    # untracked folder there (whose name would clash with committed .deksdenflow/ overrides)
    data_dir: Path = Field(default_factory=lambda: default_data_dir())
    redis_url: str = "memory://"

    # the port `serve` binds when --port is not given (the container's healthcheck reads it too)
    port: int = Field(default=8000, ge=1, le=65535)
    # how the forges reach us: https://host[:port], without a path; webhook URLs hang off it
    public_url: str | None = None
    # a PEM bundle of extra CA certificates (self-managed GitLab / GHES behind a private CA)
    ca_bundle: Path | None = None

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
    # automatic fix attempts per planned step on QA FAIL or red CI; `.deksdenflow.yml` may override
    max_fix_attempts: int = Field(default=2, ge=0, le=10)
    # whether green CI gates a step where the repository has CI; `.deksdenflow.yml` may override
    ci_gates: bool = True
    max_inline_trigger_depth: int = Field(default=3, ge=0, le=20)
    # steps of a plan graph running side by side: per protocol, and over a repository's protocols
    max_parallel_steps: int = Field(default=3, ge=1, le=32)
    max_parallel_steps_per_repo: int = Field(default=6, ge=1, le=256)
    engine_timeout_s: float = Field(default=1800.0, gt=0)
    # An unprivileged account codex and the agent's commands run as (needs root; "" = the
    # worker's own user). See the README's security section.
    engine_user: str = ""
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
    # a running step's lease: renewed by its worker, taken back by another once it expires
    lease_ttl_s: float = Field(default=60.0, gt=0)
    lease_renew_s: float = Field(default=10.0, gt=0)
    # how often a running engine checks whether /cancel or /pause stopped its protocol
    stop_poll_s: float = Field(default=0.5, gt=0)

    # security (issue #20)
    # comma-separated proxy addresses/CIDRs whose X-Forwarded-For uvicorn believes; empty: none
    trusted_proxies: str = ""
    # Fernet key for secrets at rest; unset: a key generated into <data_dir>/secret.key (0600)
    secret_key: SecretStr | None = None
    console_session_ttl_s: float = Field(default=12 * 3600.0, gt=0)

    # commands and faults (issue 20)
    command_prefix: str = Field(default="/", min_length=1, max_length=16)
    reply_rate_limit: int = Field(default=10, ge=0)  # bot replies per user and repository …
    reply_rate_window_s: int = Field(default=600, ge=1)  # … per this many seconds; 0 = no limit
    # GitLab review notes that arrive within this many seconds of each other make one fix step
    review_quiet_s: float = Field(default=5.0, ge=0)
    delivery_lease_s: float = Field(default=30.0, gt=0)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=10.0, gt=0)
    limit_concurrency: int = Field(default=1000, ge=0)  # open connections; 0 = no limit
    db_timeout_s: float = Field(default=2.5, gt=0)  # connect, statement, lock and commit deadline

    # SIGTERM: how long a running step may go on before it is handed back (bot/jobs/shutdown.py)
    worker_shutdown_grace_s: float = Field(default=100.0, ge=0)

    # logs
    log_json: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # links and money
    # PUBLIC_URL (above) is also the base of the links: check runs, commit statuses and the
    # status comment link to the console under it. None: no links.
    # {model: {input, cached_input, output}} in USD per million tokens, over bot/domain/pricing.py's
    # defaults; JSON in DEKSDENFLOW_MODEL_PRICES.
    model_prices: dict[str, dict[str, float]] = Field(default_factory=dict)

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

    @field_validator("gitlab_url")
    @classmethod
    def _gitlab_base(cls, value: str) -> str:
        # python-gitlab appends /api/v4 itself: a URL that already ends in it would be doubled
        return value.removesuffix("/api/v4").rstrip("/")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("ca_bundle")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("db_url")
    @classmethod
    def _db_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError("must be a sqlite:// or postgresql:// SQLAlchemy URL")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            SecretFileSource(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    # derived values -----------------------------------------------------------------

    @property
    def tls_verify(self) -> str | bool:
        """What requests / python-gitlab take: the CA bundle's path, or the system store."""
        return str(self.ca_bundle) if self.ca_bundle is not None else True

    def httpx_verify(self) -> ssl.SSLContext | bool:
        """What httpx takes (a path there is deprecated): a context trusting the bundle."""
        if self.ca_bundle is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def git_env(self) -> dict[str, str]:
        """Environment git needs: GIT_SSL_CAINFO is the env form of `http.sslCAInfo`."""
        return {"GIT_SSL_CAINFO": str(self.ca_bundle)} if self.ca_bundle is not None else {}

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

    @property
    def credential_hosts(self) -> frozenset[str]:
        """`host[:port]` of the configured forges: the only hosts git may send a token to."""
        hosts = {host_of(url) for url in (self.github_web_url, self.gitlab_url)}
        return frozenset(h for h in hosts if h)

    def forge_url(self, provider: str) -> str | None:
        """Where a provider's repositories live (the base of every acceptable git_url)."""
        return {"github": self.github_web_url, "gitlab": self.gitlab_url}.get(provider)

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


# Variables read by the tools we run, not by Settings, that may come from a secret file too.
EXTERNAL_FILE_VARS = ("CODEX_API_KEY",)


def external_file_env(environ: typing.Mapping[str, str]) -> dict[str, str]:
    """`CODEX_API_KEY_FILE` → `CODEX_API_KEY` (the codex CLI reads only the variable)."""
    found: dict[str, str] = {}
    for var in EXTERNAL_FILE_VARS:
        path = environ.get(f"{var}_FILE")
        if not path or environ.get(var):
            continue
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{var}_FILE: cannot read {path}: {exc.strerror}") from None
        found[var] = text[:-1] if text.endswith("\n") else text
    return found


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
