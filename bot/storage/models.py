"""SQLAlchemy 2 typed models: projects, protocol runs, steps, events, deliveries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; Postgres wants BIGINT for the busy tables.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base for every table."""


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    provider: Mapped[str] = mapped_column(String(16), default="local")  # github|gitlab|local
    git_url: Mapped[str] = mapped_column(Text)
    base_branch: Mapped[str] = mapped_column(String(255), default="main")
    ci_provider: Mapped[str | None] = mapped_column(String(32), nullable=True)
    default_models: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # write-only through the API; never rendered, logged or passed to an engine
    secrets: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    installation_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    forge_id: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class ProtocolRun(Base):
    __tablename__ = "protocol_runs"
    __table_args__ = (
        UniqueConstraint("project_id", "protocol_name", name="uq_protocol_runs_project_name"),
        Index("ix_protocol_runs_project_status", "project_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    protocol_name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32), default="pending")
    base_branch: Mapped[str] = mapped_column(String(255), default="main")
    worktree_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    protocol_root: Mapped[str | None] = mapped_column(Text, nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    template_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    template_source: Mapped[str | None] = mapped_column(String(64), nullable=True)
    runtime_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    issue_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pr_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pr_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    head_sha: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    approved: Mapped[bool] = mapped_column(Boolean, default=False)
    auto_mode: Mapped[bool] = mapped_column(Boolean, default=False)
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0)
    # USD at the configured prices when the tokens were spent (bot/domain/pricing.py)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class StepRun(Base):
    __tablename__ = "step_runs"
    __table_args__ = (
        UniqueConstraint("protocol_run_id", "step_index", name="uq_step_runs_protocol_index"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    protocol_run_id: Mapped[int] = mapped_column(
        ForeignKey("protocol_runs.id", ondelete="CASCADE"), index=True
    )
    step_index: Mapped[int] = mapped_column(Integer)
    step_name: Mapped[str] = mapped_column(String(255))
    step_type: Mapped[str] = mapped_column(String(32), default="work")
    status: Mapped[str] = mapped_column(String(32), default="pending")
    retries: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    engine_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    runtime_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)
    tokens_used: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_protocol_id", "protocol_run_id", "id"),
        Index("ix_events_project_id", "project_id", "id"),
        Index("ix_events_type_id", "event_type", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    protocol_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    delivery_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    # `metadata` is reserved on declarative classes, so the attribute has another name
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("provider", "delivery_key", name="uq_deliveries_provider_key"),
        Index("ix_deliveries_status_id", "status", "id"),
        # a replay under a new delivery id is the same object version (NULLs never collide)
        Index("uq_deliveries_provider_semantic", "provider", "semantic_key", unique=True),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(16))
    delivery_key: Mapped[str] = mapped_column(String(255))
    semantic_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    event: Mapped[str] = mapped_column(String(64))
    action: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # pending (durable, not yet on the queue) → queued → processed | ignored | failed
    status: Mapped[str] = mapped_column(String(16), default="pending")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # the raw body as received: kept verbatim so a replay sees exactly what the forge sent
    payload: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    outcome: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # `processing` is a lease: held by one job (`claimed_by`) until `lease_until`, renewed
    # while it works; the relay takes back an expired one (its worker died)
    claimed_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ForgeRecord(Base):
    """What the Local forge 'posts': comments, draft PRs, checks, reactions."""

    __tablename__ = "forge_records"
    __table_args__ = (UniqueConstraint("project_id", "kind", "key", name="uq_forge_records_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(255))
    body: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class AuthSession(Base):
    """A server-side secret handed to a browser: a console session or a one-time setup state.

    Only the SHA-256 of the value is stored, so a copy of the database signs nobody in.
    """

    __tablename__ = "auth_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # console | setup_state
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class StoredSecret(Base):
    """A secret every process needs (the GitHub App's key), Fernet-encrypted at rest."""

    __tablename__ = "stored_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class TranscriptChunk(Base):
    """A batch of an engine turn's JSONL events, redacted, as written by the transcript recorder.

    Events are stored as the engine read them (one JSON object a line) and turned into display
    items when read: the engine's reading loop then pays almost nothing per event.
    """

    __tablename__ = "transcript_chunks"
    __table_args__ = (
        Index("ix_transcript_step_id", "step_run_id", "id"),
        Index("ix_transcript_protocol_id", "protocol_run_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    protocol_run_id: Mapped[int] = mapped_column(Integer)
    # None for protocol-level turns (planning, decomposition)
    step_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    phase: Mapped[str] = mapped_column(String(16))
    lines: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
