"""Command grammar, labels, permissions and prompt-text sanitising."""

from __future__ import annotations

import re

import pytest

from bot.domain.commands import (
    COMMANDS,
    Command,
    CommandError,
    edit_distance,
    help_text,
    label_intent,
    near_a_command,
    parse_commands,
    permission_allows,
    permission_refusal,
    render_command_error,
    required_permission,
    sanitize_prompt_text,
)


def one(body: str) -> Command | CommandError:
    found = parse_commands(body)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    ("body", "name", "step", "text"),
    [
        ("/plan", "plan", None, ""),
        ("/plan add a login page", "plan", None, "add a login page"),
        ("/PLAN  Shout it  ", "plan", None, "Shout it"),
        ("   /status", "status", None, ""),
        ("  /help", "help", None, ""),
        ("/run-step", "run-step", None, ""),
        ("/run-step next", "run-step", None, ""),
        ("/run-step NEXT", "run-step", None, ""),
        ("/run-step 3", "run-step", 3, ""),
        ("/Run-Step 03", "run-step", 3, ""),
        ("/qa", "qa", None, ""),
        ("/qa 2", "qa", 2, ""),
        ("/retry", "retry", None, ""),
        ("/retry 12", "retry", 12, ""),
        ("/approve 1", "approve", 1, ""),
        ("/pause", "pause", None, ""),
        ("/resume", "resume", None, ""),
        ("/cancel", "cancel", None, ""),
        ("/init", "init", None, ""),
        ("/status\r\n", "status", None, ""),
    ],
)
def test_valid_commands(body: str, name: str, step: int | None, text: str) -> None:
    cmd = one(body)
    assert isinstance(cmd, Command)
    assert (cmd.name, cmd.step, cmd.text) == (name, step, text)
    assert cmd.line == 1


@pytest.mark.parametrize(
    ("body", "name", "fragment"),
    [
        ("/run-step abc", "run-step", "`abc` is not a positive step number or `next`"),
        ("/run-step 0", "run-step", "`0` is not"),
        ("/run-step -1", "run-step", "`-1` is not"),
        ("/run-step 1 2", "run-step", "at most one argument"),
        ("/qa 0", "qa", "`0` is not a positive step number"),
        ("/qa next", "qa", "`next` is not a positive step number"),
        ("/retry 1.5", "retry", "is not a positive step number"),
        ("/approve x", "approve", "is not"),
        ("/pause now", "pause", "takes no arguments"),
        ("/status please", "status", "takes no arguments"),
        ("/cancel all of it", "cancel", "takes no arguments"),
    ],
)
def test_malformed_commands(body: str, name: str, fragment: str) -> None:
    err = one(body)
    assert isinstance(err, CommandError)
    assert err.kind == "malformed"
    assert err.name == name
    assert fragment in err.message
    assert err.usage == "/" + COMMANDS[name].usage


@pytest.mark.parametrize(
    ("body", "suggestion"),
    [
        ("/paln", "/plan"),
        ("/stauts", "/status"),
        ("/runstep 2", "/run-step"),
        ("/retyr", "/retry"),
        ("/aprove", "/approve"),
    ],
)
def test_unknown_command_suggests(body: str, suggestion: str) -> None:
    err = one(body)
    assert isinstance(err, CommandError)
    assert err.kind == "unknown"
    assert suggestion in err.suggestions
    reply = render_command_error(err)
    assert "Did you mean" in reply and f"`{suggestion}`" in reply
    assert "/help" in reply


def test_unknown_command_without_suggestion() -> None:
    err = one("/xyzzy")
    assert isinstance(err, CommandError) and err.kind == "unknown"
    assert err.suggestions == ()
    assert "Did you mean" not in render_command_error(err)


@pytest.mark.parametrize(
    "body",
    [
        "see https://example.com/plan for details",
        "the file /usr/bin/plan",
        "/usr/bin/env python",
        "// comment",
        "/ plan",
        "/3 things",
        "text /plan mid-sentence",
        "/plan.",
        "",
    ],
)
def test_not_commands(body: str) -> None:
    assert parse_commands(body) == []


