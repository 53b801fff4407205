"""`@bot <command> …` mentions turned into the slash-command lines they stand for (pure).

GitLab runs its own quick actions (`/approve`, `/assign`, `/label`, `/close`, `/merge`, …) and
strips them from a note before any webhook sees it, so on GitLab a mention is the only way to
reach some of the bot's commands. On GitHub a mention is just another way to write one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bot.domain.commands import COMMANDS

# A handle as the forges allow it: letters, digits, `-`, `_`, `.`; GitHub bots end in `[bot]`.
_HANDLE_CHARS = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def bot_handles(*names: str | None) -> tuple[str, ...]:
    """The lower-cased handles the bot answers to, without `@` or GitHub's `[bot]` suffix."""
    seen: list[str] = []
    for name in names:
        if not name:
            continue
        handle = name.strip().lstrip("@").removesuffix("[bot]").casefold()
        if handle and re.fullmatch(_HANDLE_CHARS, handle) and handle not in seen:
            seen.append(handle)
    return tuple(seen)


def _mention_re(handles: Iterable[str]) -> re.Pattern[str] | None:
    names = "|".join(re.escape(h) for h in handles)
    if not names:
        return None
    # `@bot plan text`, `@bot[bot] plan`, `@bot: plan`, `@bot, plan`; the name must not go on
    # (`@botany` is someone else)
    return re.compile(
        r"^(?P<indent>\s*)@(?:" + names + r")(?:\[bot\])?(?![A-Za-z0-9._-])[:,]?"
        r"(?:\s+(?P<name>[A-Za-z][A-Za-z-]*)(?P<rest>(?:\s.*)?))?$",
        re.IGNORECASE,
    )


def mentions_to_commands(body: str, handles: Iterable[str], prefix: str = "/") -> str:
    """`body` with each line `@bot <known command> …` rewritten as `<prefix><command> …`.

    Only names of our own commands are rewritten: `@bot please rename x` stays what it is, a
    message to the bot (review feedback), not an unknown command. Lines keep their place, so the
    Markdown around them is unchanged: a mention inside a code block stays in the code block and
    is no command, as with slash-commands.
    """
    pattern = _mention_re(handles)
    if pattern is None or "@" not in body:
        return body
    out = []
    for line in body.split("\n"):
        m = pattern.match(line)
        name = (m.group("name") or "").lower() if m else ""
        if m and name in COMMANDS:
            line = f"{m.group('indent')}{prefix}{name}{m.group('rest') or ''}"
        out.append(line)
    return "\n".join(out)


def mentions_bot(body: str, handles: Iterable[str]) -> bool:
    """Whether `body` mentions one of the handles anywhere (`@bot`, not `@botany`)."""
    names = "|".join(re.escape(h) for h in handles)
    if not names:
        return False
    return (
        re.search(
            r"(?<![\w@])@(?:" + names + r")(?:\[bot\])?(?![A-Za-z0-9._-])", body, re.IGNORECASE
        )
        is not None
    )
