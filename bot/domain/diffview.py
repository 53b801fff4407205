"""A commit's diff for the console: parsed into files and hunks, lines syntax-coloured (pure)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from pygments.lexer import Lexer
from pygments.lexers import get_lexer_for_filename
from pygments.token import STANDARD_TYPES, Token
from pygments.util import ClassNotFound

MAX_LINES_PER_FILE = 1500  # beyond this a file's hunks are cut (the file list still shows it)
MAX_FILES = 200
_HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@(.*)$")


@dataclass
class DiffLine:
    kind: str  # "add" | "del" | "ctx" | "note"
    old: int | None
    new: int | None
    html: str  # the line's content, escaped and coloured


@dataclass
class Hunk:
    header: str
    lines: list[DiffLine] = field(default_factory=list)


@dataclass
class FileDiff:
    path: str
    status: str = "modified"  # added | deleted | renamed | modified | binary
    old_path: str | None = None
    added: int = 0
    removed: int = 0
    hunks: list[Hunk] = field(default_factory=list)
    truncated: bool = False


def _lexer(path: str) -> Lexer | None:
    try:
        return get_lexer_for_filename(path, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


def _css(token: object) -> str:
    # the short pygments class of the token or of its nearest known parent ("k", "s2", …)
    while token not in STANDARD_TYPES and token is not Token:
        token = getattr(token, "parent", Token)
    return STANDARD_TYPES.get(token, "")  # type: ignore[call-overload,no-any-return]


def highlight_lines(lines: list[str], path: str) -> list[str]:
    """Each line as escaped HTML with <span class=…> colours; lexed together for context."""
    lexer = _lexer(path)
    if lexer is None or not lines:
        return [html.escape(line) for line in lines]
    out: list[list[str]] = [[]]
    for token, value in lexer.get_tokens("\n".join(lines)):
        css = _css(token)
        for n, piece in enumerate(value.split("\n")):
            if n:
                out.append([])
            if piece:
                text = html.escape(piece)
                out[-1].append(f'<span class="{css}">{text}</span>' if css else text)
    rendered = ["".join(parts) for parts in out]
    # lexers may add or drop a trailing newline: keep exactly one entry per input line
    rendered += [""] * (len(lines) - len(rendered))
    return rendered[: len(lines)]


def _note_file_header(current: FileDiff, line: str) -> None:
    """A line between `diff --git` and the first hunk: what happened to the file."""
    if line.startswith("new file mode"):
        current.status = "added"
    elif line.startswith("deleted file mode"):
        current.status = "deleted"
    elif line.startswith("rename from "):
        current.status, current.old_path = "renamed", line[len("rename from ") :]
    elif line.startswith("Binary files "):
        current.status = "binary"


def _classify(line: str, old: int, new: int) -> tuple[str, int | None, int | None]:
    """A hunk line's kind and its old/new line numbers (None on the side it is absent from)."""
    if line.startswith("+"):
        return "add", None, new
    if line.startswith("-"):
        return "del", old, None
    if line.startswith("\\"):
        return "note", None, None
    return "ctx", old, new


def _colour(files: list[FileDiff], raw: list[tuple[FileDiff, Hunk, str, str]]) -> None:
    """Fill each line's html: per file, the file's lines lexed together so strings and comments
    span correctly."""
    by_file: dict[int, list[tuple[Hunk, str, str]]] = {}
    for file, h, kind, content in raw:
        by_file.setdefault(id(file), []).append((h, kind, content))
    for file in files:
        entries = by_file.get(id(file), [])
        coloured = highlight_lines([c for _, k, c in entries], file.path)
        cursor: dict[int, int] = {}
        for (h, kind, content), markup in zip(entries, coloured, strict=True):
            index = cursor.get(id(h), 0)
            cursor[id(h)] = index + 1
            h.lines[index].html = html.escape(content) if kind == "note" else markup


def parse_diff(text: str) -> list[FileDiff]:
    """`git show --patch` / `git diff` output → files with their hunks (uncoloured)."""
    files: list[FileDiff] = []
    current: FileDiff | None = None
    hunk: Hunk | None = None
    old = new = 0
    raw: list[tuple[FileDiff, Hunk, str, str]] = []  # (file, hunk, kind, content) to colour
    for line in text.splitlines():
        if line.startswith("diff --git "):
            parts = line[len("diff --git ") :].split(" b/", 1)
            path = parts[1] if len(parts) == 2 else line.rsplit(" ", 1)[-1]
            current = FileDiff(path=path)
            hunk = None
            if len(files) < MAX_FILES:
                files.append(current)
            continue
        if current is None:
            continue
        if hunk is None:
            _note_file_header(current, line)
        match = _HUNK.match(line)
        if match:
            old, new = int(match.group(1)), int(match.group(2))
            hunk = Hunk(header=line)
            current.hunks.append(hunk)
            continue
        if hunk is None:
            continue
        kind, lines_old, lines_new = _classify(line, old, new)
        if kind == "add":
            current.added += 1
        elif kind == "del":
            current.removed += 1
        if lines_old is not None:
            old += 1
        if lines_new is not None:
            new += 1
        shown = sum(len(h.lines) for h in current.hunks)
        if shown >= MAX_LINES_PER_FILE:
            current.truncated = True
            continue
        hunk.lines.append(DiffLine(kind, lines_old, lines_new, ""))
        raw.append((current, hunk, kind, line[1:] if kind != "note" else line))
    _colour(files, raw)
    return files
