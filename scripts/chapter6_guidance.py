"""Chapter 6's measurements of guided sampling (:func:`fdiff.guided_study.guidance_study`):
Fréchet distance, diversity, class match and layout IoU of the guided runs at w in {0, 1, 2, 4},
the long-tail runs, the self-guided runs with 10, 20 and 50 clusters, those clustering the
deepest decoder block alone (part "features"), the diagnostic run whose clusters of those
features never mix classes (part "split"), the 20 self-labels of that block and the true classes
trained twice as long (part "long"), and self-guidance on the textured world (part
"world", :func:`fdiff.guided_study.world_study`). They took about an hour on two CPU cores
(n = 256), longer than a notebook cell should, so the chapter loads the result,
``data/results/chapter6_guidance.json``, which records the sha256 of every checkpoint it used;
the chapter checks them against the manifest. One command::

    python scripts/chapter6_guidance.py
    python scripts/chapter6_guidance.py --profile ci --n 8 --out /tmp/g.json   # smoke test
    python scripts/chapter6_guidance.py --part main; ... --part longtail      # in parts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fdiff.checkpoints import atomic_path
from fdiff.guided_study import PARTS, guidance_study, world_study
from fdiff.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "results" / "chapter6_guidance.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="samples per setting (default 256)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--profile", default="cpu",
                        help="cpu (default; committed checkpoints) or ci (trains tiny runs)")
    parser.add_argument("--part", choices=(*PARTS, "world"), action="append",
                        help="measure only this part (repeatable) and update its keys in --out")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    parts = tuple(args.part or (*PARTS, "world"))
    train = profile.name == "ci"
    shape_parts = tuple(p for p in parts if p != "world")
    result = guidance_study(profile, args.n, train=train, parts=shape_parts) if shape_parts \
        else {"profile": profile.name, "n": args.n, "sha256": {}, "seconds": 0.0}
    if "world" in parts:  # the textured world (fdiff.guided_study.world_study)
        result["world"] = world_study(profile, "shapes", args.n, train=train)
        result["sha256"].update(result["world"]["sha256"])
        result["seconds"] = round(result["seconds"] + result["world"]["seconds"], 1)
    command = "python scripts/chapter6_guidance.py" + (f" --n {args.n}" if args.n != 256 else "")
    if args.part and args.out.is_file():  # one part: keep the other's measurements
        old = json.loads(args.out.read_text())
        if old.get("n") != args.n or old.get("profile") != profile.name:
            parser.error(f"{args.out} holds another setting (n, profile): measure every part")
        result = {**old, **result, "sha256": {**old["sha256"], **result["sha256"]},
                  "seconds": round(old.get("seconds", 0) + result["seconds"], 1)}
    result = {**result, "command": command}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
