"""DEKSDENFLOW_PUBLIC_URL: check runs and the status comment link to the console pages."""

from __future__ import annotations

from collections.abc import Callable

from tests.github_e2e.conftest import GitHubLoop
from tests.github_e2e.test_github_flow import executed

PUBLIC = "https://bot.example.com"


def test_check_runs_and_status_comment_link_to_the_console(
    loop_factory: Callable[..., GitHubLoop],
) -> None:
    # links exist only with a PUBLIC_URL (default: none), which is what this test is about
    gh = loop_factory(public_url=PUBLIC + "/")
    executed(gh)
    run_id = gh.run().run.id
    step_page = f"{PUBLIC}/console/protocols/{run_id}/steps/1"
    runs = [r for r in gh.fake.check_runs.values() if r["name"] == "deksdenflow/step-01"]
    assert runs and all(r.get("details_url") == step_page for r in runs)
    assert step_page in runs[-1]["output"]["summary"]
    bodies = [
        c.body["body"]
        for c in gh.fake.calls
        if c.method in ("POST", "PATCH")
        and c.path.startswith("/repos/")
        and "comments" in c.path
        and isinstance(c.body, dict)
        and "deksdenflow:status" in c.body.get("body", "")
    ]
    last = bodies[-1]
    assert f"[**Console**]({PUBLIC}/console/protocols/{run_id})" in last
    assert f"[transcript & diff]({step_page})" in last
    assert "**Cost:** $" in last


def test_without_a_public_url_no_links_are_made(gh: GitHubLoop) -> None:
    executed(gh)
    runs = [r for r in gh.fake.check_runs.values() if r["name"] == "deksdenflow/step-01"]
    assert runs and all("details_url" not in r for r in runs)
    bodies = [
        c.body["body"]
        for c in gh.fake.calls
        if isinstance(c.body, dict) and "deksdenflow:status" in str(c.body.get("body", ""))
    ]
    assert bodies and not any("/console/" in b for b in bodies)
