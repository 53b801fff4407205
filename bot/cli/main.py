"""The `deksdenflow` command line: serve, worker, migrate, and the local protocol commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from bot.cli import doctor, report
from bot.cli import gitlab as cli_gitlab
from bot.cli import onboard as cli_setup
from bot.cli import protocol as cli_protocol
from bot.core.errors import ConfigError, DeksdenFlowError
from bot.core.settings import Settings, external_file_env, load_settings
from bot.domain import doctor_results
from bot.jobs.worker import run_worker
from bot.storage.migrate import upgrade_head
from bot.storage.reachability import database_error, is_database_error, ping_database
from bot.web.serving import private_umask, serve

Command = Callable[[argparse.Namespace, Settings], int]
_COMMANDS: dict[str, Command] = {}
_EXTENSIONS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    port = args.port if args.port is not None else settings.port
    _require_database(settings)
    return serve(settings, host=args.host, port=port, demo=args.demo)


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    results = asyncio.run(doctor.run_checks(settings, offline=args.offline))
    print(doctor_results.to_json(results) if args.json else doctor_results.render(results))
    return doctor_results.exit_code(results)


def _doctor_config_error(args: argparse.Namespace, exc: ConfigError) -> int:
    results = [doctor_results.config_error_result(exc)]
    print(doctor_results.to_json(results) if args.json else doctor_results.render(results))
    return 1


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    if settings.memory_queue:
        print(
            "DEKSDENFLOW_REDIS_URL is memory:// (in-process queue): `serve` runs its own worker; "
            "set a redis:// URL to run separate workers.",
            file=sys.stderr,
        )
        return 2
    private_umask()
    _require_database(settings)
    run_worker(settings)
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    upgrade_head(settings.database_url)
    print("database is at the latest migration", file=sys.stderr)
    return 0


def _require_database(settings: Settings) -> None:
    """Stop with one line naming DB_URL when the database does not answer (Postgres only: a
    SQLite file is created on first use)."""
    import asyncio

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
    serve.add_argument(
        "--port", type=int, default=None, help="port to bind (default DEKSDENFLOW_PORT, 8000)"
    )
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
    doctor = sub.add_parser(
        "doctor", help="check the install: settings, database, queue, engine, forges, public URL"
    )
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")
    doctor.add_argument(
        "--offline", action="store_true", help="skip the model call (still checks the binary)"
    )
    doctor.set_defaults(handler=_doctor, on_config_error=_doctor_config_error)

    cli_protocol.add_commands(sub)

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
        on_config_error = getattr(args, "on_config_error", None)
        if on_config_error is not None:  # `doctor` reports it as its first failed check
            result: int = on_config_error(args, exc)
            return result
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    # git reads its CA bundle from the environment (GIT_SSL_CAINFO = http.sslCAInfo), and so do
    # the git commands of every job this process runs
    os.environ.update(settings.git_env())
    try:
        os.environ.update(external_file_env(os.environ))
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
        if not is_database_error(exc):
            raise
        # a database that is down is a setting to check, not a 180-line traceback
        print(f"error: {database_error(settings, exc)}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
