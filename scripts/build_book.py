"""Build the book in one profile, re-executing notebooks whenever fdiff's source changed.

Jupyter Book's execution cache keys notebooks by their code cells only, so a change to the
package would otherwise leave stale outputs in the book. This script stores a hash of fdiff's
source (and of the profile) beside the cache and clears the cache when the hash differs.

    python scripts/build_book.py --profile cpu            # the book: _build/html
    python scripts/build_book.py --profile ci --strict    # CI: _build/ci/_build/html, -W

Notebooks whose outputs are not in the execution cache are executed here first, one after the
other, with the time of every cell recorded; then Jupyter Book builds from the cache. The times go
to ``<build>/cell_times.json`` (chapters executed in an earlier build keep their times), and the
slowest cells are printed. ``--record-times FILE`` also writes them, with the machine's core count
and load, to a committed file (the course page reads ``data/results/chapter_times.json``).

After a successful build, every value the chapters glue is written to ``<build>/results.json``
(``_build/results.json`` for the book; see scripts/book_results.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import book_results
from check_html import toc_files

ROOT = Path(__file__).resolve().parents[1]


def source_hash(profile: str) -> str:
    """Hash every file of the package, the committed checkpoints' manifest and the profile."""
    h = hashlib.sha256(profile.encode())
    files = sorted((ROOT / "fdiff").rglob("*.py")) + [
        ROOT / "data" / "checkpoints" / "manifest.json"
    ]
    for path in files:
        if path.is_file():
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


# Pages that read the chapters' recorded times: executed again whenever a chapter was.
REPORTS = {"course"}


def notebooks_in_toc() -> list[Path]:
    """The book's notebooks, in the order of its table of contents."""
    names = toc_files(ROOT / "_toc.yml")
    return [ROOT / f"{n}.ipynb" for n in names if (ROOT / f"{n}.ipynb").is_file()]


def _seconds(cell) -> float | None:
    timing = cell.get("metadata", {}).get("execution", {})
    try:
        start = datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return (end - start).total_seconds()


