"""Pure helpers of the git layer: names, numbers, argv/env builders, redaction."""

from __future__ import annotations

import os

import pytest

from bot.core.errors import GitError
from bot.git import (
    build_git_argv,
    build_git_env,
    check_branch_name,
    normalize_remote,
    parse_protocol_number,
    protocol_name,
    redact,
    safe_repo_name,
    slugify,
)
from bot.git.guard import HARDENING_CONFIG
from bot.git.runner import shown_argv


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("0001-task", 1),
        ("0042-fix-login", 42),
        ("12345-big", 12345),
        ("001-short", None),
        ("0001-", None),
        ("main", None),
        ("feature/0001-x", None),
        ("abcd-x", None),
    ],
)
def test_parse_protocol_number(name: str, number: int | None) -> None:
    assert parse_protocol_number(name) == number


def test_protocol_name_slugifies() -> None:
    assert protocol_name(1, "Some Task!") == "0001-some-task"
    assert protocol_name(12, "  Ünïcödé — café  ") == "0012-unicode-cafe"
    assert protocol_name(3, "!!!") == "0003-task"
    assert protocol_name(3, "日本語") == "0003-task"
    long = protocol_name(7, "word " * 30)
    assert len(long) <= 5 + 40 and not long.endswith("-")
    assert parse_protocol_number(long) == 7


def test_slugify_limits() -> None:
    assert slugify("a" * 100) == "a" * 40
    assert slugify("Fix: the  API / v2") == "fix-the-api-v2"


@pytest.mark.parametrize("bad", ["-x", "a..b", "refs/heads/x", "a b", "x.lock", "", "HEAD", "a/"])
def test_check_branch_name_rejects(bad: str) -> None:
    with pytest.raises(GitError):
        check_branch_name(bad)


def test_check_branch_name_accepts() -> None:
    assert check_branch_name("release/1.x") == "release/1.x"
    assert check_branch_name("0001-task") == "0001-task"


def test_remote_urls() -> None:
    assert normalize_remote("https://github.com/o/r.git") == "https://github.com/o/r.git"
    assert normalize_remote("git@github.com:o/r.git") == "git@github.com:o/r.git"
    assert normalize_remote("relative/repo").startswith("/")
    for bad in ("https://x-access-token:tok@github.com/o/r", "https://tok@github.com/o/r"):
        with pytest.raises(GitError) as info:
            normalize_remote(bad)
        assert "tok" not in str(info.value)


def test_safe_repo_name_is_stable_and_distinct() -> None:
    a = safe_repo_name("https://github.com/a/b-c.git")
    b = safe_repo_name("https://github.com/a-b/c.git")
    assert a == safe_repo_name("https://github.com/a/b-c.git")
    assert a != b
    assert a.startswith("github.com-a-b-c-")
    assert "/" not in safe_repo_name("/tmp/x/origin.git")


def test_build_argv_is_pure_and_carries_no_env() -> None:
    argv = build_git_argv(["fetch", "origin"], cwd="/m", config={"a.b": "c"})
    assert argv[:3] == ["git", "-C", "/m"] and argv[-2:] == ["fetch", "origin"]
    pairs = argv[3:-2]
    assert pairs[::2] == ["-c"] * (len(pairs) // 2)
    assert "a.b=c" in pairs[1::2]
    # the hardening comes last, so a caller's config cannot turn hooks or fsmonitor back on
    hardened = build_git_argv(["status"], config={"core.hooksPath": "/x", "core.fsmonitor": "true"})
    values = hardened[2:-1:2]
    assert values[-len(HARDENING_CONFIG) :] == [f"{k}={v}" for k, v in HARDENING_CONFIG.items()]
    assert "core.hooksPath=/dev/null" in values and "core.fsmonitor=false" in values


def test_build_env_puts_header_in_env_only() -> None:
    base = {"PATH": "/bin", "GIT_DIR": "/elsewhere", "GIT_CONFIG_COUNT": "3", "LANG": "de_DE"}
    env = build_git_env(base, auth_header="Authorization: Bearer s3cret")
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["LC_ALL"] == "C"
    assert "GIT_DIR" not in env
    assert env["GIT_CONFIG_NOSYSTEM"] == "1" and env["GIT_CONFIG_GLOBAL"] == os.devnull
    assert env["GIT_CONFIG_KEY_0"] == "http.extraheader"
    assert env["GIT_CONFIG_VALUE_0"] == "Authorization: Bearer s3cret"
    assert env["GIT_CONFIG_COUNT"] == "2"
    plain = build_git_env(base)
    assert "GIT_CONFIG_COUNT" not in plain and "GIT_CONFIG_VALUE_0" not in plain
    with pytest.raises(GitError):
        build_git_env(base, auth_header="Authorization: x\nEvil: y")


def test_redact() -> None:
    text = (
        "fatal: https://user:pw@host/r failed; Authorization: Basic dXNlcjpwYXNz; "
        "-c http.extraheader=Authorization: Bearer abc.def"
    )
    out = redact(text, ["Authorization: Basic dXNlcjpwYXNz"])
    assert "pw@" not in out and "dXNlcjpwYXNz" not in out and "abc.def" not in out
    assert redact("plain", []) == "plain"


def test_shown_redacts_each_argument_only_where_needed() -> None:
    clean = ["git", "-c", "core.pager=cat", "fetch", "--quiet", "origin"]
    assert shown_argv(clean, ["s3cr3t-token"]) == clean
    argv = [
        "git",
        "-c",
        "http.extraheader=Authorization: Bearer abc.def",
        "push",
        "https://user:pw@host/r.git",
        "HEAD:refs/heads/x",
        "note s3cr3t-token",
    ]
    assert shown_argv(argv, ["s3cr3t-token"]) == [
        "git",
        "-c",
        "http.extraheader=***",
        "push",
        "https://***@host/r.git",
        "HEAD:refs/heads/x",  # the header's `.*` must not run on into the next arguments
        "note ***",
    ]
