"""When does the factorized denoiser's partition find the object? The emergence study.

Trains the factorized run of each study world (``emergence_<world>`` in :data:`fdiff.runs.RUNS`:
the main world "object" and worlds that change one of its factors) and, at several points of
its budget, measures on that world's held-out scenes:

- ``iou``: the foreground IoU of its partition, the foreground read without labels
  (:func:`fdiff.metrics.border_foreground`: the region that holds less of the frame; none in an
  image whose partition is one region);
- ``iou_best``: the same with the better region in each image, chosen by looking at its labels:
  how much of the object the partition holds at all, whatever rule reads it;
- ``gap``: the uniform-mask gap, how much the denoising loss rises when the masks are replaced
  by 1/K (:func:`fdiff.segmentation.uniform_mask_gap`): what the masks are worth to the model
  (a collapsed model loses too, since uniform masks scale its skips down);
- ``largest``: the largest region's mean share of the image (1 when the partition has collapsed
  into one region).

At the end of each training it also records what the soft masks follow: the Pearson correlation,
pixel by pixel, of the smaller region's mask with the image's edges
(:func:`fdiff.metrics.edge_strength`) and with the true foreground, that mask on the first few
test scenes, and the single-region gap: the loss rise when one region takes every pixel, what
the partition is worth against none (``diagnostics``). A study file whose diagnostics lack one
of these gets them on the next run, from the trained models, without training.

A fidelity check rides along: the simplest world trained again with the first runs' mask
generator (half the width, no attention) beside the paper's (``simple-shapes, narrow mask
generator``).

Then the transfer: the simplest world's committed model (``factorized_simple-shapes-replicate``,
which splits figure from ground on one flat shape per image) on the main world without training
(step 0), and fine-tuned on it for the same budget. Results go to
``data/emergence.json`` (small, committed), which chapter 3 plots. One command reproduces it:

    python scripts/emergence.py                  # cpu profile; resumes where it stopped
    python scripts/emergence.py --runs object objects --no-transfer   # a part, e.g. in parallel

Every training resumes from its resume file in ``$FDIFF_CACHE`` and every point is written
(under a lock) as soon as it is measured, so an interruption loses nothing and two processes
may share the work. The trained runs land where :func:`fdiff.runs.load_run` finds them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from filelock import FileLock

from fdiff.checkpoints import atomic_path, load_model, save_model
from fdiff.configs import masks_to_json
from fdiff.metrics import (
    border_foreground,
    edge_strength,
    foreground_scores,
    mask_stats,
    pixel_correlation,
)
from fdiff.profiles import default_device
from fdiff.runs import cache_dir, load_run, resolve_run, run_paths, train_run
from fdiff.seeding import make_generator, randn
from fdiff.segmentation import segment_dataset, single_region_gap, uniform_mask_gap
from fdiff.train import train
from fdiff.worlds import world

ROOT = Path(__file__).resolve().parents[1]
WORLDS = ("object", "objects", "object-shared", "object-flat", "simple-shapes")  # main first
MAIN = "object"
# The transfer starts from the simplest world's committed model, the one that does split figure
# from ground in chapter 3 (one flat shape per image, replicate padding).
SIMPLEST = "simple-shapes"
SIMPLEST_RUN = "factorized_simple-shapes-replicate"
# Every run of the study by its label: one per world, and the fidelity check on the mask
# generator (the first runs' narrow one, without attention, against the paper's full one).
STUDY = {**{w: f"emergence_{w}" for w in WORLDS},
         "simple-shapes, narrow mask generator": "emergence_simple-shapes-narrow"}
FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)  # the budget points, as fractions of the study's budget
KEYS = ("iou", "iou_best", "gap", "largest")
EXAMPLES = 8  # test scenes whose final masks the results keep
DIAGNOSTICS = ("edge_corr", "fg_corr", "single_gap", "examples")


def measure(model, schedule, data, t: int, seed: int = 0, diagnose: bool = False):
    """The study's three numbers for ``model`` on the scenes ``data``, segmenting at step t;
    with ``diagnose`` also what the smaller region's soft mask follows (its correlation with the
    image's edges and with the true foreground, mean over images), that mask on the first few
    scenes, and the single-region gap (:func:`fdiff.segmentation.single_region_gap`: what the
    partition is worth against none; near 0 for a collapsed model).
    Returns (point, diagnostics or None)."""
    was_training = model.training
    model.eval()
    masks = segment_dataset(model, schedule, data, t, seed=seed, progress=False)
    batch = data.batch(range(len(data)))
    images, truth = batch["image"], batch["mask"]
    noise = randn(images.shape, make_generator(seed, 1))
    point = {
        # region=1: the rule's figure, never its complement (which the labels might prefer)
        "iou": round(foreground_scores(border_foreground(masks.argmax(1)), truth,
                                       region=1)["iou"], 4),
        "iou_best": round(foreground_scores(masks.argmax(1), truth, per_image=True)["iou"], 4),
        "gap": round(uniform_mask_gap(model, schedule, images, t, noise=noise)["gap"], 4),
        "largest": round(mask_stats(masks)["largest_area"], 4),
    }
    model.train(was_training)
    if not diagnose:
        return point, None
    smaller = masks.flatten(2).mean(2).argmin(1)  # per image, the region with less mass
    m = masks[torch.arange(len(masks)), smaller]
    single = single_region_gap(model, schedule, images, t, noise=noise)["gap"]
    return point, {"edge_corr": round(pixel_correlation(m, edge_strength(images)), 4),
                   "fg_corr": round(pixel_correlation(m, truth.float()), 4),
                   "single_gap": round(single, 4),
                   # The first few scenes' masks, in 1/255 steps, for the chapter to show.
                   "examples": masks_to_json(m[:EXAMPLES])}


class Results:
    """The study's results file, updated point by point under a lock (processes may share it)."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.header = path, header

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def _update(self, change) -> None:
        """Read the file, apply ``change(data)`` and write it back, all under the lock."""
        with FileLock(f"{self.path}.lock", timeout=120):
            data = self._read()
            if data.get("profile") not in (None, self.header["profile"]):
                raise ValueError(f"{self.path} holds the {data['profile']!r} profile's study; "
                                 f"use --out for another profile")
            data.update(self.header)
            change(data)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(data, indent=1) + "\n")

    def record(self, key: str, step: int, point: dict[str, float]) -> None:
        def change(data):
            entry = data.setdefault("worlds", {}).setdefault(key, {"steps": []})
            rows = {s: {k: entry[k][i] for k in KEYS} for i, s in enumerate(entry["steps"])}
            rows[step] = point
            steps = sorted(rows)
            data["worlds"][key] = {"steps": steps, **{k: [rows[s][k] for s in steps] for k in KEYS}}

        self._update(change)
        print(f"{key:22s} step {step:5d}: IoU {point['iou']:.3f} (best region per image "
              f"{point['iou_best']:.3f}), uniform-mask gap "
              f"{point['gap']:+.3f}, largest region {point['largest']:.2f}", flush=True)

    def diagnose(self, key: str, values: dict) -> None:
        self._update(lambda data: data.setdefault("diagnostics", {}).__setitem__(key, values))
        print(f"{key:22s} the smaller region's mask correlates {values['edge_corr']:+.3f} with "
              f"edges, {values['fg_corr']:+.3f} with the foreground; one region for all pixels "
              f"raises the loss by {values['single_gap']:+.3f}", flush=True)

    def diagnosed(self, key: str) -> bool:
        found = self._read().get("diagnostics", {}).get(key, {})
        return all(name in found for name in DIAGNOSTICS)

    def has(self, key: str, step: int) -> bool:
        return step in self._read().get("worlds", {}).get(key, {}).get("steps", [])

    def take(self, key: str, step: int, model, schedule, data, t: int, last: bool) -> None:
        """Measure and record ``model`` at ``step`` unless that is done already; at the
        ``last`` point also its diagnostics. The scenes are segmented once for both."""
        point_missing = not self.has(key, step)
        diagnose = last and not self.diagnosed(key)
        if point_missing or diagnose:
            point, diagnostics = measure(model, schedule, data, t, diagnose=diagnose)
            if point_missing:
                self.record(key, step, point)
            if diagnose:
                self.diagnose(key, diagnostics)

    def at_points(self, key: str, points, schedule, data, t: int):
        """A training callback that takes the budget points (the last with diagnostics)."""
        def callback(step, result):
            if step in points:
                self.take(key, step, result.ema, schedule, data, t, last=step == points[-1])
        return callback


