"""`deksdenflow serve`: bind the port first, run the quick doctor checks, then serve.

Binding before anything else makes a busy port one clear line (and no demo is started for a
server that cannot run); the banner is printed once uvicorn is serving on that socket.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
from typing import Any

import uvicorn

from bot.cli import doctor
from bot.core.observability import configure_logging
from bot.core.settings import Settings
from bot.domain import doctor_results
from bot.domain.security import is_loopback_bind, token_problem
from bot.web.app import create_app
from bot.web.http_limits import limit_options

log = logging.getLogger("bot.cli.doctor")


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is an IPv6 address).

    `reuse_port`: several processes each bind their own socket on the same port and the kernel
    spreads new connections over them (SO_REUSEPORT), as a balancer spreads them over replicas.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # The protocol named, not left 0: asyncio sets TCP_NODELAY only on connections whose
    # socket says IPPROTO_TCP, and without it an answer's second write (uvicorn sends the
    # headers and the body apart) waits for the client's delayed ACK, up to 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def bind_error_line(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use: stop the other server, "
            f"or choose another port (make run PORT=8081, serve --port 8081)"
        )
    return f"cannot bind {host}:{port}: {exc.strerror or exc}"


async def log_quick_checks(settings: Settings, *, demo: bool = False) -> None:
    """The cheap doctor checks (no network, no model call), logged at start."""

    configure_logging(settings.log_level, settings.log_json, settings.secret_values())
    try:
        results = await doctor.run_checks(settings, cheap=True)
    except Exception as exc:  # the checks must never stop the server from starting
        log.warning("start-up checks could not run: %s", type(exc).__name__)
        return
    for result in results:
        line = doctor_results.render_line(result).replace("\n    ", " — ")
        if demo and result.failed and result.name == "engine":
            # the demo runs on the scripted engine: a missing codex only matters later
            log.info("%s (the demo does not need it)", line)
            continue
        (log.warning if result.failed else log.info)("%s", line)


class _Server(uvicorn.Server):
    """uvicorn's server, printing our banner once it serves (after the lifespan started)."""

    banner = ""
    extra: dict[str, Any] | None = None  # the app state's extras: the demo leaves its text there

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.banner, file=sys.stderr, flush=True)
            if self.extra and self.extra.get("banner"):
                print(self.extra["banner"], flush=True)


def uvicorn_options(settings: Settings, host: str, port: int) -> dict[str, Any]:
    """uvicorn's keyword arguments for `serve` (pure).

    Forwarding headers are believed only from DEKSDENFLOW_TRUSTED_PROXIES: uvicorn's own default
    trusts 127.0.0.1, which makes any proxy or sidecar on the host a way to claim any address.
    """
    proxies = settings.trusted_proxies.strip()
    return {
        "host": host,
        "port": port,
        "log_level": "warning",
        "access_log": False,
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies or "",
    }


def private_umask() -> None:
    """Everything the service writes (mirrors, worktrees, SQLite, keys) is 0600/0700.

    Set for the long-running commands only: the local CLI commands write into the user's own
    checkout, where the user's umask is the right one.
    """
    os.umask(0o077)


def serve(settings: Settings, *, host: str, port: int, demo: bool) -> int:
    token = settings.api_token.get_secret_value() if settings.api_token else None
    problem = token_problem(token, host)
    if problem:
        print(f"configuration error: {problem}", file=sys.stderr)
        return 2
    private_umask()
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        print(bind_error_line(host, port, exc), file=sys.stderr)
        return 1
    if token is None:
        if is_loopback_bind(host):
            print(
                "no DEKSDENFLOW_API_TOKEN: the API and console answer loopback callers only",
                file=sys.stderr,
            )
        else:
            print(
                f"no DEKSDENFLOW_API_TOKEN and bound to {host}: the API and console are closed "
                "(webhooks still work); set DEKSDENFLOW_API_TOKEN to open them",
                file=sys.stderr,
            )
    asyncio.run(log_quick_checks(settings, demo=demo))
    app = create_app(settings, demo_port=port if demo else None, bind_host=host)
    options = {
        k: v for k, v in uvicorn_options(settings, host, port).items() if k not in ("host", "port")
    }
    options.update(limit_options(settings))
    config = uvicorn.Config(app, **options)
    server = _Server(config)
    server.banner = f"DeksdenFlow serving on http://{host}:{port}"
    server.extra = app.state.df.extra
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
