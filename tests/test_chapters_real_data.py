"""The chapters that run on a real dataset in the gpu profile, executed on stand-in Pets files.

The gpu profile cannot run here (no GPU, no internet, no dataset), but its code path can: the
ci profile with ``FDIFF_DATASET=pets`` reads a tiny Oxford-IIIT Pets folder written below,
trains its tiny models on it and runs every cell of the chapter.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"


def write_stand_in_pets(root: Path, n_trainval: int = 6, n_test: int = 10) -> Path:
    """Write a tiny Oxford-IIIT Pets: images with a bright ellipse as the pet, and trimaps."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations" / "trimaps").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("trainval", n_trainval), ("test", n_test)):
        lines = []
        for k in range(n):
            name = f"{split}_pet_{k}"
            h, w = 24 + 2 * (k % 3), 28
            yy, xx = np.mgrid[:h, :w]
            cy, cx = h / 2 + rng.uniform(-3, 3), w / 2 + rng.uniform(-3, 3)
            inside = ((yy - cy) / 7) ** 2 + ((xx - cx) / 9) ** 2 < 1
            pixels = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
            pixels[inside] = rng.integers(150, 255, 3, dtype=np.uint8)
            Image.fromarray(pixels).save(base / "images" / f"{name}.jpg")
            trimap = np.where(inside, 1, 2).astype(np.uint8)
            Image.fromarray(trimap, mode="L").save(base / "annotations" / "trimaps" / f"{name}.png")
            lines.append(f"{name} {k % 2 + 1} {k % 2 + 1} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("chapter", ["03_segmenting.ipynb", "04_features.ipynb",
                                     "05_discovery.ipynb", "06_guidance.ipynb"])
def test_chapter_runs_on_stand_in_pets(chapter, tmp_path, monkeypatch):
    # chapter 6 clusters the training images into 50 self-labels: it needs more than 50
    root = write_stand_in_pets(tmp_path / "data", n_trainval=60 if chapter[:2] == "06" else 6)
    # The kernel inherits this environment: ci sizes, Pets as the dataset, a fresh cache.
    monkeypatch.setenv("FDIFF_PROFILE", "ci")
    monkeypatch.setenv("FDIFF_DATASET", "pets")
    monkeypatch.setenv("FDIFF_DATA", str(root))
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(CHAPTERS / chapter, as_version=4)
    NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(CHAPTERS)}}).execute()
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
    # the chapter says what it ran on: ch3 names the dataset, ch4 its classes, ch5 its model,
    # ch6 its clusters and the dataset's own labels (the stand-in's two)
    said = {"03": "pets: 10 held-out images", "04": "('background', 'pet')",
            "05": "ddpm_pets; 6 labelled training images",
            "06": "pets: 50 clusters, 8 samples per row"}[chapter[:2]]
    assert said in text
    # the models were trained on the stand-in pets, under their own names
    trained = (tmp_path / "cache" / "checkpoints").glob("*.safetensors")
    names = {p.name.split("-")[0] for p in trained}
    expected = {"03": {"factorized_pets"}, "06": {"ddpm_pets", "guided_none_pets",
                                                   "guided_self_pets"}}.get(
        chapter[:2], {"ddpm_pets", "factorized_pets"})
    assert expected <= names
