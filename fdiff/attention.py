"""Self-attention maps of a U-Net, read through hooks that leave its forward pass unchanged.

Every :class:`~fdiff.unet.Attention` module of a U-Net (the lowest resolution's by default:
encoder, middle and decoder) computes, per head, ``softmax(q k^T / sqrt(d))`` over its H*W
positions ("tokens"). The fused attention kernel never materialises that matrix, so a forward
hook recomputes it from the module's input with the module's own weights:
:func:`attention_probs`. :func:`capture_attention` records it for every module while the model
runs; the hooks come off when the context exits, also after an error.

Row ``i`` of a map (B, heads, N, N) is how token ``i`` spreads its attention over all tokens;
each row sums to 1. :func:`attend` applies a map to the module's values and output projection,
so that a test can check the maps reproduce the module's output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import Attention

__all__ = ["attention_modules", "attention_probs", "attend", "capture_attention",
           "attention_maps"]


def attention_modules(model: nn.Module) -> dict[str, Attention]:
    """Every self-attention module of ``model``, by its dotted name, in execution order."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}
    if not found:
        raise ValueError(f"{type(model).__name__} has no self-attention module")
    return found


def _qkv(module: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b, c, h, w = x.shape
    heads = module.num_heads
    tokens = module.norm(x).flatten(2).transpose(1, 2)
    qkv = F.linear(tokens, module.qkv.weight.view(3 * c, c), module.qkv.bias)
    q, k, v = qkv.view(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    return q, k, v  # each (B, heads, N, d)


def attention_probs(module: Attention, x: Tensor) -> Tensor:
    """The attention map (B, heads, N, N) that ``module`` computes on its input ``x``
    (B, C, H, W), N = H*W, in float32."""
    q, k, _ = _qkv(module, x)
    q, k = q.float(), k.float()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def attend(module: Attention, x: Tensor, probs: Tensor) -> Tensor:
    """The module's output on ``x`` computed with the attention map ``probs``: the map applied
    to the values, then the output projection and the residual connection."""
    b, c, h, w = x.shape
    _, _, v = _qkv(module, x)
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, h * w, c)
    out = F.linear(out, module.proj.weight.view(c, c), module.proj.bias)
    return x + out.transpose(1, 2).reshape(b, c, h, w)


@contextmanager
def capture_attention(modules: Mapping[str, Attention]) -> Iterator[dict[str, Tensor]]:
    """Record each module's attention map while the context is open.

    Yields a dict that fills with ``{name: map (B, heads, N, N)}`` as the modules run (a module
    run twice keeps its last map). The model's outputs do not change.
    """
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():

            def hook(mod, args, output, name=name):
                with torch.no_grad():
                    store[name] = attention_probs(mod, args[0])

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_maps(model: nn.Module, schedule, images: Tensor, t: int,
                   noise: Tensor | None = None,
                   layers: list[str] | None = None) -> dict[str, Tensor]:
    """Noise ``images`` (B, 3, H, W) to step ``t`` and return the attention map of each
    chosen layer (default: all), averaged over its heads: ``{name: (B, N, N)}`` on the CPU.

    ``noise``: the noise to add (default: a fixed draw, seed 0, so that calls agree).
    """
    from .profiles import model_device

    device = model_device(model)
    if noise is None:
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    tt = torch.full((len(images),), int(t), dtype=torch.long)
    xt = schedule.add_noise(images, noise, tt)
    modules = attention_modules(model)
    if layers is not None:
        unknown = sorted(set(layers) - set(modules))
        if unknown:
            raise ValueError(f"no attention layer {unknown}; the model has {list(modules)}")
        modules = {name: modules[name] for name in layers}
    with capture_attention(modules) as store:
        model(xt.to(device), tt.to(device))
    return {name: a.mean(1).cpu() for name, a in store.items()}
