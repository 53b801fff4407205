"""Starlette app factory: webhooks, health, metrics; clients held by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from bot.core.observability import Metrics, configure_logging
from bot.core.settings import Settings
from bot.domain.doctor_results import INSTANCE_HEADER, instance_fingerprint
from bot.domain.security import is_loopback_bind
from bot.handlers.router import Router
from bot.handlers.routes import build_router
from bot.handlers.sansio import LowerCaseHeaders
from bot.jobs.common import JOB_METRICS_KEY
from bot.jobs.demo import start_demo
from bot.jobs.services import build_services, close_services
from bot.jobs.worker import build_worker, stop_embedded_worker
from bot.storage.app_credentials import read_app_credentials
from bot.storage.db import Database, database_from_settings
from bot.storage.health import write_problems
from bot.storage.intake import DeliveryStore, relay_outbox
from bot.storage.migrate import upgrade_head
from bot.storage.queue import JobSpec, create_redis, enqueue_many, queue_stats
from bot.storage.reachability import which_is_down
from bot.storage.secretbox import private_dir
from bot.web.api.table import api_routes
from bot.web.console import console_routes
from bot.web.console_deliveries import delivery_routes, server_error
from bot.web.console_steps import step_routes
from bot.web.edge import ClientGone, WebhookEdge, read_body, webhook_edges
from bot.web.github_app import setup_routes

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """Everything the routes use, built in the lifespan from the settings."""

    settings: Settings
    metrics: Metrics
    router: Router
    db: Database | None = None
    redis: ArqRedis | None = None
    store: DeliveryStore | None = None
    worker_task: asyncio.Task[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    services: dict[str, Any] | None = None

    def handles(self, provider: str, event: str) -> bool:
        """`router.handles`, remembered per (provider, event): it scans every handler per call."""
        cache: dict[tuple[str, str], bool] = self.extra.setdefault("handles_cache", {})
        key = (provider, event)
        found = cache.get(key)
        if found is None:
            found = self.router.handles(provider, event)
            if len(cache) < 1024:  # event names come from signed headers; stay bounded anyway
                cache[key] = found
        return found

    async def services_ctx(self) -> dict[str, Any]:
        """A job-like ctx (db, redis, engines, git, forges) for API actions, built on first use."""
        if self.services is None:
            ctx: dict[str, Any] = {"settings": self.settings, "db": self.db, "redis": self.redis}
            ctx.update(self.extra.get("worker_ctx", {}))
            await build_services(ctx)
            self.services = ctx
        return self.services


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.df
    return state


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The edge's body reader for starlette routes (413 as soon as the body passes `limit`)."""
    try:
        return await read_body(LowerCaseHeaders(request.headers.items()), request.receive, limit)
    except ClientGone:
        raise ClientDisconnect() from None


async def healthz(request: Request) -> Response:
    instance = state_of(request).extra.get("instance")
    # the header lets `doctor` tell this instance from any server answering at PUBLIC_URL
    headers = {INSTANCE_HEADER: instance} if instance else {INSTANCE_HEADER: "-"}
    return JSONResponse({"status": "ok"}, headers=headers)


async def readyz(request: Request) -> Response:
    state = state_of(request)
    problems: dict[str, str] = {}
    try:
        assert state.db is not None
        await asyncio.wait_for(state.db.ping(), timeout=2)
    except Exception as exc:
        problems["database"] = type(exc).__name__
    try:
        assert state.redis is not None
        await asyncio.wait_for(state.redis.ping(), timeout=2)
    except Exception as exc:
        problems["queue"] = type(exc).__name__
    if "database" not in problems:
        assert state.db is not None
        problems.update(await write_problems(state.db, state.settings.data_dir))
    if problems:
        return JSONResponse({"status": "unavailable", "failing": problems}, status_code=503)
    return JSONResponse({"status": "ready"})


