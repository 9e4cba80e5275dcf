"""Chapter 5's synthetic pairs: generated images with their AttentionCut masks.

Generates ``--n`` images with the cpu profile's ``ddpm_shapes-deep-long`` (DDIM, 50 steps,
sample ``i`` from seed ``i``), segments each with AttentionCut at the settings the chapter
chooses (:class:`fdiff.attention_cut.CutConfig`'s defaults), drops masks that cover less than 2%
or more than 90% of the image, and writes the pairs with the settings and the model's sha256 to
``data/results/synthetic_pairs.safetensors`` (small, committed). Sampling takes longer than a
chapter's cell should, so the chapter loads the file and checks that its settings are the ones
it chose. One command:

    python scripts/synthesize_pairs.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from fdiff import NoiseSchedule
from fdiff.attention_cut import CutConfig
from fdiff.discovery import save_pairs, synthesize
from fdiff.profiles import get_profile
from fdiff.runs import load_run, read_manifest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "results" / "synthetic_pairs.safetensors"
RUN = "ddpm_shapes-deep-long"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="images to generate (default 512)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    profile = get_profile("cpu")
    model, _ = load_run(RUN, profile, train=False, progress=False)
    schedule = NoiseSchedule("cosine", profile.num_timesteps)
    cut = CutConfig()
    start = time.perf_counter()
    with torch.no_grad():
        pairs = synthesize(model, schedule, args.n, (3, profile.image_size, profile.image_size),
                           cut, num_steps=profile.ddim_steps)
    seconds = time.perf_counter() - start
    save_pairs(args.out, pairs, run=RUN, sha256=read_manifest()[RUN]["sha256"],
               cut=dataclasses.asdict(cut), n=args.n, num_steps=profile.ddim_steps,
               seconds=round(seconds, 1), command="python scripts/synthesize_pairs.py"
               + (f" --n {args.n}" if args.n != 512 else ""))
    kept = pairs["kept"]
    print(f"{int(kept.sum())} of {args.n} kept; mean mask area {pairs['area'][kept].mean():.3f}; "
          f"{seconds / 60:.1f} minutes; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