def _sliced(get_msg, step: float = 0.5):
    """``get_msg`` of a kernel channel, waiting in slices of ``step`` seconds.

    The asyncio kernel client can miss the wake-up of a message that has already arrived (seen
    after cells that open widgets, on a busy machine): the wait then lasts its whole timeout, a
    cell's 30 minutes, although the reply is there. A wait that ends finds it, so short waits
    bound the delay."""
    from queue import Empty

    async def get(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = step if deadline is None else min(step, max(0.0, deadline - time.monotonic()))
            try:
                return await get_msg(timeout=left)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
    return get


def execute(nb, cwd: Path, timeout: int) -> tuple[float, str | None]:
    """Execute notebook ``nb`` in ``cwd`` with each cell's time recorded in its metadata;
    return (seconds, None) or (seconds, the error's text)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    class Client(NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            for channel in (kc.shell_channel, kc.iopub_channel):
                channel.get_msg = _sliced(channel.get_msg)
            return kc

    start = time.perf_counter()
    client = Client(nb, timeout=timeout, allow_errors=False, record_timing=True,
                    resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except CellExecutionError as err:
        return time.perf_counter() - start, str(err)
    except Exception as err:  # a timeout, a dead kernel
        return time.perf_counter() - start, f"{type(err).__name__}: {err}"
    return time.perf_counter() - start, None


def execute_uncached(build: Path, timeout: int, paths: list[Path],
                     force: bool = False) -> dict | None:
    """Execute every notebook of ``paths`` the cache lacks (all of them with ``force``),
    recording each cell's time, and add it to the cache Jupyter Book reads. Return the times
    ({notebook: {...}}) or None if one failed."""
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    from fdiff.profiles import free_cores

    cache = get_cache(str(build / ".jupyter_cache"))
    user_threads = "OMP_NUM_THREADS" in os.environ
    times = {}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if not force:
            try:
                cache.match_cache_notebook(nb)
                continue  # Jupyter Book will use the cached outputs
            except KeyError:
                pass
        # A kernel with more threads than free cores runs several times slower than with
        # fewer (fdiff.profiles.free_cores): on a shared machine it gets the free ones.
        threads = os.environ.get("OMP_NUM_THREADS") if user_threads else str(free_cores())
        os.environ["OMP_NUM_THREADS"] = threads
        print(f"executing {path.relative_to(ROOT)} with {threads} thread(s) ...", flush=True)
        seconds, error = execute(nb, path.parent, timeout)
        if error is not None:
            print(error, file=sys.stderr)
            print(f"executing {path.name} failed", file=sys.stderr)
            return None
        cells = [(i, _seconds(c)) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        for c in nb.cells:  # the cache hashes cell metadata: leave it as Jupyter Book reads it
            c.metadata.pop("execution", None)
        stage = cache.add_nb_to_project(str(path))
        cache.cache_notebook_bundle(CacheBundleIn(nb, stage.uri,
                                                  data={"execution_seconds": seconds}),
                                    check_validity=False, overwrite=True)
        cells = [(i, s) for i, s in cells if s is not None]
        slowest = max(cells, key=lambda c: c[1], default=(None, 0.0))
        times[path.stem] = {"seconds": round(seconds, 1), "threads": int(threads),
                            "slowest_cell": slowest[0], "slowest_seconds": round(slowest[1], 1),
                            "cells": {str(i): round(s, 2) for i, s in cells}}
        print(f"  {seconds / 60:.1f} minutes; slowest cell {slowest[0]}: "
              f"{slowest[1] / 60:.1f} minutes", flush=True)
    return times


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when it lies inside it, else as it is."""
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def update_times(build: Path, times: dict, record: Path | None, profile: str,
                 load_before: tuple[float, ...]) -> None:
    path = build / "cell_times.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update(times)
    path.write_text(json.dumps(known, indent=1) + "\n")
    for name, t in known.items():
        print(f"{name:24s} {t['seconds'] / 60:5.1f} min; slowest cell {t['slowest_cell']}: "
              f"{t['slowest_seconds'] / 60:.1f} min")
    if record is not None and times:
        out = json.loads(record.read_text()) if record.is_file() else {"chapters": {}}
        out["chapters"].update({k: {key: v[key] for key in ("seconds", "slowest_cell",
                                                             "slowest_seconds", "threads")}
                                for k, v in times.items()})
        out.update({"profile": profile, "cpu_count": os.cpu_count(),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in os.getloadavg()],
                    "command": f"python scripts/build_book.py --profile {profile} "
                               f"--record-times {_shown(record)}"})
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(out, indent=1) + "\n")
        print(f"times recorded in {record}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["ci", "cpu", "gpu", "paper"], required=True)
    parser.add_argument("--strict", action="store_true", help="turn warnings into errors (-W)")
    parser.add_argument("--record-times", type=Path, metavar="FILE",
                        help="also write the chapters' execution times to FILE")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args()

    out = ROOT if args.profile == "cpu" else ROOT / "_build" / args.profile
    build = out / "_build"
    stamp = build / ".fdiff-source-hash"
    digest = source_hash(args.profile)
    if stamp.is_file() and stamp.read_text() != digest:
        print("fdiff or the checkpoints changed since the last build: clearing the execution cache")
        shutil.rmtree(build / ".jupyter_cache", ignore_errors=True)
        shutil.rmtree(build / "jupyter_execute", ignore_errors=True)
    os.environ["FDIFF_PROFILE"] = args.profile  # for the kernels started below
    load_before, start = os.getloadavg(), time.perf_counter()
    # The chapters first, then the pages that report on them (the course page reads their
    # recorded times), again whenever a chapter was executed.
    notebooks = notebooks_in_toc()
    reports = [p for p in notebooks if p.stem in REPORTS]
    times = execute_uncached(build, args.timeout, [p for p in notebooks if p not in reports])
    if times is None:
        return 1
    record = args.record_times.resolve() if args.record_times else None
    update_times(build, times, record, args.profile, load_before)
    if execute_uncached(build, args.timeout, reports, force=bool(times)) is None:
        return 1
    cmd = [
        str(Path(sys.executable).parent / "jupyter-book"),
        "build",
        str(ROOT),
        "--path-output",
        str(out),
    ]
    if args.strict:
        cmd += ["-W", "--keep-going"]
    env = {**os.environ, "FDIFF_PROFILE": args.profile}
    code = subprocess.call(cmd, env=env, cwd=ROOT)
    if code == 0:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
        print(f"book ({args.profile} profile): {build / 'html' / 'index.html'}")
        print(f"results: {book_results.write(build)}")
        print(f"built in {(time.perf_counter() - start) / 60:.1f} minutes")
    return code


if __name__ == "__main__":
    sys.exit(main())
