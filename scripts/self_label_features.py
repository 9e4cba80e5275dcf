"""How chapter 6's self-labels depend on the features they cluster, judged without labels and
with them (:func:`fdiff.guided_study.feature_choice`): for each step t (out of 1000), choice of
decoder blocks and number of clusters k, the agreement of the clusters under a recoloured,
mirrored and turned view of each image, beside their NMI, purity and pure share. The features
are those of ``ddpm_simple-shapes`` on the first ``--n`` training images of simple-shapes::

    python scripts/self_label_features.py                                  # the sweep
    python scripts/self_label_features.py --steps 150 --blocks 0 --views 4 # averaged views
    python scripts/self_label_features.py --profile ci --n 100 --k 4       # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fdiff.annotate import image_classes
from fdiff.checkpoints import atomic_path
from fdiff.guided_study import feature_choice
from fdiff.profiles import get_profile
from fdiff.runs import load_run, resolve_run
from fdiff.worlds import world


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu",
                        help="cpu (default; the committed model) or ci (trains a tiny one)")
    parser.add_argument("--n", type=int, default=3000, help="training images (default 3000)")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 150, 250, 400, 600],
                        help="steps t, out of 1000")
    parser.add_argument("--blocks", nargs="+", default=["0", "all"],
                        help="decoder blocks to cluster: a block's index or 'all'")
    parser.add_argument("--k", type=int, nargs="+", default=[20, 50], help="numbers of clusters")
    parser.add_argument("--views", type=int, default=1,
                        help="average each image's features over this many views (default 1)")
    parser.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    try:
        block_sets = [() if b == "all" else (int(b),) for b in args.blocks]
    except ValueError:
        parser.error(f"--blocks takes block indices or 'all', got {args.blocks}")
    model = load_run("ddpm_simple-shapes", profile)[0]
    schedule = resolve_run("ddpm_simple-shapes", profile).schedule.build()
    T = schedule.num_timesteps
    data = world("simple-shapes", args.n, profile.image_size, split="train")
    images = data.batch(list(range(args.n)))["image"]
    rows = feature_choice(model, schedule, images, image_classes(data, progress=False), args.steps,
                          block_sets, args.k, views=args.views, progress=False)
    print(f"simple-shapes, {args.n} images, {args.views} view(s) averaged; t out of {T}")
    print(f"{'t':>5s} {'blocks':>7s} {'k':>3s} {'agreement':>10s} {'NMI':>6s} {'purity':>7s} "
          f"{'pure share':>11s}")
    for r in rows:
        blocks = ",".join(map(str, r["blocks"])) or "all"
        print(f"{r['t']:5d} {blocks:>7s} {r['k']:3d} {r['agreement']:10.3f} {r['nmi']:6.3f} "
              f"{r['purity']:7.3f} {r['pure_share']:11.3f}")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps({"n": args.n, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
