"""Chapter 1's "going further": how close do longer, deeper and reweighted runs come to the data?

Samples the committed cpu-profile checkpoints of chapter 1's variant runs from the same noise
(deterministic DDIM, and DDIM with fresh noise at every step for two of them) and measures, on
``--n`` images each:

- the Fréchet distance of each set of samples to held-out images, in the pooled features of an
  ImageNet MobileNetV2 (:func:`fdiff.metrics.frechet_distance`), and that of training images,
  the distance sampling noise alone leaves;
- how alike two models' pictures from the same noise are: their squared difference as a
  fraction of that between pictures drawn from different noises.

The sampling takes longer than a notebook cell should (about ten minutes on two cores), so the
chapter loads the result, ``data/results/chapter1_variants.json``, which records the sha256 of
every checkpoint it used; the chapter checks them against the manifest. One command:

    python scripts/chapter1_variants.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fdiff import NoiseSchedule, generate
from fdiff.checkpoints import atomic_path
from fdiff.imagenet import load_mobilenet_v2, pooled_features
from fdiff.metrics import frechet_distance
from fdiff.profiles import get_profile
from fdiff.runs import load_run, read_manifest
from fdiff.seeding import per_sample_generators
from fdiff.worlds import ShapesDataset

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "results" / "chapter1_variants.json"

# name in the chapter: the run
RUNS = {
    "model of the main line": "ddpm_shapes",
    "Min-SNR weighting": "ddpm_shapes-minsnr",
    "longer run": "ddpm_shapes-long",
    "twice the depth": "ddpm_shapes-deep",
    "twice the depth, trained longer": "ddpm_shapes-deep-long",
}
FRESH = ("model of the main line", "twice the depth, trained longer")


def alike(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared difference of two sets of pictures drawn from the same noises, as a fraction of
    that between pictures drawn from different noises (``y`` shifted by one)."""
    return ((x - y) ** 2).mean().item() / ((x - y.roll(1, 0)) ** 2).mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="samples per model (default 256)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    profile = get_profile("cpu")
    S, n = profile.image_size, args.n
    schedule = NoiseSchedule("cosine", profile.num_timesteps)
    manifest = read_manifest()
    test = ShapesDataset(profile.num_test_images, S, split="test")
    train = ShapesDataset(profile.num_train_images, S, split="train")
    net = load_mobilenet_v2()
    reference = pooled_features(net, test.batch(list(range(n)))["image"])

    def sample(model, eta: float) -> torch.Tensor:
        return generate(model, schedule, (n, 3, S, S), method="ddim", num_steps=profile.ddim_steps,
                        eta=eta, generator=per_sample_generators(100, n))

    start = time.perf_counter()
    steps, fd, fd_fresh, samples = {}, {}, {}, {}
    for label, run in RUNS.items():
        model, info = load_run(run, profile, train=False, progress=False)
        steps[label] = info["steps"]
        samples[label] = sample(model, 0.0)
        fd[label] = frechet_distance(pooled_features(net, samples[label]), reference)
        if label in FRESH:
            fd_fresh[label] = frechet_distance(pooled_features(net, sample(model, 1.0)), reference)
        print(f"{label:34s} {steps[label]:6d} steps: Fréchet distance {fd[label]:6.2f}"
              + (f", with fresh noise {fd_fresh[label]:6.2f}" if label in fd_fresh else "")
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    fd_data = frechet_distance(pooled_features(net, train.batch(list(range(n)))["image"]),
                               reference)
    same_arch = [samples[k] for k in ("model of the main line", "Min-SNR weighting", "longer run")]
    result = {
        "command": "python scripts/chapter1_variants.py" + (f" --n {n}" if n != 256 else ""),
        "profile": profile.name,
        "n": n,
        "ddim_steps": profile.ddim_steps,
        "runs": RUNS,
        "sha256": {label: manifest[run]["sha256"] for label, run in RUNS.items()},
        "steps": steps,
        "fd": {k: round(v, 3) for k, v in fd.items()},
        "fd_fresh_noise": {k: round(v, 3) for k, v in fd_fresh.items()},
        "fd_training_images": round(fd_data, 3),
        # at most, over the three models of one architecture (same initial weights)
        "alike_same_architecture": round(max(alike(x, y) for i, x in enumerate(same_arch)
                                             for y in same_arch[i + 1:]), 4),
        "alike_deep_vs_longer": round(alike(samples["twice the depth"], samples["longer run"]), 4),
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(f"training images: {fd_data:.2f}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
