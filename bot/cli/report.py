"""`deksdenflow report`: per-project usage (protocols, steps, QA, CI, tokens, durations) as HTML
or PDF."""

from __future__ import annotations

import argparse
import html
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from bot.core.errors import ConfigError
from bot.core.settings import Settings
from bot.domain.pricing import fmt_cost
from bot.domain.states import PROTOCOL_TERMINAL
from bot.storage.models import Project, ProtocolRun, StepRun

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass
class ProjectUsage:
    """What one project's runs cost and how they went."""

    id: int
    name: str
    provider: str
    runs: int = 0
    run_status: Counter[str] = field(default_factory=Counter)
    steps: int = 0
    step_status: Counter[str] = field(default_factory=Counter)
    qa_pass: int = 0
    qa_fail: int = 0
    ci_attempts: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    run_minutes: list[float] = field(default_factory=list)
    step_minutes: list[float] = field(default_factory=list)
    tokens_by_day: Counter[date] = field(default_factory=Counter)

    @property
    def qa_pass_rate(self) -> float | None:
        judged = self.qa_pass + self.qa_fail
        return self.qa_pass / judged if judged else None


@dataclass
class Report:
    generated_at: datetime
    since: date | None
    projects: list[ProjectUsage]


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns; we store UTC
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _minutes(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (_aware(end) - _aware(start)).total_seconds() / 60)


def build_report(
    database_url: str, *, project: str | None = None, since: date | None = None
) -> Report:
    """Read the runs (and their steps) created since `since`, grouped by project."""
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            query = select(Project).order_by(Project.id)
            if project is not None:
                query = query.where(
                    Project.id == int(project) if project.isdigit() else Project.name == project
                )
            projects = {
                p.id: ProjectUsage(p.id, p.name, p.provider) for p in session.scalars(query)
            }
            if project is not None and not projects:
                raise ConfigError(f"no project named or numbered {project!r}")
            runs = select(
                ProtocolRun.id,
                ProtocolRun.project_id,
                ProtocolRun.status,
                ProtocolRun.tokens_used,
                ProtocolRun.cost_usd,
                ProtocolRun.runtime_state,
                ProtocolRun.created_at,
                ProtocolRun.updated_at,
            ).where(ProtocolRun.project_id.in_(list(projects)))
            if since is not None:
                runs = runs.where(
                    ProtocolRun.created_at >= datetime.combine(since, datetime.min.time(), UTC)
                )
            run_project: dict[int, int] = {}
            # streamed: a report over a busy year must not hold every row at once
            for row in session.execute(runs.execution_options(yield_per=1000)):
                usage = projects[row.project_id]
                run_project[row.id] = row.project_id
                usage.runs += 1
                usage.run_status[row.status] += 1
                usage.tokens += int(row.tokens_used or 0)
                usage.cost_usd += float(row.cost_usd or 0.0)
                usage.tokens_by_day[_aware(row.created_at).date()] += int(row.tokens_used or 0)
                state = row.runtime_state if isinstance(row.runtime_state, dict) else {}
                usage.ci_attempts += int(state.get("ci_attempts", 0) or 0)
                if row.status in PROTOCOL_TERMINAL:
                    minutes = _minutes(row.created_at, row.updated_at)
                    if minutes is not None:
                        usage.run_minutes.append(minutes)
            if run_project:
                steps = select(
                    StepRun.protocol_run_id,
                    StepRun.status,
                    StepRun.runtime_state,
                    StepRun.started_at,
                    StepRun.finished_at,
                ).where(
                    StepRun.protocol_run_id.in_(
                        runs.with_only_columns(ProtocolRun.id).scalar_subquery()
                    )
                )
                for row in session.execute(steps.execution_options(yield_per=1000)):
                    usage = projects[run_project[row.protocol_run_id]]
                    usage.steps += 1
                    usage.step_status[row.status] += 1
                    state = row.runtime_state if isinstance(row.runtime_state, dict) else {}
                    verdict = state.get("qa_verdict")
                    if verdict == "PASS":
                        usage.qa_pass += 1
                    elif verdict is not None:
                        usage.qa_fail += 1  # anything but PASS counts as FAIL
                    minutes = _minutes(row.started_at, row.finished_at)
                    if minutes is not None:
                        usage.step_minutes.append(minutes)
    finally:
        engine.dispose()
    return Report(datetime.now(UTC), since, list(projects.values()))


