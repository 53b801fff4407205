"""Structured logs with secret redaction and context ids, and Prometheus metrics."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Ids that travel with a log record when known: set by the intake, the worker and the jobs.
_log_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "log_context", default=None
)
_CONTEXT_KEYS = ("delivery_id", "job_id", "job", "project_id", "protocol_run_id", "step_run_id")
REDACTED = "[redacted]"


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    merged = {**(_log_context.get() or {}), **{k: v for k, v in values.items() if v is not None}}
    token = _log_context.set(merged)
    try:
        yield
    finally:
        _log_context.reset(token)


class RedactingFilter(logging.Filter):
    """Replaces every configured secret in a record's final message (and args) by a marker."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # short values would redact ordinary words; real secrets are long
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_log_context.get() or {}).items():
            setattr(record, key, value)
        if self.secrets:
            record.msg = self.redact(record.getMessage())
            record.args = None
            if record.exc_info:
                record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                data[key] = value
        if record.exc_text:
            data["exc"] = record.exc_text
        elif record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = " ".join(
            f"{key}={getattr(record, key)}"
            for key in _CONTEXT_KEYS
            if getattr(record, key, None) is not None
        )
        return f"{base} [{ctx}]" if ctx else base


def configure_logging(level: str, json_logs: bool, secrets: Iterable[str]) -> None:
    """Install one stderr handler on the root logger; idempotent for repeated app factories."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_deksdenflow", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._deksdenflow = True  # type: ignore[attr-defined]
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RedactingFilter(secrets))
    root.addHandler(handler)
    root.setLevel(level)
    # library chatter at INFO (httpx per request, arq per job) drowns our own lines
    for noisy in ("httpx", "httpcore", "arq.worker", "arq.jobs", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class Metrics:
    """The service's Prometheus metrics in their own registry (one per app instance)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "deksdenflow_deliveries_total",
            "Webhook deliveries by provider, event and intake status",
            ["provider", "event", "status"],
            registry=self.registry,
        )
        self.intake_latency = Histogram(
            "deksdenflow_intake_seconds",
            "Time from request start to answer for webhook deliveries",
            ["provider"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.jobs = Counter(
            "deksdenflow_jobs_total",
            "Jobs by name and outcome",
            ["job", "outcome"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "deksdenflow_queue_depth", "Jobs waiting in the arq queue", registry=self.registry
        )
        self.queue_in_progress = Gauge(
            "deksdenflow_queue_in_progress", "Jobs being run by workers", registry=self.registry
        )
        # KEDA scales the workers on this one (arq's queue is a sorted set, which KEDA's Redis
        # list scaler cannot read): jobs due now plus jobs running, so busy workers are kept
        self.queue_demand = Gauge(
            "deksdenflow_queue_demand",
            "Jobs due now plus jobs running: the worker autoscaler's input",
            registry=self.registry,
        )
        # labels() validates and locks on every call; the intake counts every request, so it
        # keeps the few children it uses (bounded by provider × event × status).
        self._delivery_children: dict[tuple[str, str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def count_delivery(self, provider: str, event: str, status: str) -> None:
        key = (provider, event, status)
        child = self._delivery_children.get(key)
        if child is None:
            child = self._delivery_children[key] = self.deliveries.labels(provider, event, status)
        child.inc()

    def observe_intake(self, provider: str, seconds: float) -> None:
        child = self._latency_children.get(provider)
        if child is None:
            child = self._latency_children[provider] = self.intake_latency.labels(provider)
        child.observe(seconds)
