"""The training command, ``python -m fdiff.train NAME``: trains a registered run.

Its options are few and none of them names a model setting: a run's settings are its fields,
changed with ``--set PATH=VALUE`` (``--set model.num_res_blocks=2``, ``--set steps=5000``), so a
new field of a config is on the command line the moment it exists.

By default the trained model goes where :func:`fdiff.runs.load_run` looks for it (the cache), so
a chapter then loads it. ``--out-dir DIR`` publishes it to ``DIR`` and its manifest instead;
replacing a checkpoint that is already there needs ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
from pathlib import Path

import torch

from .checkpoints import ensure_writable, read_manifest, register_checkpoint, save_model
from .configs import ConfigError, field_paths
from .profiles import PROFILES, get_profile
from .runs import RUNS, resolve_run, run_paths, train_run
from .train import Terminated

__all__ = ["main", "parser"]


def _run_list() -> str:
    width = max(map(len, RUNS)) + 2
    lines = [f"  {name:{width}s}{entry.about}" for name, entry in RUNS.items()]
    return "registered runs:\n" + "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """Return the command's argument parser; its help lists the registered runs."""
    p = argparse.ArgumentParser(
        prog="python -m fdiff.train",
        description="Train a registered run and save its EMA weights (see fdiff.runs).",
        epilog=_run_list() + textwrap.dedent("""

            examples:
              python -m fdiff.train ddpm_shapes --profile cpu
              python -m fdiff.train ddpm_shapes --set steps=5000 --set model.num_res_blocks=2
              python -m fdiff.train factorized_shapes --show     # print the run, train nothing
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="a registered run (listed below)")
    p.add_argument("--profile", choices=sorted(PROFILES), help="default: $FDIFF_PROFILE")
    p.add_argument("--dataset", help="train the run on another dataset (e.g. pets)")
    p.add_argument("--set", dest="changes", action="append", default=[], metavar="PATH=VALUE",
                   help="change one field of the run (repeatable); --show lists the fields")
    p.add_argument("--show", action="store_true", help="print the run and its fields, then stop")
    p.add_argument("--out-dir", type=Path, help="publish to this folder and its manifest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already published under this name in --out-dir")
    p.add_argument("--save-every", type=int, default=250, metavar="N",
                   help="write the resume file every N steps (default 250)")
    p.add_argument("--data-root", type=Path, help="where the real datasets are")
    p.add_argument("--download", action="store_true", help="fetch a missing real dataset")
    return p


def _command(args: argparse.Namespace) -> str:
    """The command that reproduces the run (the options that change it, shell-quoted)."""
    words = [args.name, "--profile", get_profile(args.profile).name]
    if args.dataset:
        words += ["--dataset", args.dataset]
    for item in args.changes:
        words += ["--set", item]
    return "python -m fdiff.train " + shlex.join(words)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, train the run, save it (see the module's description)."""
    p = parser()
    args = p.parse_args(argv)
    if args.name not in RUNS:
        p.error(f"no run named {args.name!r}; see the list below --help")
    if args.save_every < 1:
        p.error(f"--save-every must be >= 1, got {args.save_every}")
    run = resolve_run(args.name, args.profile, args.dataset)
    for item in args.changes:
        path, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set takes PATH=VALUE, got {item!r}")
        try:
            run = run.change(path.strip(), value.strip())
        except (ConfigError, ValueError, TypeError) as err:
            p.error(f"--set {item}: {err}")
    if args.show:
        print(json.dumps(run.to_json(), indent=2))
        print("fields:", ", ".join(field_paths(run)))
        return
    path, resume = run_paths(args.name, run)
    if args.out_dir is not None:
        path = args.out_dir / f"{args.name}.safetensors"
        if (path.exists() or args.name in read_manifest(args.out_dir)) and not args.overwrite:
            p.error(f"{path} is already published; pass --overwrite to replace it")
    try:  # before training, not after it: where the model and the resume file will go
        ensure_writable(path.parent)
        ensure_writable(resume.parent)
    except PermissionError as err:
        p.error(str(err))
    try:
        ema, extra, tensors = train_run(run, resume, root=args.data_root,
                                        download=args.download, save_every=args.save_every,
                                        profile=args.profile)
    except Terminated:
        sys.exit(f"stopped by SIGTERM; {resume} holds the progress: run the same command again "
                 f"to resume")
    save_model(path, ema, extra=extra, tensors=tensors)
    if args.out_dir is None:
        print(f"saved {path}; load_run({args.name!r}) finds it")
        return
    tail = extra["losses"][-100:]
    entry = register_checkpoint(
        args.name, path, _command(args), run=extra["run"],
        profile=get_profile(args.profile).name, duration_s=extra["seconds"],
        device=extra["device"], final_loss=round(sum(tail) / len(tail), 5),
        torch=torch.__version__,
    )
    print(json.dumps({args.name: {k: v for k, v in entry.items() if k != "run"}}, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
