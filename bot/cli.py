"""The `deksdenflow` command line: serve, worker, migrate, and the local protocol commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from bot.errors import ConfigError, DeksdenFlowError
from bot.settings import Settings, load_settings

Command = Callable[[argparse.Namespace, Settings], int]
_COMMANDS: dict[str, Command] = {}
_EXTENSIONS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from bot.app import create_app

    _require_database(settings)
    app = create_app(settings, demo_port=args.port if args.demo else None)
    print(f"DeksdenFlow serving on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from bot.jobs.worker import run_worker

    if settings.memory_queue:
        print(
            "DEKSDENFLOW_REDIS_URL is memory:// (in-process queue): `serve` runs its own worker; "
            "set a redis:// URL to run separate workers.",
            file=sys.stderr,
        )
        return 2
    _require_database(settings)
    run_worker(settings)
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from bot.migrate import upgrade_head

    upgrade_head(settings.database_url)
    print("database is at the latest migration", file=sys.stderr)
    return 0


def _require_database(settings: Settings) -> None:
    """Stop with one line naming DB_URL when the database does not answer (Postgres only: a
    SQLite file is created on first use)."""
    import asyncio

    from bot.reachability import ping_database

    if settings.database_url.startswith("sqlite"):
        return
    problem = asyncio.run(ping_database(settings))
    if problem is not None:
        raise DatabaseUnreachable(problem)


class DatabaseUnreachable(DeksdenFlowError):
    """The database did not answer; the message names the setting to check."""


def register(name: str) -> Callable[[Command], Command]:
    def decorator(func: Command) -> Command:
        _COMMANDS[name] = func
        return func

    return decorator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deksdenflow",
        description="DeksdenFlow: run Codex protocols from GitHub, GitLab or a local repository.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the HTTP server (webhooks, API, console)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="seed a local demo repository and run one protocol on it with the scripted engine",
    )
    serve.set_defaults(handler=_serve)
    worker = sub.add_parser("worker", help="run an arq worker against DEKSDENFLOW_REDIS_URL")
    worker.set_defaults(handler=_worker)
    migrate = sub.add_parser("migrate", help="apply the database migrations (alembic upgrade head)")
    migrate.set_defaults(handler=_migrate)
    from bot import cli_gitlab, cli_protocol, cli_setup

    cli_protocol.add_commands(sub)
    from bot import report

    report.add_commands(sub)
    cli_gitlab.add_commands(sub)
    cli_setup.add_commands(sub)
    for extend in _EXTENSIONS:
        extend(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        code: int = args.handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except DeksdenFlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from bot.reachability import database_error, is_database_error

        if not is_database_error(exc):
            raise
        # a database that is down is a setting to check, not a 180-line traceback
        print(f"error: {database_error(settings, exc)}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
