"""Benchmark: protocol start (ensure_worktree on a cached mirror) vs. a fresh clone and a bare
`worktree add`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout

from bot.git import GitCache  # noqa: E402

ENV = {**os.environ, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}


def git(*args: str | Path, cwd: Path | None = None) -> str:
    res = subprocess.run(
        ["git", *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise SystemExit(f"git {' '.join(map(str, args))} failed: {res.stderr}")
    return res.stdout.strip()


def file_path(i: int) -> str:
    # Nested so each commit rewrites three small trees, not one tree with 20,000 entries.
    return f"src/m{i // 1000:03d}/p{(i // 50) % 20:02d}/f{i:05d}.py"


def initial_text(i: int) -> bytes:
    lines = [f"# module {i}\n", f"VALUE_{i} = {i * 7919 % 100003}\n"]
    lines += [f"def f{i}_{k}(x):\n    return x * {k} + {i}\n" for k in range(4)]
    return "".join(lines).encode()


def build_origin(origin: Path, commits: int, files: int) -> None:
    """A bare repo made with one fast-import stream: 20k files, then many one-to-three-file
    commits."""
    tmp = origin.with_name(origin.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    git("init", "-q", "--bare", "-b", "main", tmp)
    proc = subprocess.Popen(
        ["git", "-C", str(tmp), "fast-import", "--quiet", "--done"],
        stdin=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdin is not None
    out = proc.stdin
    contents = [initial_text(i) for i in range(files)]
    ts = 1_600_000_000

    def commit(n: int, message: str, changed: list[int]) -> bytes:
        msg = message.encode()
        parts = [
            b"commit refs/heads/main\n",
            f"committer Bench <bench@example.com> {ts + n * 60} +0000\n".encode(),
            f"data {len(msg)}\n".encode(),
            msg,
            b"\n",
        ]
        for i in changed:
            body = contents[i]
            parts += [f"M 100644 inline {file_path(i)}\ndata {len(body)}\n".encode(), body, b"\n"]
        parts.append(b"\n")
        return b"".join(parts)

    out.write(commit(0, "initial import", list(range(files))))
    rnd = 12345
    for n in range(1, commits):
        # A tiny LCG keeps the history identical between runs without the random module's cost.
        changed = []
        for _ in range(1 + n % 3):
            rnd = (rnd * 1103515245 + 12345) % 2**31
            changed.append(rnd % files)
        for i in set(changed):
            contents[i] += f"# change {n}\n".encode()
        out.write(commit(n, f"change {n}: touch {len(set(changed))} file(s)", sorted(set(changed))))
    out.write(b"done\n")
    out.close()
    if proc.wait() != 0:
        raise SystemExit("git fast-import failed")
    # fast-import deltas every new blob against its previous version, so the tip's files sit at
    # the end of delta chains; a real server's packs (made by pack-objects) keep recent versions
    # whole. Repack from scratch so clone and checkout both see a realistic pack.
    git("repack", "-a", "-d", "-f", "-q", cwd=tmp)
    shutil.rmtree(origin, ignore_errors=True)
    tmp.rename(origin)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_run(
    label: str, repeat: int, run: Callable[[int], object], cleanup: Callable[[int], object]
) -> float:
    cleanup(-1)
    run(-1)  # warm-up, untimed: every variant runs with a warm page cache
    cleanup(-1)
    times = []
    for i in range(repeat):
        times.append(timed(functools.partial(run, i)))
        cleanup(i)
    med = statistics.median(times)
    print(f"{label}: median {med:.3f}s  runs " + " ".join(f"{t:.3f}" for t in times), flush=True)
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--commits", type=int, default=50_000)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="where clones, the mirror and worktrees go (default: --out); e.g. a tmpfs to "
        "take a slow disk's per-file cost out of the comparison",
    )
    args = ap.parse_args()

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    origin = out / f"origin-v2-{args.commits}c-{args.files}f.git"
    if not (origin / "HEAD").is_file():
        print(f"building {origin.name} with fast-import ...", flush=True)
        t = timed(lambda: build_origin(origin, args.commits, args.files))
        print(f"built in {t:.1f}s", flush=True)
    count = git("rev-list", "--count", "main", cwd=origin)
    nfiles = len(git("ls-tree", "-r", "--name-only", "main", cwd=origin).splitlines())
    print(f"origin: {count} commits, {nfiles} files at main", flush=True)

    work: Path = (args.scratch or out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"scratch: {work}", flush=True)
    # the bot as deployed: a warm spare worktree per repository (DEKSDENFLOW_WARM_WORKTREES)
    cache = GitCache(work / f"data-v2-{args.commits}c-{args.files}f", warm_spares=True)
    loop = asyncio.new_event_loop()
    mirror = loop.run_until_complete(cache.ensure_mirror(str(origin)))
    scratch = Path(tempfile.mkdtemp(prefix="wt-bench-", dir=work))
    try:
        clone_dir = scratch / "clone"
        a = median_run(
            "(a) git clone --no-local",
            args.repeat,
            lambda i: git("clone", "-q", "--no-local", origin, clone_dir),
            lambda i: shutil.rmtree(clone_dir, ignore_errors=True),
        )

        def add_plain(i: int) -> None:
            git(
                "worktree",
                "add",
                "-q",
                "-b",
                f"bench-b{i}",
                scratch / f"b{i}",
                "refs/remotes/origin/main",
                cwd=mirror,
            )

        def drop_plain(i: int) -> None:
            shutil.rmtree(scratch / f"b{i}", ignore_errors=True)
            git("worktree", "prune", cwd=mirror)
            subprocess.run(
                ["git", "-C", str(mirror), "branch", "-q", "-D", f"bench-b{i}"],
                env=ENV,
                capture_output=True,
                check=False,
            )

        b = median_run("(b) git worktree add (bare mirror)", args.repeat, add_plain, drop_plain)

        def branch(i: int) -> str:
            return f"{9000 + i + 1:04d}-bench-protocol"

        def start(i: int) -> None:
            wt = loop.run_until_complete(cache.ensure_worktree(str(origin), branch(i), "main"))
            assert wt.created and (wt.path / file_path(0)).is_file()

        def stop(i: int) -> None:
            loop.run_until_complete(cache.remove_worktree(str(origin), branch(i)))
            # the spare is refilled in the background between protocol starts; wait for it
            # here, outside the timed part, as a running bot has the time between two starts
            loop.run_until_complete(cache.wait_spares())

        # the very first start on a repository has no spare yet: shown, not part of the ratio
        t0 = timed(lambda: start(99))
        print(f"(c0) first protocol start on the repository (no spare yet): {t0:.3f}s", flush=True)
        stop(99)
        c = median_run(
            "(c) ensure_worktree (cached mirror, fetch included, warm spare)",
            args.repeat,
            start,
            stop,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        loop.close()
    print(f"c/a={c / a:.3f} (goal <= 0.1)")
    print(f"c/b={c / b:.3f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
