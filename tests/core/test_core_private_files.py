"""The worker's secrets on disk: data dir 0700, database 0600 (sealed App credentials:
tests/api)."""

from __future__ import annotations

import stat
from pathlib import Path

from bot.core.fsperm import ensure_private_dir, restrict_sqlite
from bot.storage.migrate import upgrade_head


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_database_is_private(tmp_path: Path) -> None:
    db = tmp_path / "data" / "deksdenflow.sqlite3"
    upgrade_head(f"sqlite:///{db}")
    assert _mode(db.parent) == 0o700
    assert _mode(db) == 0o600


def test_helpers_tighten_existing_files(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    ensure_private_dir(d)
    assert _mode(d) == 0o700
    f = d / "x.sqlite3"
    f.write_text("")
    f.chmod(0o644)
    (d / "x.sqlite3-wal").write_text("")
    restrict_sqlite(f)
    assert _mode(f) == 0o600 and _mode(d / "x.sqlite3-wal") == 0o600
    restrict_sqlite(d / "missing.sqlite3")  # no error


def test_a_loose_key_file_is_reported(tmp_path: Path) -> None:
    from bot.core.fsperm import readable_by_others

    key = tmp_path / "app.pem"
    key.write_text("k")
    key.chmod(0o644)
    assert readable_by_others(key)
    key.chmod(0o600)
    assert not readable_by_others(key)
    assert not readable_by_others(tmp_path / "missing.pem")
