"""Private files for the worker's secrets: the data dir 0700, the database, keys and credentials
0600.

An engine that runs as the worker's user can still read them (see the README's security section);
these modes keep every *other* user of the machine out.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def ensure_private_dir(path: Path, *, traversable: bool = False) -> Path:
    """Create `path` (and missing parents) as 0700 (0711 when `traversable`: others may pass
    through to a known path but list nothing); an existing directory of ours is set so too."""
    mode = PRIVATE_DIR | (0o011 if traversable else 0)
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    with contextlib.suppress(PermissionError):  # not ours (e.g. a shared mount): leave it be
        if path.stat().st_uid == os.geteuid():
            path.chmod(mode)
    return path


def restrict_file(path: Path) -> None:
    """Make an existing file 0600 (no-op if it is missing or not ours)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        if path.stat().st_uid == os.geteuid():
            path.chmod(PRIVATE_FILE)


def readable_by_others(path: Path) -> bool:
    """True when group or other users may read `path` (a key file should be 0600)."""
    try:
        return bool(path.stat().st_mode & 0o077)
    except OSError:
        return False


def restrict_sqlite(path: Path) -> None:
    """The database and its WAL/SHM companions (SQLite gives those the database's own mode)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        restrict_file(path.with_name(path.name + suffix))
