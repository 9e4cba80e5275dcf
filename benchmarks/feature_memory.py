"""Peak memory of diffusion-feature probing: streamed pixel sampling vs all features in memory.

Feature extraction plus probe training for 50 labelled images at 64 px (the gpu profile's U-Net,
decoder blocks and timesteps as in chapter 4), run twice in fresh processes:

- ``streamed``: fdiff's way. Images pass through the U-Net a batch at a time and only a random
  subset of each image's pixels is kept (``fdiff.features.sample_pixels``);
- ``all-in-memory``: every pixel feature of every image is stored first (the original
  implementation's approach), then the same probe trains on all of them.

Peak resident memory (``ru_maxrss``) of each process is printed side by side with the ratio.
The U-Net's weights are random: memory does not depend on them.

    python benchmarks/feature_memory.py
    python benchmarks/feature_memory.py --images 4 --size 32 --profile ci   # a quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run(mode: str, args) -> dict:
    import torch

    from fdiff.features import DiffusionFeatures, decoder_blocks, sample_pixels
    from fdiff.probing import ProbeConfig, ProbeEnsemble
    from fdiff.profiles import get_profile
    from fdiff.schedules import NoiseSchedule
    from fdiff.unet import UNet, UNetConfig
    from fdiff.worlds import ShapesDataset

    torch.manual_seed(0)
    profile = get_profile(args.profile)
    model = UNet(UNetConfig.from_profile(profile)).eval()
    schedule = NoiseSchedule("cosine", profile.num_timesteps)
    n_blocks = len(decoder_blocks(model))
    blocks = list(range(n_blocks // 3, n_blocks))  # the middle and fine decoder blocks
    ts = [round(f * profile.num_timesteps) for f in (0.05, 0.15, 0.25)]
    fx = DiffusionFeatures(model, schedule, blocks, ts, (3, args.size, args.size))
    data = ShapesDataset(args.images, args.size)
    t0 = time.perf_counter()
    per_image = None if mode == "all-in-memory" else args.pixels
    X, y = sample_pixels(
        fx, data, list(range(args.images)), pixels_per_image=per_image, batch_size=2, progress=False
    )
    probe = ProbeEnsemble(
        fx.dim,
        len(data.CLASS_NAMES),
        ProbeConfig(ensemble_size=args.ensemble, max_epochs=args.epochs),
    )
    probe.fit(X, y)
    return {
        "mode": mode,
        "feature_dim": fx.dim,
        "pixels": len(X),
        "feature_gb": X.numel() * X.element_size() / 2**30,
        "seconds": time.perf_counter() - t0,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--profile", default="gpu", help="whose U-Net widths to use")
    parser.add_argument("--pixels", type=int, default=256, help="pixels kept per image")
    parser.add_argument("--ensemble", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args)))
        return
    rows = []
    for mode in ("streamed", "all-in-memory"):
        cmd = [sys.executable, __file__, "--mode", mode] + sys.argv[1:]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"{args.images} images at {args.size} px, {args.profile} U-Net, "
        f"feature dim {rows[0]['feature_dim']}, {args.pixels} pixels/image when streamed"
    )
    print(f"{'mode':15s}{'pixels':>10s}{'features GB':>13s}{'peak RSS GB':>13s}{'seconds':>9s}")
    for r in rows:
        print(
            f"{r['mode']:15s}{r['pixels']:10d}{r['feature_gb']:13.2f}"
            f"{r['peak_rss_gb']:13.2f}{r['seconds']:9.1f}"
        )
    print(
        f"peak memory ratio all-in-memory / streamed: "
        f"{rows[1]['peak_rss_gb'] / rows[0]['peak_rss_gb']:.1f}"
    )


if __name__ == "__main__":
    main()
