"""Build the book in one profile, re-executing notebooks whenever fdiff's source changed.

Jupyter Book's execution cache keys notebooks by their code cells only, so a change to the
package would otherwise leave stale outputs in the book. This script stores a hash of fdiff's
source (and of the profile) beside the cache and clears the cache when the hash differs.

    python scripts/build_book.py --profile cpu            # the book: _build/html
    python scripts/build_book.py --profile ci --strict    # CI: _build/ci/_build/html, -W

After a successful build, every value the chapters glue is written to ``<build>/results.json``
(``_build/results.json`` for the book; see scripts/book_results.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import book_results

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["ci", "cpu", "gpu"], required=True)
    parser.add_argument("--strict", action="store_true", help="turn warnings into errors (-W)")
    args = parser.parse_args()

    out = ROOT if args.profile == "cpu" else ROOT / "_build" / args.profile
    build = out / "_build"
    stamp = build / ".fdiff-source-hash"
    digest = source_hash(args.profile)
    if stamp.is_file() and stamp.read_text() != digest:
        print("fdiff or the checkpoints changed since the last build: clearing the execution cache")
        shutil.rmtree(build / ".jupyter_cache", ignore_errors=True)
        shutil.rmtree(build / "jupyter_execute", ignore_errors=True)
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
    return code


if __name__ == "__main__":
    sys.exit(main())
