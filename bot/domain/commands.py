"""Slash-command grammar, label intents, permission table and prompt-input sanitising (pure)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from markdown_it import MarkdownIt

ArgKind = Literal["text", "step_or_next", "step", "step_text", "none"]
PermissionLevel = Literal["admin", "write", "read", "none"]


@dataclass(frozen=True)
class CommandInfo:
    """One row of the command table: how a command is written and what it does."""

    name: str
    args: ArgKind
    usage: str  # without the prefix, e.g. "run-step [N|next]"
    summary: str


# The single source of truth for the grammar; help text and error replies are built from it.
COMMANDS: Mapping[str, CommandInfo] = {
    info.name: info
    for info in (
        CommandInfo(
            "plan", "text", "plan [free text]", "plan (or re-plan) a protocol for this issue"
        ),
        CommandInfo(
            "run-step",
            "step_or_next",
            "run-step [N|next]",
            "execute step N, or the next pending step",
        ),
        CommandInfo(
            "qa", "step", "qa [N]", "run the quality check on step N (default: current step)"
        ),
        CommandInfo("status", "none", "status", "refresh the status comment"),
        CommandInfo(
            "retry",
            "step_text",
            "retry [N] [text…]",
            "retry step N (default: the failed or blocked step); "
            "any text after it goes to the agent as guidance",
        ),
        CommandInfo(
            "approve",
            "step",
            "approve [N]",
            "approve the plan so steps may run; with N, accept step N without (another) QA pass",
        ),
        CommandInfo("pause", "none", "pause", "stop after the running step"),
        CommandInfo("resume", "none", "resume", "continue a paused or blocked protocol"),
        CommandInfo("cancel", "none", "cancel", "cancel the protocol"),
        CommandInfo("help", "none", "help", "show this help"),
        CommandInfo(
            "init", "none", "init", "add a starter .deksdenflow/ configuration to the repository"
        ),
    )
}

# Minimum repository permission per command. Repository config may override entries via
# `required_permission(..., overrides=...)`; "auto" is the label-only intent.
DEFAULT_PERMISSIONS: Mapping[str, PermissionLevel] = {
    **{name: "write" for name in COMMANDS},
    "status": "read",
    "help": "read",
    "auto": "write",
    "review": "write",  # whose review comments become a fix step (not a command)
}

_PERMISSION_RANK: Mapping[str, int] = {"none": 0, "read": 1, "write": 2, "maintain": 2, "admin": 3}

DEFAULT_LABELS: Mapping[str, str] = {
    "deksdenflow:plan": "plan",
    "deksdenflow:auto": "auto",
}
LABEL_INTENTS = frozenset({"plan", "auto"})


@dataclass(frozen=True)
class Command:
    """A parsed command or label intent.

    `step` is the step number for run-step/qa/retry/approve (None = "next"/"current", the job
    decides); `text` is the free text after /plan.
    """

    name: str
    step: int | None = None
    text: str = ""
    raw: str = ""
    line: int = 0  # 1-based line in the comment body; 0 for label intents


@dataclass(frozen=True)
class CommandError:
    """A line that looked like a command but could not be used; the bot replies with it."""

    kind: Literal["unknown", "malformed"]
    name: str
    raw: str
    message: str
    usage: str = ""  # full usage line with prefix, empty for unknown commands
    suggestions: tuple[str, ...] = ()
    line: int = 0


_POSITIVE_INT_RE = re.compile(r"^[0-9]+$")
_NUMBERISH_RE = re.compile(r"^[-+]?[0-9]")

# Most commands a comment may hold. Past it the comment is answered once and nothing runs: one
# pasted wall of commands must not turn into thousands of jobs or replies.
MAX_COMMANDS_PER_COMMENT = 5

# GitLab's own quick actions. GitLab strips them from a note before saving it, but a user may
# still type one where GitLab does not apply it; the bot never answers those as "unknown".
GITLAB_QUICK_ACTIONS = frozenset(
    """
    add_contacts approve assign assign_reviewer blocked_by blocks board_move cc clone close
    confidential convert_to_ticket copy_metadata create_merge_request done draft due duplicate
    epic estimate estimate_time exclude health_status iteration label lock merge milestone move
    page parent promote promote_to_incident publish react ready rebase relabel relate
    remove_child remove_contacts remove_due_date remove_epic remove_estimate remove_iteration
    remove_milestone remove_parent remove_time_spent reopen reply request_review reviewer
    shrug spend spend_time set_parent submit_review subscribe summarize_diff tableflip target_branch
    timeline title todo type unassign unassign_reviewer unapprove unlabel unlink unlock
    unsubscribe weight award remove_reviewer severity status escalate
    """.split()
)

# CommonMark as the forges render it. Only paragraph text the reader sees counts: code blocks
# (fenced or indented by 4 spaces / a tab), block quotes (with their lazy continuation lines),
# HTML blocks and inline HTML comments are not where a reader would see a command.
_MARKDOWN = MarkdownIt("commonmark")


def _command_re(prefix: str) -> re.Pattern[str]:
    # The name must be followed by whitespace or end of line, so paths such as /usr/bin or
    # URLs never parse as commands.
    return re.compile(r"^\s*" + re.escape(prefix) + r"([A-Za-z][A-Za-z-]*)(?:\s+(.*?))?\s*$")


def visible_lines(body: str) -> list[tuple[int, str]]:
    """(1-based source line, text) of every line a reader sees as plain paragraph text.

    Paragraphs inside block quotes and list items are left out (a quoted or listed `/plan` is
    talk about a command, not a command); inline HTML (comments included) is dropped and a
    code span is kept with its backticks, so it can never start a command.
    """
    out: list[tuple[int, str]] = []
    nested = 0  # depth of block quotes and list items around the current token
    tokens = _MARKDOWN.parse(body)
    for i, token in enumerate(tokens):
        if token.type in ("blockquote_open", "list_item_open"):
            nested += 1
        elif token.type in ("blockquote_close", "list_item_close"):
            nested -= 1
        elif (
            token.type == "inline"
            and nested == 0
            and i > 0
            and tokens[i - 1].type == "paragraph_open"
        ):
            line = (token.map or [0])[0] + 1
            parts: list[str] = []
            for child in token.children or ():
                if child.type in ("softbreak", "hardbreak"):
                    out.append((line, "".join(parts)))
                    parts = []
                    line += 1
                elif child.type == "html_inline":
                    line += child.content.count("\n")  # hidden, but it still takes lines
                elif child.type == "code_inline":
                    parts.append(child.markup + child.content + child.markup)
                elif child.type == "text":
                    parts.append(child.content)
            out.append((line, "".join(parts)))
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def near_a_command(name: str, max_distance: int = 2) -> bool:
    """Whether an unknown name is a likely typo of one of ours (worth an answer)."""
    name = name.lower()
    return any(edit_distance(name, known) <= max_distance for known in COMMANDS)


def _usage(info: CommandInfo, prefix: str) -> str:
    return f"{prefix}{info.usage}"


def _parse_positive(token: str) -> int | None:
    if not _POSITIVE_INT_RE.match(token):
        return None
    value = int(token)
    return value if value > 0 else None


def _parse_one(
    info: CommandInfo, args: str, raw: str, line_no: int, prefix: str
) -> Command | CommandError:
    tokens = args.split()

    def malformed(message: str) -> CommandError:
        return CommandError(
            kind="malformed",
            name=info.name,
            raw=raw,
            message=message,
            usage=_usage(info, prefix),
            line=line_no,
        )

    if info.args == "text":
        return Command(info.name, text=args.strip(), raw=raw, line=line_no)
    if info.args == "step_text":
        # `/retry`, `/retry 2`, `/retry 2 use the new API`, `/retry use the new API`
        first = tokens[0] if tokens else ""
        if first and _NUMBERISH_RE.match(first):  # meant as a step number: it must be one
            step_no = _parse_positive(first)
            if step_no is None:
                return malformed(f"`{first}` is not a positive step number")
            return Command(
                info.name,
                step=step_no,
                text=args.strip()[len(first) :].strip(),
                raw=raw,
                line=line_no,
            )
        return Command(info.name, text=args.strip(), raw=raw, line=line_no)
    if info.args == "none":
        if tokens:
            return malformed(f"`{prefix}{info.name}` takes no arguments (got `{args.strip()}`)")
        return Command(info.name, raw=raw, line=line_no)
    if len(tokens) > 1:
        return malformed(f"`{prefix}{info.name}` takes at most one argument (got `{args.strip()}`)")
    if not tokens:
        return Command(info.name, raw=raw, line=line_no)
    token = tokens[0]
    if info.args == "step_or_next" and token.lower() == "next":
        return Command(info.name, raw=raw, line=line_no)
    step = _parse_positive(token)
    if step is None:
        what = (
            "a positive step number or `next`"
            if info.args == "step_or_next"
            else "a positive step number"
        )
        return malformed(f"`{token}` is not {what}")
    return Command(info.name, step=step, raw=raw, line=line_no)


def suggest(name: str, *, limit: int = 3) -> tuple[str, ...]:
    """Known command names close to `name` (for "did you mean")."""
    return tuple(difflib.get_close_matches(name.lower(), list(COMMANDS), n=limit, cutoff=0.6))


def parse_commands(
    body: str, *, prefix: str = "/", limit: int | None = None
) -> list[Command | CommandError]:
    """Every command line in a comment body, in order (at most `limit` of them).

    A command starts a line of paragraph text as the forge displays it (see `visible_lines`):
    never inside code, block quotes, lists or HTML comments. Names are case-insensitive.
    """
    pattern = _command_re(prefix)
    found: list[Command | CommandError] = []
    for line_no, line in visible_lines(body):
        if limit is not None and len(found) >= limit:
            break
        m = pattern.match(line)
        if not m:
            continue
        name = m.group(1).lower()
        args = m.group(2) or ""
        raw = line.strip()
        info = COMMANDS.get(name)
        if info is None:
            found.append(
                CommandError(
                    kind="unknown",
                    name=name,
                    raw=raw,
                    message=f"`{prefix}{name}` is not a DeksdenFlow command",
                    suggestions=tuple(f"{prefix}{s}" for s in suggest(name)),
                    line=line_no,
                )
            )
            continue
        found.append(_parse_one(info, args, raw, line_no, prefix))
    return found


def required_permission(
    command: str, overrides: Mapping[str, str] | None = None
) -> PermissionLevel:
    """The minimum repository permission for `command` (repository config may override)."""
    if overrides and command in overrides:
        level = overrides[command]
        if level not in ("admin", "write", "read", "none"):
            raise ValueError(f"unknown permission level {level!r} for command {command!r}")
        return level  # type: ignore[return-value]  # narrowed by the check above
    return DEFAULT_PERMISSIONS.get(command, "write")


def permission_allows(actual: str, required: str) -> bool:
    """Whether a user holding `actual` (GitHub/GitLab level, maintain = write) may act."""
    return _PERMISSION_RANK.get(actual, 0) >= _PERMISSION_RANK.get(required, 99)


def least_required(overrides: Mapping[str, str] | None = None) -> PermissionLevel:
    """The lowest permission that runs any state-changing command: who "may act" here."""
    levels = [required_permission(n, overrides) for n in COMMANDS if n not in ("help", "status")]
    return min(levels, key=lambda level: _PERMISSION_RANK[level])


def label_intent(label_name: str, labels_config: Mapping[str, str] | None = None) -> Command | None:
    """The intent a newly added label asks for, if it is one of ours.

    `labels_config` maps label name → intent ("plan" | "auto") and is merged over the defaults;
    mapping a default label to "" disables it. Label names compare case-insensitively, as the
    forges treat them.
    """
    table = {k.casefold(): v for k, v in DEFAULT_LABELS.items()}
    for name, intent in (labels_config or {}).items():
        table[name.casefold()] = intent
    wanted = table.get(label_name.strip().casefold())
    if not wanted:
        return None
    if wanted not in LABEL_INTENTS:
        raise ValueError(f"label {label_name!r} maps to unknown intent {wanted!r}")
    return Command(wanted, raw=label_name)


# How each forge names the access a command needs (GitLab's roles: Reporter 20, Developer 30,
# Maintainer 40; GitHub's repository permissions as they are).
ROLE_WORDS: Mapping[str, Mapping[str, str]] = {
    "github": {"none": "no", "read": "read", "write": "write", "maintain": "maintain",
               "admin": "admin"},
    "gitlab": {"none": "no", "read": "Reporter", "write": "Developer", "maintain": "Maintainer",
               "admin": "Maintainer"},
}  # fmt: skip


def role_word(level: str, forge: str = "github") -> str:
    """`write` on GitHub, `Developer` on GitLab."""
    return ROLE_WORDS.get(forge, ROLE_WORDS["github"]).get(level, level)


def _cell(text: str) -> str:
    # a `|` ends a table cell in GitHub's and GitLab's Markdown, even inside a code span
    return text.replace("|", "\\|")


def help_text(prefix: str = "/", forge: str = "github", bot: str = "") -> str:
    """The markdown reply to /help, in the forge's own words (PR or MR, roles); `bot` is the
    handle mentions use (`@bot plan …` works wherever `/plan …` does)."""
    gitlab = forge == "gitlab"
    thread = "merge-request" if gitlab else "pull-request"
    rows = "\n".join(
        f"| `{_cell(_usage(info, prefix))}` | {_cell(info.summary)} | "
        f"{role_word(DEFAULT_PERMISSIONS[info.name], forge)} |"
        for info in COMMANDS.values()
    )
    labels = "\n".join(f"- `{label}` → {intent}" for label, intent in DEFAULT_LABELS.items())
    needs = "Role" if gitlab else "Needs"
    pr = "draft MR (`!N`)" if gitlab else "draft PR (`#N`)"
    return (
        "### DeksdenFlow commands\n\n"
        f"Write a command at the start of a line in an issue or {thread} comment "
        "(not inside a code block or quote). `N` is a step number.\n\n"
        f"| Command | What it does | {needs} |\n|---|---|---|\n"
        f"{rows}\n\n"
        f"A protocol starts with `{prefix}plan`: the plan lands on its own branch and a {pr}; "
        f"`{prefix}approve` approves it, then `{prefix}run-step` runs the steps one by one.\n\n"
        + f"Mentioning the bot works too: `@{bot or '<bot>'} plan …` is `{prefix}plan …`.\n\n"
        + (
            # GitLab runs its own quick actions on notes and strips them before any webhook
            "On GitLab `/approve`, `/assign`, `/label`, `/close`, `/merge` and the like are "
            "GitLab's own quick actions: GitLab applies them and removes them from the comment "
            f"before the bot sees it. To approve the plan, write `@{bot or '<bot>'} approve`; "
            "approving the merge request in GitLab counts as well.\n\n"
            if gitlab and prefix == "/"
            else ""
        )
        + "### Labels\n\n"
        f"{labels}\n\n"
        "`auto` plans, then runs every step with its QA gate until the protocol is done or blocked."
    )


def permission_refusal(
    author: str, command: str, required: str, actual: str | None, forge: str = "github",
    prefix: str = "/",
) -> str:  # fmt: skip
    """The reply when someone may not run a command, in the forge's words."""
    if forge == "gitlab":
        return (
            f"Sorry @{author}, `{prefix}{command}` needs the **{role_word(required, forge)}** role "
            f"(or higher) in this project and you have **{role_word(actual or 'none', forge)}**. "
            "A Maintainer can run it for you."
        )
    return (
        f"Sorry @{author}, `{prefix}{command}` needs **{role_word(required, forge)}** access to "
        f"this repository and you have **{role_word(actual or 'none', forge)}**. "
        "A maintainer can run it for you."
    )


