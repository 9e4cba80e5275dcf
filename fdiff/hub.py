"""Published weights: a run's checkpoint fetched by name instead of trained.

The runs a chapter loads in the ``cpu`` profile are committed with the book. For the other
profiles, weights trained once may be published: ``data/checkpoints/published.json`` maps a run
name to ``{"digest": ..., "url": ..., "sha256": ...}``, where ``digest`` is
:meth:`fdiff.runs.Run.digest` of the run the weights come from (so weights are only ever used
for exactly the run that made them) and ``url`` is any URL urllib opens (``https://``,
``file://`` for a local mirror). ``$FDIFF_WEIGHTS_URL``, when set, replaces the folder part of
every URL (a mirror holding the same file names).

:func:`fetch_published` downloads into the cache (``$FDIFF_CACHE``), with a progress bar,
checks the file's sha256 and only then moves it into place; :func:`fdiff.runs.load_run` calls
it before it would train.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from .checkpoints import CheckpointError, atomic_path, checkpoint_dir, sha256_of

__all__ = ["published", "published_entry", "fetch_published"]

MIRROR_VAR = "FDIFF_WEIGHTS_URL"


def published(directory: str | Path | None = None) -> dict:
    """Return the table of published weights (empty when the file is absent)."""
    path = Path(directory or checkpoint_dir()) / "published.json"
    if not path.is_file():
        return {}
    table = json.loads(path.read_text())
    for name, entry in table.items():
        missing = {"digest", "url", "sha256"} - set(entry)
        if missing:
            raise CheckpointError(f"{path}: the entry of {name!r} lacks {sorted(missing)}")
    return table


def published_entry(name: str, digest: str, directory: str | Path | None = None) -> dict | None:
    """Return the published entry of run ``name`` if it was made by the run ``digest``."""
    entry = published(directory).get(name)
    return entry if entry is not None and entry["digest"] == digest else None


def _url(entry: dict) -> str:
    mirror = os.environ.get(MIRROR_VAR)
    if not mirror:
        return entry["url"]
    return mirror.rstrip("/") + "/" + entry["url"].rsplit("/", 1)[-1]


def fetch_published(name: str, digest: str, dest: str | Path, progress: bool = True,
                    directory: str | Path | None = None) -> Path | None:
    """Download the published weights of run ``name`` (made by run ``digest``) to ``dest``.

    Returns ``dest``, or None when no such weights are published. Raises ConnectionError with
    what to do when the download fails, and CheckpointError when the file's sha256 is not the
    published one (nothing is kept then).
    """
    entry = published_entry(name, digest, directory)
    if entry is None:
        return None
    url = _url(entry)
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              desc=f"downloading {name}",
                                              disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
            if sha256_of(tmp) != entry["sha256"]:
                raise CheckpointError(
                    f"the weights downloaded for {name!r} from {url} do not have the published "
                    f"sha256; nothing was kept. Try again, or train the run instead")
    except OSError as err:  # urllib's URLError included
        reason = getattr(err, "reason", None) or err
        raise ConnectionError(
            f"could not download the published weights of {name!r} from {url} ({reason}). "
            f"Check the internet connection, set ${MIRROR_VAR} to a folder or server that holds "
            f"{url.rsplit('/', 1)[-1]}, or train the run: load_run({name!r}, train=True)"
        ) from err
    return dest