# --- rendering -------------------------------------------------------------------------------

PALETTE = ("#0969da", "#1a7f37", "#bf8700", "#cf222e", "#8250df", "#1b7c83", "#9a6700", "#57606a")


def _fmt_minutes(values: list[float]) -> str:
    if not values:
        return "—"
    median = statistics.median(values)
    return f"{median:.1f} min median · {max(values):.1f} max"


def _fmt_rate(rate: float | None) -> str:
    return "—" if rate is None else f"{rate * 100:.0f}%"


def tokens_chart(report: Report, width: int = 720, height: int = 260) -> str:
    """Inline SVG: tokens per day, one coloured series (stacked columns) per project."""
    days = sorted({d for p in report.projects for d in p.tokens_by_day})
    if not days:
        return '<p class="muted">No runs in this period.</p>'
    days = [days[0] + timedelta(days=i) for i in range((days[-1] - days[0]).days + 1)][-90:]
    totals = [sum(p.tokens_by_day.get(d, 0) for p in report.projects) for d in days]
    top = max(max(totals), 1)
    left, bottom, top_pad = 60, 30, 10
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    bar = plot_w / len(days)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="tokens per day">',
        f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{width - 10}" y2="{top_pad + plot_h}" '
        'stroke="#888"/>',
    ]
    for frac in (0, 0.5, 1):
        y = top_pad + plot_h - frac * plot_h
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{int(top * frac):,}</text>"
        )
    for i, day in enumerate(days):
        y = top_pad + plot_h
        for j, p in enumerate(report.projects):
            value = p.tokens_by_day.get(day, 0)
            if not value:
                continue
            h = value / top * plot_h
            y -= h
            parts.append(
                f'<rect x="{left + i * bar + 1:.1f}" y="{y:.1f}" width="{max(bar - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{PALETTE[j % len(PALETTE)]}">'
                f"<title>{html.escape(p.name)} {day}: {value:,} tokens</title></rect>"
            )
        if len(days) <= 14 or i % max(1, len(days) // 10) == 0:
            parts.append(
                f'<text x="{left + (i + 0.5) * bar:.1f}" y="{height - 10}" font-size="10" '
                f'text-anchor="middle">{day.strftime("%m-%d")}</text>'
            )
    parts.append("</svg>")
    legend = " ".join(
        f'<span><i style="background:{PALETTE[j % len(PALETTE)]}"></i>{html.escape(p.name)}</span>'
        for j, p in enumerate(report.projects)
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def render_html(report: Report) -> str:
    esc = html.escape
    since = f" since {report.since.isoformat()}" if report.since else ""
    rows = []
    for p in report.projects:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(p.run_status.items())) or "—"
        step_statuses = ", ".join(f"{k} {v}" for k, v in sorted(p.step_status.items())) or "—"
        rows.append(
            "<tr>"
            f"<td><strong>{esc(p.name)}</strong><div class=muted>{esc(p.provider)}</div></td>"
            f"<td>{p.runs}<div class=muted>{esc(statuses)}</div></td>"
            f"<td>{p.steps}<div class=muted>{esc(step_statuses)}</div></td>"
            f"<td>{_fmt_rate(p.qa_pass_rate)}"
            f"<div class=muted>{p.qa_pass} pass / {p.qa_fail} fail</div></td>"
            f"<td>{p.ci_attempts}"
            f"<div class=muted>{(p.ci_attempts / p.runs if p.runs else 0):.1f} per run</div></td>"
            f"<td>{p.tokens:,}"
            f"<div class=muted>{(p.tokens // p.runs if p.runs else 0):,} per run</div></td>"
            f"<td>{esc(fmt_cost(p.cost_usd))}"
            f"<div class=muted>{esc(fmt_cost(p.cost_usd / p.runs if p.runs else 0))} per run</div>"
            "</td>"
            f"<td>{esc(_fmt_minutes(p.run_minutes))}</td>"
            f"<td>{esc(_fmt_minutes(p.step_minutes))}</td>"
            "</tr>"
        )
    total_tokens = sum(p.tokens for p in report.projects)
    total_cost = sum(p.cost_usd for p in report.projects)
    total_runs = sum(p.runs for p in report.projects)
    body = "\n".join(rows) or '<tr><td colspan="9" class="muted">No projects.</td></tr>'
    return (
        f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>DeksdenFlow usage report</title>
<style>
 body {{ font: 13px/1.4 system-ui, sans-serif; color: #1f2328; margin: 24px; }}
 h1 {{ font-size: 20px; margin: 0 0 4px; }} h2 {{ font-size: 15px; margin: 22px 0 8px; }}
 table {{ border-collapse: collapse; width: 100%; }}
 th, td {{ border-bottom: 1px solid #d0d7de; padding: 5px 8px; text-align: left; """
        f"""vertical-align: top; }}
 th {{ background: #f6f8fa; }} .muted {{ color: #656d76; font-size: 11px; }}
 .legend span {{ margin-right: 14px; font-size: 11px; }}
 .legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; }}
 @page {{ size: A4 landscape; margin: 12mm; }}
</style></head><body>
<h1>DeksdenFlow usage report</h1>
<div class="muted">generated {report.generated_at:%Y-%m-%d %H:%M} UTC{esc(since)} ·
{total_runs} protocol runs · {total_tokens:,} tokens · {esc(fmt_cost(total_cost))}</div>
<h2>Per project</h2>
<table>
<tr><th>Project</th><th>Protocols</th><th>Steps</th><th>QA pass rate</th><th>CI attempts</th>
<th>Tokens</th><th>Cost</th><th>Run duration</th><th>Step duration</th></tr>
{body}
</table>
<h2>Tokens per day</h2>
{tokens_chart(report)}
</body></html>
"""
    )


def find_chromium(explicit: str | None = None) -> str:
    for candidate in (explicit, os.environ.get("CHROMIUM"), *CHROMIUM_NAMES):
        if candidate and (found := shutil.which(candidate)):
            return found
    raise ConfigError(
        "PDF output needs Chromium (Debian: apt-get install chromium) or --chromium PATH; "
        "or write --out report.html"
    )


def html_to_pdf(document: str, out: Path, chromium: str, timeout: float = 120) -> None:
    """Print the HTML with headless Chromium: the report's HTML is the single layout to maintain."""
    with tempfile.TemporaryDirectory(prefix="df-report-") as tmp:
        source = Path(tmp) / "report.html"
        source.write_text(document, encoding="utf-8")
        done = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={tmp}/profile",
                "--no-pdf-header-footer",
                f"--print-to-pdf={out.resolve()}",
                source.as_uri(),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if done.returncode != 0 or not out.exists():
        raise ConfigError(
            f"chromium could not print the PDF (exit {done.returncode}): {done.stderr[-500:]}"
        )


def write_report(report: Report, out: Path, chromium: str | None = None) -> Path:
    document = render_html(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".pdf":
        html_to_pdf(document, out, find_chromium(chromium))
    elif out.suffix.lower() in (".html", ".htm"):
        out.write_text(document, encoding="utf-8")
    else:
        raise ConfigError(f"--out must end in .html or .pdf, not {out.suffix or 'nothing'}")
    return out


def _parse_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def _cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    report = build_report(settings.database_url, project=args.project, since=args.since)
    out = write_report(report, args.out, args.chromium)
    print(f"wrote {out} ({len(report.projects)} projects)", file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "report", help="usage report per project (protocols, steps, QA, CI, tokens) as HTML or PDF"
    )
    parser.add_argument("--project", help="only this project (name or id)")
    parser.add_argument(
        "--since", type=_parse_date, help="only runs created on or after YYYY-MM-DD"
    )
    parser.add_argument("--out", type=Path, required=True, help="report.html or report.pdf")
    parser.add_argument("--chromium", help="Chromium binary for PDF output (default: from PATH)")
    parser.set_defaults(handler=_cmd_report)