def trained_model(key: str, run, results: Results, points, tests, t) -> None:
    """Train (or resume, or load) the study run labelled ``key``, recording the budget points."""
    path, resume = run_paths(STUDY[key], run)
    schedule = run.schedule.build()
    data = tests[run.data.name]
    if not path.exists():
        ema, extra, tensors = train_run(run, resume, save_every=points[0],
                                        callback=results.at_points(key, points, schedule, data, t))
        save_model(path, ema, extra=extra, tensors=tensors)
    model = load_model(path)[0].to(default_device())
    results.take(key, run.train.steps, model, schedule, data, t, last=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--runs", nargs="*", default=list(STUDY), choices=list(STUDY),
                        metavar="LABEL", help=f"the study's runs to do (all: {', '.join(STUDY)})")
    parser.add_argument("--no-transfer", dest="transfer", action="store_false")
    parser.add_argument("--test-images", type=int, default=256)
    parser.add_argument("--t", type=int, default=63,
                        help="the segmentation step (cosine schedule; the paper's t = 30 of a "
                             "linear schedule has the same noise level)")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "emergence.json")
    args = parser.parse_args(argv)
    runs = {key: resolve_run(name, args.profile) for key, name in STUDY.items()}
    budget = runs[MAIN].train.steps
    points = sorted({max(1, round(f * budget)) for f in FRACTIONS})
    results = Results(args.out, {
        "profile": args.profile, "t": args.t, "test_images": args.test_images,
        "image_size": runs[MAIN].data.image_size,
        "budget_points": points, "transfer_from": SIMPLEST, "main_world": MAIN,
        "command": "python scripts/emergence.py" + (
            f" --profile {args.profile}" if args.profile != "cpu" else "")})
    tests = {w: world(w, args.test_images, runs[MAIN].data.image_size, split="test")
             for w in WORLDS}
    for key in STUDY:
        if key in args.runs:
            trained_model(key, runs[key], results, points, tests, args.t)
    if args.transfer:
        key, run = f"{SIMPLEST} -> {MAIN}", runs[MAIN]
        schedule, data = run.schedule.build(), tests[MAIN]
        start, _ = load_run(SIMPLEST_RUN, args.profile)
        results.take(key, 0, start, schedule, data, args.t, last=False)
        if not (results.has(key, points[-1]) and results.diagnosed(key)):
            digest = resolve_run(SIMPLEST_RUN, args.profile).digest()
            resume = (cache_dir() / "runs" / f"emergence-transfer-{digest}-"
                      f"{run.digest(budget=False)}.resume.safetensors")
            tuned = train(start.train(), schedule, run.data.training_images(), run.train,
                          checkpoint=resume, save_every=points[0],
                          callback=results.at_points(key, points, schedule, data, args.t))
            results.take(key, points[-1], tuned.ema, schedule, data, args.t, last=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
