"""Usage report: numbers per project from a database with a few runs, HTML with an SVG chart,
PDF."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from bot.cli.main import main
from bot.cli.report import build_report, render_html, write_report
from bot.core.errors import ConfigError
from bot.domain.states import ProtocolStatus, StepStatus
from tests.api.seed import seed, sync_url
from tests.console.test_console import CHROMIUM


def test_numbers_per_project(db_url: str) -> None:
    seed(db_url, runs=3, status=ProtocolStatus.COMPLETED)
    seed(db_url, project="other/repo", runs=1, status=ProtocolStatus.FAILED)
    report = build_report(sync_url(db_url))
    by_name = {p.name: p for p in report.projects}
    acme = by_name["acme/widgets"]
    assert acme.runs == 3 and acme.run_status == {ProtocolStatus.COMPLETED: 3}
    assert acme.steps == 6 and acme.step_status == {StepStatus.COMPLETED: 3, StepStatus.PENDING: 3}
    # run n, step i passes when n + i is even: (1,1) (2,2) (3,1) pass of six
    assert (acme.qa_pass, acme.qa_fail) == (3, 3) and acme.qa_pass_rate == 0.5
    assert acme.ci_attempts == 1 + 2 + 3
    assert acme.tokens == 6000
    assert acme.run_minutes == [30.0, 30.0, 30.0]
    assert acme.step_minutes == [5.0] * 6
    assert sum(acme.tokens_by_day.values()) == 6000
    assert by_name["other/repo"].runs == 1

    only = build_report(sync_url(db_url), project="other/repo")
    assert [p.name for p in only.projects] == ["other/repo"]
    recent = build_report(sync_url(db_url), project="acme/widgets", since=date(2026, 11, 3))
    assert recent.projects[0].runs == 2 and recent.projects[0].tokens == 5000
    with pytest.raises(ConfigError):
        build_report(sync_url(db_url), project="missing")


def test_html_has_table_and_chart(sqlite_url: str, tmp_path: Path) -> None:
    seed(sqlite_url, project="<b>x</b>")
    document = render_html(build_report(sqlite_url))
    assert "<svg" in document and "<rect" in document
    assert "&lt;b&gt;x&lt;/b&gt;" in document and "<b>x</b>" not in document
    assert "QA pass rate" in document
    with pytest.raises(ConfigError):
        write_report(build_report(sqlite_url), tmp_path / "r.txt")


def test_empty_database(sqlite_url: str) -> None:
    document = render_html(build_report(sqlite_url))
    assert "No projects" in document and "No runs" in document


def test_cli_writes_html(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(sqlite_url)
    monkeypatch.setenv("DEKSDENFLOW_DB_URL", sqlite_url)
    monkeypatch.setenv("DEKSDENFLOW_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "out" / "report.html"
    assert (
        main(["report", "--since", "2026-11-01", "--project", "acme/widgets", "--out", str(out)])
        == 0
    )
    assert "acme/widgets" in out.read_text()
    with pytest.raises(SystemExit):
        main(["report", "--since", "yesterday", "--out", str(out)])


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_pdf_via_headless_chromium(sqlite_url: str, tmp_path: Path) -> None:
    seed(sqlite_url)
    out = write_report(build_report(sqlite_url), tmp_path / "report.pdf", CHROMIUM)
    data = out.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 5_000


def test_money_per_project(sqlite_url: str) -> None:
    from sqlalchemy import create_engine, update
    from sqlalchemy.orm import Session

    from bot.storage.models import ProtocolRun

    seed(sqlite_url, runs=2, status=ProtocolStatus.COMPLETED)
    engine = create_engine(sync_url(sqlite_url))
    with Session(engine) as session, session.begin():
        session.execute(update(ProtocolRun).values(cost_usd=1.25))
    engine.dispose()
    report = build_report(sync_url(sqlite_url))
    assert report.projects[0].cost_usd == pytest.approx(2.5)
    document = render_html(report)
    assert "<th>Cost</th>" in document and "$2.50" in document and "$1.25" in document
