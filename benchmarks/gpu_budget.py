"""Each chapter's training in the gpu profile, in minutes of a T4, counted from FLOPs.

    python benchmarks/gpu_budget.py            # the gpu profile (the Colab target: 45 minutes)
    python benchmarks/gpu_budget.py --profile paper
    python benchmarks/gpu_budget.py --out data/results/gpu_budget.json   # for the course page

For every run a chapter trains when no weights are published or cached, the FLOPs of one
training step are counted on the CPU (fdiff.budget) and multiplied by the run's steps. Minutes
are given at the assumed sustained T4 rate and, as a lower bound, at the datasheet's peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fdiff.budget import COLAB_MINUTES, T4_PEAK_TFLOPS, T4_TFLOPS, chapter_flops, gpu_minutes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="gpu", choices=["gpu", "paper"])
    parser.add_argument("--out", type=Path, help="also write the estimates to this JSON file")
    args = parser.parse_args(argv)
    flops = chapter_flops(args.profile)
    print(f"profile {args.profile}; T4 at an assumed {T4_TFLOPS:.2f} TFLOP/s "
          f"(a quarter of the {T4_PEAK_TFLOPS:.0f} TFLOP/s fp16 peak)\n")
    over = []
    for chapter, runs in flops.items():
        total = sum(runs.values())
        for name, f in runs.items():
            print(f"  {chapter:15s} {name:46s} {f / 1e15:8.1f} PFLOP {gpu_minutes(f):7.1f} min")
        minutes = gpu_minutes(total)
        print(f"{chapter:17s}{'total':46s} {total / 1e15:8.1f} PFLOP {minutes:7.1f} min "
              f"(at peak {gpu_minutes(total, T4_PEAK_TFLOPS):5.1f}); "
              f"{minutes / COLAB_MINUTES:.2f} x the {COLAB_MINUTES:.0f}-minute budget\n")
        if minutes > COLAB_MINUTES:
            over.append(chapter)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "profile": args.profile, "assumed_tflops": T4_TFLOPS, "peak_tflops": T4_PEAK_TFLOPS,
            "budget_minutes": COLAB_MINUTES,
            "command": f"python benchmarks/gpu_budget.py --profile {args.profile} --out {args.out}",
            "chapters": {c: {"minutes": round(gpu_minutes(sum(r.values())), 1),
                             "runs": {n: round(gpu_minutes(f), 1) for n, f in r.items()}}
                         for c, r in flops.items()}}, indent=1) + "\n")
    if args.profile == "gpu" and over:
        print("over the budget:", ", ".join(over))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
