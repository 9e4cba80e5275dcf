"""How many threads should a kernel use when another process keeps a core busy?

Times a training step of the cpu profile's U-Net (batch 64 at 32 px, bf16 autocast in
channels-last layout, as the book trains on a CPU) with 1 thread and with every core, first on
the machine as it is, then beside a busy-loop process, each in a fresh process, and prints the
seconds per step side by side with their ratio to the idle all-cores time.
``fdiff.profiles.free_cores`` and ``scripts/build_book.py`` act on the answer.

Usage::

    python benchmarks/busy_threads.py              # 10 timed steps per setting
    python benchmarks/busy_threads.py --steps 3    # quicker, noisier
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

STEP = """
import sys, time, torch
torch.set_num_threads({threads})
from fdiff.profiles import get_profile
from fdiff.unet import UNet, UNetConfig
p = get_profile("cpu")
m = UNet(UNetConfig.from_profile(p)).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters())
x = torch.randn(p.batch_size, 3, p.image_size, p.image_size)
x = x.contiguous(memory_format=torch.channels_last)
t = torch.randint(p.num_timesteps, (p.batch_size,))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (m(x, t).float() - x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
step()
start = time.perf_counter()
for _ in range({steps}):
    step()
print((time.perf_counter() - start) / {steps})
"""


def seconds_per_step(threads: int, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", STEP.format(threads=threads, steps=steps)],
                         capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    for busy in (False, True):
        loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for threads in sorted({1, cores}):
                rows.append((busy, threads, seconds_per_step(threads, args.steps)))
        finally:
            if loop is not None:
                loop.kill()
    base = next(s for busy, th, s in rows if not busy and th == cores)
    print(f"{'machine':22s} {'threads':>7s} {'s/step':>8s} {'vs idle, all cores':>19s}")
    for busy, threads, s in rows:
        where = "one busy process" if busy else "as it is"
        print(f"{where:22s} {threads:7d} {s:8.3f} {s / base:18.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
