"""One seeding convention for every random draw of the package.

A random stream is named by a seed and a stream of integers, e.g. ``(seed, step)`` for training
step ``step`` or ``(seed, i)`` for sample ``i``. :func:`derive_seed` folds them into one integer,
``s = seed; s = s * 1_000_003 + k`` for each k of the stream, and :func:`make_generator` returns a
``torch.Generator`` seeded with it. Nothing in ``fdiff`` draws from torch's global generator: a
function that draws takes ``generator=`` (or a seed), and models are initialised by
:func:`init_module` from a generator.

Example::

    g = make_generator(0, 17)                  # training step 17 of a run with seed 0
    gens = per_sample_generators(100, n)       # sample i from make_generator(100, i)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["derive_seed", "make_generator", "per_sample_generators", "randn", "init_module"]

Generator = torch.Generator | Sequence[torch.Generator]

_MULTIPLIER = 1_000_003  # a prime: streams of consecutive integers do not collide for small seeds
_MODULUS = 2**63


def _as_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def derive_seed(seed: int, *stream: int) -> int:
    """Fold ``seed`` and the integers of ``stream`` into one seed in [0, 2**63).

    ``derive_seed(seed, i) == seed * 1_000_003 + i`` for small values, so a stream of one integer
    gives consecutive, distinct seeds.
    """
    value = _as_int(seed, "seed")
    for k, part in enumerate(stream):
        value = value * _MULTIPLIER + _as_int(part, f"stream[{k}]")
    return value % _MODULUS


def make_generator(seed: int, *stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Return a ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, *stream)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *stream))
    return generator


def per_sample_generators(
    seed: int, n: int, *stream: int, device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """Return ``n`` generators, the i-th ``make_generator(seed, *stream, i)``: sample i then
    never depends on how many samples are drawn with it."""
    n = _as_int(n, "n")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_generator(seed, *stream, i, device=device) for i in range(n)]


def randn(shape: Sequence[int], generator: Generator, device=None, dtype=None) -> Tensor:
    """Draw N(0, I) of ``shape`` onto ``device`` from ``generator``, or from a list of them
    (row i from generator i, so that row i does not depend on the batch size).

    Each draw happens on its generator's own device and is then moved, so CPU generators drive
    a model on a GPU and a seed gives the same noise whatever the model's device.
    """
    if generator is None:
        raise ValueError("randn needs a generator (fdiff never draws from torch's global one)")
    if isinstance(generator, torch.Generator):
        generators, rows = [generator], [tuple(shape)]
    else:
        generators = list(generator)
        if len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
        rows = [(1, *shape[1:])] * len(generators)
    return torch.cat([
        torch.randn(r, generator=g, device=g.device, dtype=dtype).to(device)
        for r, g in zip(rows, generators, strict=True)
    ])


def init_module(factory: Callable[[], nn.Module], generator: torch.Generator) -> nn.Module:
    """Build ``factory()`` and initialise its weights from ``generator``, on the CPU.

    The module is built on the meta device (no memory, no random draws), then every
    convolution and linear layer gets PyTorch's default initialisation (Kaiming-uniform weights
    with a = sqrt(5), biases uniform in +-1/sqrt(fan_in)) drawn from ``generator`` in the order
    of ``module.modules()``, and every normalisation layer its deterministic reset. The same
    generator state always gives the same weights, and torch's global generator is not touched.
    """
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    initialised: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5), generator=generator)
            if sub.bias is not None:
                fan_in = sub.weight[0].numel()  # input channels times the kernel's size
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(sub.bias, -bound, bound, generator=generator)
        elif isinstance(sub, (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            sub.reset_parameters()
        else:
            continue
        initialised.update(id(p) for p in sub.parameters(recurse=False))
        initialised.update(id(b) for b in sub.buffers(recurse=False))
    missed = [n for n, p in module.named_parameters() if id(p) not in initialised]
    missed += [n for n, b in module.named_buffers() if id(b) not in initialised]
    if missed:
        raise TypeError(f"init_module does not know how to initialise {missed[:3]}")
    return module
