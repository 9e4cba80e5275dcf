"""Object discovery as in DiffusionSeg (Ma et al., 2023): synthesis, then exploitation.

1. **Synthesis** (:func:`synthesize`): generate images with a trained diffusion model and
   segment each with :func:`fdiff.attention_cut.attention_cut`; a quality filter drops masks that
   are (nearly) empty or full. The pairs are saved as one safetensors file
   (:func:`save_pairs`, :func:`load_pairs`) and read as a dataset (:class:`Pairs`).
2. **Exploitation**: a light decoder, here chapter 4's pixel-MLP ensemble, trained on the
   synthetic pairs only, reads real images through :class:`InversionFeatures`: each image is
   mapped towards noise by DDIM inversion, and the U-Net's decoder activations are recorded at
   chosen steps of that path, upsampled to the image and concatenated. Unlike chapter 4's
   shared-noise features, the noise comes from the image itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .attention_cut import CutConfig, attention_cut
from .checkpoints import load_checkpoint, save_checkpoint
from .features import DiffusionFeatures
from .profiles import model_device
from .samplers import ddim_invert, ddim_timesteps, generate
from .seeding import per_sample_generators

__all__ = ["InversionFeatures", "synthesize", "Pairs", "save_pairs", "load_pairs"]


class InversionFeatures(DiffusionFeatures):
    """Map images (B, C, H, W) in [-1, 1] to decoder features (B, D, H, W) read along their DDIM
    inversion path.

    As :class:`~fdiff.features.DiffusionFeatures`, but the noisy image at each chosen step is the
    image's own DDIM inversion instead of the image plus a shared noise. ``timesteps`` must lie on
    the DDIM grid of ``num_steps`` steps (:func:`ddim_timesteps`); the inversion runs up to the
    largest of them, and the model is run once more at each chosen step's noisy image to record
    the chosen decoder ``blocks``.
    """

    def __init__(self, model: nn.Module, schedule, blocks: Sequence[int],
                 timesteps: Sequence[int], image_shape: Sequence[int], num_steps: int = 50):
        grid = ddim_timesteps(schedule.num_timesteps, num_steps)
        if not timesteps or any(t not in grid for t in timesteps):
            raise ValueError(f"timesteps must be on the {num_steps}-step DDIM grid "
                             f"({sorted(grid)[:4]}...), got {list(timesteps)}")
        super().__init__(model, schedule, blocks, sorted(timesteps), image_shape)
        self.num_steps = num_steps

    @torch.no_grad()
    def __call__(self, x0: Tensor) -> Tensor:
        self._check(x0)
        device, out_device = model_device(self.model), x0.device
        noisy = {0: x0.to(device)} if 0 in self.timesteps else {}
        for step in ddim_invert(self.model, self.schedule, x0, self.num_steps,
                                t_end=self.timesteps[-1]):
            if step.t in self.timesteps:
                noisy[step.t] = step.xt.to(device)
        out = []
        for t in self.timesteps:
            out += self._read(noisy[t], t)
        return torch.cat(out, dim=1).to(out_device)


@torch.no_grad()
def synthesize(model: nn.Module, schedule, n: int, image_shape: Sequence[int],
               cut: CutConfig | None = None, num_steps: int = 50, seed: int = 0,
               batch_size: int = 32, min_area: float = 0.02, max_area: float = 0.9,
               progress: bool = True) -> dict:
    """Generate ``n`` images (DDIM, ``num_steps`` steps, sample ``i`` from seed ``seed + i``),
    segment each with AttentionCut (``cut``, default :class:`CutConfig`'s) and keep the pairs
    whose mask covers between ``min_area`` and ``max_area`` of the image.

    Returns ``{"image": (M, C, H, W), "mask": (M, H, W) int64, "area": (n,), "kept": (n,)
    bool}``: the kept pairs, and the area and verdict of every generated image.
    """
    cut = CutConfig() if cut is None else cut
    if n < 1 or not 0 <= min_area < max_area <= 1:
        raise ValueError(f"need n >= 1 and 0 <= min_area < max_area <= 1, got {n}, "
                         f"{min_area}, {max_area}")
    images, masks = [], []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="synthesis"):
        b = min(batch_size, n - start)
        x = generate(model, schedule, (b, *image_shape), method="ddim", num_steps=num_steps,
                     generator=per_sample_generators(seed + start, b)).cpu()
        m, _ = attention_cut(model, schedule, x, cut)
        images.append(x)
        masks.append(m)
    images, masks = torch.cat(images), torch.cat(masks)
    area = masks.float().flatten(1).mean(1)
    kept = (area >= min_area) & (area <= max_area)
    return {"image": images[kept], "mask": masks[kept].long(), "area": area, "kept": kept}


class Pairs(torch.utils.data.Dataset):
    """(image, mask) pairs as a dataset of ``{"image", "mask"}`` items (mask: 1 object, 0 not)."""

    def __init__(self, images: Tensor, masks: Tensor):
        if len(images) != len(masks) or images.ndim != 4 or masks.shape != images.shape[:1] + \
                images.shape[2:]:
            raise ValueError(f"expected images (N, C, H, W) and masks (N, H, W), got "
                             f"{tuple(images.shape)} and {tuple(masks.shape)}")
        self.images, self.masks = images, masks.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": self.images[i], "mask": self.masks[i]}


def save_pairs(path: str | Path, synthetic: dict, **metadata) -> Path:
    """Write a :func:`synthesize` result (images as float16) with its settings, atomically."""
    tensors = {"image": synthetic["image"].half(), "mask": synthetic["mask"].to(torch.uint8),
               "area": synthetic["area"].float(), "kept": synthetic["kept"].to(torch.uint8)}
    return save_checkpoint(path, tensors, {"kind": "synthetic pairs", **metadata})


def load_pairs(path: str | Path) -> tuple[dict, dict]:
    """Read what :func:`save_pairs` wrote: (``{"image", "mask", "area", "kept"}``, metadata)."""
    tensors, metadata = load_checkpoint(path)
    if metadata.get("kind") != "synthetic pairs":
        raise ValueError(f"{path} does not hold synthetic pairs (kind {metadata.get('kind')!r})")
    return ({"image": tensors["image"].float(), "mask": tensors["mask"].long(),
             "area": tensors["area"], "kept": tensors["kept"].bool()}, metadata)