def test_fenced_code_and_quotes_are_ignored() -> None:
    body = "\n".join(
        [
            "Thanks!",
            "```",
            "/plan inside backticks",
            "```",
            "~~~text",
            "/cancel inside tildes",
            "```",  # a backtick line does not close a tilde fence
            "/pause still inside",
            "~~~",
            "> /cancel quoted",
            ">/pause quoted without space",
            "  > /resume indented quote",
            "",  # without it, the next line would continue the quote (CommonMark's lazy line)
            "/status",
            "````",
            "```",
            "/retry inside the longer fence",
            "````",
            "/qa 2",
        ]
    )
    found = parse_commands(body)
    assert [(c.name, c.line) for c in found] == [("status", 14), ("qa", 19)]


@pytest.mark.parametrize(
    "body",
    [
        "    /cancel",  # indented code block: four spaces
        "\t/cancel",  # ... or a tab
        "looks harmless\n<!--\n/cancel\n-->",  # an HTML block the forge does not display
        "text <!-- hidden\n/cancel\n--> more",  # an inline HTML comment across lines
        "<!-- /cancel -->",
        "<!--\n/cancel",  # an unclosed comment hides the rest
        "> quote\n/cancel",  # a lazy continuation line belongs to the quote
        "- item\n/cancel",  # ... and to the list item
        "`x\n/cancel` y",  # inside a code span
    ],
)
def test_hidden_commands_do_not_count(body: str) -> None:
    assert parse_commands(body) == []


def test_command_after_hidden_text_counts() -> None:
    found = parse_commands("<!--\n/cancel\n-->\n\n/status")
    assert [(c.name, c.line) for c in found] == [("status", 5)]


def test_limit_stops_parsing() -> None:
    found = parse_commands("/bogus\n" * 10_000, limit=6)
    assert len(found) == 6


def test_edit_distance_and_nearness() -> None:
    assert edit_distance("plan", "plan") == 0
    assert edit_distance("paln", "plan") == 2
    assert edit_distance("", "abc") == 3
    assert near_a_command("stauts") and near_a_command("PLN")
    assert not near_a_command("assign") and not near_a_command("label")


def test_unclosed_fence_hides_the_rest() -> None:
    assert parse_commands("/status\n```\n/plan\n/cancel") == [
        Command("status", raw="/status", line=1)
    ]


def test_multiple_commands_in_order_with_errors_in_place() -> None:
    found = parse_commands("/plan\nsome words\n/paln\n  /run-step next\n/qa zero")
    kinds = [(type(c).__name__, c.name) for c in found]
    assert kinds == [
        ("Command", "plan"),
        ("CommandError", "paln"),
        ("Command", "run-step"),
        ("CommandError", "qa"),
    ]
    assert [c.line for c in found] == [1, 3, 4, 5]


def test_custom_prefix() -> None:
    found = parse_commands("!df status\n/status", prefix="!df ")
    assert [c.name for c in found] == ["status"]
    assert found[0].line == 1


def test_render_malformed_error() -> None:
    err = one("/run-step abc")
    assert isinstance(err, CommandError)
    reply = render_command_error(err)
    assert "Usage: `/run-step [N|next]`" in reply
    assert "> /run-step abc" in reply


def test_help_text_lists_every_command() -> None:
    text = help_text()
    for info in COMMANDS.values():
        # a `|` would end the table cell on GitHub and GitLab, even inside a code span
        assert f"`/{info.usage.replace('|', chr(92) + '|')}`" in text
    assert "deksdenflow:auto" in text
    assert "`!run-step [N\\|next]`" in help_text(prefix="!")