async def database_unavailable(request: Request, exc: Exception) -> Response:
    """Any database error a route did not handle: one line and 503 (retry later), never a 500."""
    log.warning(
        "%s %s: database error: %s",
        request.method,
        request.url.path,
        str(exc).splitlines()[0][:300],
    )
    return JSONResponse(
        {"error": "the database is unavailable; try again shortly"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def database_errors() -> dict[Any, Any]:
    """Starlette exception handlers for every kind of database failure."""
    import sqlite3

    import psycopg
    from sqlalchemy.exc import SQLAlchemyError

    return {cls: database_unavailable for cls in (SQLAlchemyError, psycopg.Error, sqlite3.Error)}


async def metrics(request: Request) -> Response:
    state = state_of(request)
    if state.redis is not None:
        with contextlib.suppress(Exception):
            stats = await asyncio.wait_for(queue_stats(state.redis), timeout=2)
            state.metrics.queue_depth.set(stats.depth)
            state.metrics.queue_in_progress.set(stats.in_progress)
            state.metrics.queue_demand.set(stats.demand)
            counts: dict[Any, Any] = await state.redis.hgetall(JOB_METRICS_KEY)  # type: ignore[misc]
            for raw_key, raw_value in counts.items():
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                name, _, outcome = key.partition("|")
                counter = state.metrics.jobs.labels(name, outcome)
                # the Redis hash is the cross-process truth; bring the local counter up to it
                delta = int(raw_value) - counter._value.get()
                if delta > 0:
                    counter.inc(delta)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def routes(edges: dict[str, WebhookEdge]) -> list[BaseRoute]:
    return [
        # DeksdenflowApp hands these POSTs to the edges before starlette sees them; the routes
        # are here so that other methods get starlette's 405, as on any other route
        Route("/webhooks/github", edges["/webhooks/github"], methods=["POST"]),
        Route("/webhooks/gitlab", edges["/webhooks/gitlab"], methods=["POST"]),
        Route("/webhooks/ci", edges["/webhooks/ci"], methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        *api_routes(),
        *console_routes(),
        *step_routes(),
        *delivery_routes(),
        *setup_routes(),
    ]


class DeksdenflowApp(Starlette):
    """Starlette, with the two webhook POST routes served by the plain-ASGI edge.

    The edge lives in bot/web/edge.py.
    """

    edges: dict[str, WebhookEdge]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            edge = self.edges.get(scope["path"])
            if edge is not None:
                scope["app"] = self
                await edge(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    embedded_worker: bool | None = None,
    demo_port: int | None = None,
    bind_host: str | None = None,
) -> Starlette:
    """The ASGI app. `embedded_worker` defaults to True for the in-process (memory://) queue.

    `bind_host` is where `serve` listens: without an API token, the API and console stay closed
    unless that is a loopback address.
    """
    state = AppState(settings=settings, metrics=Metrics(), router=build_router())

    state.extra["instance"] = instance_fingerprint(settings)
    if bind_host is not None and settings.api_token is None:
        state.extra["api_closed"] = not is_loopback_bind(bind_host)
    run_worker = settings.memory_queue if embedded_worker is None else embedded_worker

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        configure_logging(settings.log_level, settings.log_json, settings.secret_values())
        if settings.database_url.startswith("sqlite"):
            await asyncio.to_thread(upgrade_head, settings.database_url)

        private_dir(settings.data_dir)  # 0700: keys, mirrors and the SQLite file live below
        state.db = database_from_settings(settings)
        if settings.github_webhook_secret is None:
            # an App made through /github/setup: sealed in the database, or the older file
            stored = await read_app_credentials(settings, state.db)
            if stored and stored.get("webhook_secret"):
                state.extra["github_webhook_secret"] = stored["webhook_secret"]
        state.redis = create_redis(settings)
        db, redis = state.db, state.redis

        async def on_stored(jobs: list[JobSpec]) -> None:
            await enqueue_many(redis, jobs)

        state.store = DeliveryStore(db, on_stored, batch_max=settings.intake_batch_max)
        state.store.start()
        try:
            relayed = await relay_outbox(db, redis)
            if relayed:
                log.info("relayed %d deliveries left pending by an earlier run", relayed)
        except Exception:
            down = await which_is_down(db, redis, settings)
            log.warning("%s at start; pending deliveries are relayed once it is back", down)
        if run_worker:
            worker = build_worker(
                settings, ctx={"db": db, "redis": redis, **state.extra.get("worker_ctx", {})}
            )
            state.worker_task = asyncio.create_task(worker.async_run(), name="embedded-worker")
            state.extra["worker"] = worker
        if demo_port is not None:
            # printed by `serve` once the port is bound (bot/web/serving.py), not before
            state.extra["banner"] = await start_demo(await state.services_ctx(), demo_port)
        try:
            yield
        finally:
            await state.store.stop()
            if state.services is not None:
                await close_services(state.services)
            if state.worker_task is not None:
                await stop_embedded_worker(state.extra["worker"], state.worker_task)
            await redis.aclose(close_connection_pool=True)
            await db.dispose()

    edges = webhook_edges(state)

    # database failures answer 503 (one line); anything else unhandled gets the styled page
    app = DeksdenflowApp(
        routes=routes(edges),
        lifespan=lifespan,
        exception_handlers={**database_errors(), Exception: server_error},
    )
    app.edges = edges
    app.state.df = state
    return app