def render_command_error(err: CommandError, prefix: str = "/") -> str:
    """The markdown reply for a command we could not use."""
    parts = [f"⚠️ {err.message}.", "", f"> {err.raw}"]
    if err.usage:
        parts += ["", f"Usage: `{err.usage}`"]
    if err.suggestions:
        parts += ["", "Did you mean " + " or ".join(f"`{s}`" for s in err.suggestions) + "?"]
    parts += ["", f"Send `{prefix}help` for the list of commands."]
    return "\n".join(parts)


# Characters a reader cannot see but a model reads: zero-width and bidi controls.
_INVISIBLE = (
    "\u200b\u200c\u200d\u2060\ufeff"  # zero-width space/joiners, word joiner, BOM
    "\u202a\u202b\u202c\u202d\u202e"  # bidi embeddings/overrides
    "\u2066\u2067\u2068\u2069"  # bidi isolates
    "\u200e\u200f\u061c"  # LRM, RLM, Arabic letter mark
)
_CONTROL = "".join(chr(c) for c in range(32) if chr(c) not in "\n\t") + "\x7f"
_STRIP_TABLE = str.maketrans("", "", _INVISIBLE + _CONTROL)
_HTML_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
DEFAULT_MAX_PROMPT_CHARS = 20_000
TRUNCATION_NOTE = "\n[… truncated by DeksdenFlow]"


def sanitize_prompt_text(text: str, max_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> str:
    """Untrusted issue/comment text made safe to paste into a prompt.

    Drops what a human reviewer cannot see on the forge but a model would read: HTML comments
    (also an unterminated one, which hides the rest of the text), zero-width and bidi control
    characters, other control characters; then caps the length.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Repeat until stable: removing invisible characters can splice a new "<!--" together,
    # and removing a comment can do the same; anything that was obfuscated that way goes too.
    while True:
        cleaned = _HTML_COMMENT_RE.sub("", text).translate(_STRIP_TABLE)
        if cleaned == text:
            break
        text = cleaned
    if len(text) > max_chars:
        keep = max(0, max_chars - len(TRUNCATION_NOTE))
        text = text[:keep] + TRUNCATION_NOTE[: max_chars - keep]
    return text