def _table_rows(text: str) -> list[list[str]]:
    """Cells of each markdown table row as GFM splits them (an unescaped `|` splits)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))])
    return rows


def test_help_renders_as_a_three_column_table_in_the_forges_words() -> None:
    for forge in ("github", "gitlab"):
        rows = _table_rows(help_text(forge=forge))
        assert len(rows) == len(COMMANDS) + 1 and all(len(r) == 3 for r in rows), rows
    github, gitlab = help_text(), help_text(forge="gitlab")
    assert "`/approve [N]` | approve the plan" in github
    assert "pull-request comment" in github and "draft PR (`#N`)" in github
    assert "merge-request comment" in gitlab and "draft MR (`!N`)" in gitlab
    assert "| Developer |" in gitlab and "| Reporter |" in gitlab and "| write |" not in gitlab
    assert "GitLab's own quick action" in gitlab and "quick action" not in github


def test_permission_refusals_use_the_forges_roles() -> None:
    github = permission_refusal("eve", "run-step", "write", "read")
    assert "needs **write** access" in github and "you have **read**" in github
    gitlab = permission_refusal("eve", "run-step", "write", "read", "gitlab")
    assert "needs the **Developer** role" in gitlab and "you have **Reporter**" in gitlab
    assert "you have **no**" in permission_refusal("eve", "plan", "write", None, "gitlab")


@pytest.mark.parametrize(
    ("command", "overrides", "expected"),
    [
        ("plan", None, "write"),
        ("run-step", None, "write"),
        ("status", None, "read"),
        ("help", None, "read"),
        ("auto", None, "write"),
        ("cancel", {"cancel": "admin"}, "admin"),
        ("status", {"status": "write"}, "write"),
        ("plan", {"cancel": "admin"}, "write"),
    ],
)
def test_required_permission(command: str, overrides: dict[str, str] | None, expected: str) -> None:
    assert required_permission(command, overrides) == expected


def test_required_permission_rejects_unknown_level() -> None:
    with pytest.raises(ValueError):
        required_permission("plan", {"plan": "owner"})


@pytest.mark.parametrize(
    ("actual", "required", "ok"),
    [
        ("admin", "write", True),
        ("maintain", "write", True),
        ("write", "write", True),
        ("read", "write", False),
        ("read", "read", True),
        ("none", "read", False),
        ("weird", "read", False),
        ("admin", "admin", True),
        ("write", "admin", False),
    ],
)
def test_permission_allows(actual: str, required: str, ok: bool) -> None:
    assert permission_allows(actual, required) is ok


@pytest.mark.parametrize(
    ("label", "config", "intent"),
    [
        ("deksdenflow:plan", None, "plan"),
        ("DeksdenFlow:Plan", None, "plan"),
        ("deksdenflow:auto", None, "auto"),
        ("bug", None, None),
        ("ai:plan", {"ai:plan": "plan"}, "plan"),
        ("deksdenflow:auto", {"deksdenflow:auto": ""}, None),
    ],
)
def test_label_intent(label: str, config: dict[str, str] | None, intent: str | None) -> None:
    cmd = label_intent(label, config)
    assert (cmd.name if cmd else None) == intent


def test_label_intent_rejects_unknown_intent() -> None:
    with pytest.raises(ValueError):
        label_intent("x", {"x": "deploy"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", "plain text"),
        ("a<!-- hidden -->b", "ab"),
        ("a<!--\nmulti\nline\n-->b", "ab"),
        ("keep<!-- unterminated and the rest", "keep"),
        ("x<!-- one -->y<!-- two -->z", "xyz"),
        ("zero\u200bwidth\u200c\u200d\u2060\ufeff", "zerowidth"),
        ("bidi\u202e\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069\u200e\u200f\u061c", "bidi"),
        ("<!\u200b-- smuggled -->ok", "ok"),
        ("line1\r\nline2\x00\x07", "line1\nline2"),
        ("tabs\tand\nnewlines stay", "tabs\tand\nnewlines stay"),
    ],
)
def test_sanitize_prompt_text(text: str, expected: str) -> None:
    assert sanitize_prompt_text(text) == expected


def test_sanitize_caps_length() -> None:
    out = sanitize_prompt_text("x" * 50_000, max_chars=1_000)
    assert len(out) == 1_000
    assert out.endswith("truncated by DeksdenFlow]")
    assert sanitize_prompt_text("short", max_chars=1_000) == "short"
