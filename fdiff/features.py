"""Diffusion features: decoder activations of a trained denoiser as per-pixel features.

Following Baranchuk et al. (ICLR 2022): noise an image to a few timesteps with *one fixed noise
tensor shared by every image*, run the denoiser once per timestep, record chosen decoder blocks
with forward hooks, upsample each activation bilinearly to the image size and concatenate. With
shared noise the features are a pure function of the image.

Memory: nothing here holds a dataset's pixel features. :class:`DiffusionFeatures` maps a batch
of images to their feature maps; :func:`sample_pixels` streams a dataset image by image and
keeps only a random subset of each image's pixels, which is all a pixel classifier needs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import check_int
from .profiles import model_device
from .seeding import make_generator, randn

__all__ = ["capture", "decoder_blocks", "DiffusionFeatures", "sample_pixels"]


@contextmanager
def capture(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Record the output of each module while the context is open.

    Yields a dict that fills with ``{name: output}`` as the modules run. The hooks are removed
    when the context exits, also when the body raises.
    """
    store: dict[str, Tensor] = {}
    handles = []
    try:
        for name, module in modules.items():

            def hook(mod, args, output, name=name):
                store[name] = output

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """Return the decoder blocks to probe, in execution order (coarse to fine).

    A :class:`~fdiff.unet.UNet`: its decoder's blocks. A factorized denoiser: its mask
    generator's blocks (the denoising decoder runs once per region, on K times the batch).
    """
    decoder = _decoder(model)
    return [decoder.get_submodule(name) for name in decoder.block_names]


def _decoder(model: nn.Module) -> nn.Module:
    # The factorized model's denoising decoder runs once per region: its mask generator is the
    # decoder whose activations describe each pixel once.
    decoder = getattr(model, "mask_generator", None) or getattr(model, "decoder", None)
    if decoder is None:
        raise TypeError(
            f"expected a UNet or a FactorizedDenoiser, got {type(model).__name__}, which has no "
            "decoder to probe"
        )
    return decoder


class DiffusionFeatures:
    """Map images (B, C, H, W) in [-1, 1] to features (B, D, H, W) of a trained denoiser.

    blocks: indices into :func:`decoder_blocks`; timesteps: ints in [0, T). The feature
    dimension ``dim`` is the sum of the chosen blocks' widths times the number of timesteps,
    computed from the model. ``noise_seed`` fixes the one noise tensor shared by all images.
    ``in_channels`` lists the (timestep, block, channels) of every slice of the features.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule,
        blocks: Sequence[int],
        timesteps: Sequence[int],
        image_shape: Sequence[int],
        noise_seed: int = 0,
    ):
        self.model = model.eval()
        self.schedule = schedule
        all_blocks = decoder_blocks(model)
        if not blocks or any(not 0 <= b < len(all_blocks) for b in blocks):
            raise ValueError(
                f"blocks must index the {len(all_blocks)} decoder blocks, got {blocks}"
            )
        if not timesteps or any(not 0 <= t < schedule.num_timesteps for t in timesteps):
            raise ValueError(f"timesteps must be in [0, {schedule.num_timesteps}), got {timesteps}")
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        self.blocks = tuple(int(b) for b in blocks)
        self.timesteps = tuple(int(t) for t in timesteps)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.modules = {f"block{b}": all_blocks[b] for b in self.blocks}
        self.noise = randn((1, *self.image_shape), make_generator(noise_seed))[0]
        widths = [_decoder(model).block_channels[b] for b in self.blocks]
        self.in_channels = [(t, b, w) for t in self.timesteps for b, w in zip(self.blocks, widths)]

    @property
    def dim(self) -> int:
        """The number of feature channels per pixel."""
        return sum(w for _, _, w in self.in_channels)

    def _check(self, x0: Tensor) -> None:
        if x0.ndim != 4 or tuple(x0.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images must be (B, {', '.join(map(str, self.image_shape))}), "
                f"got {tuple(x0.shape)}"
            )

    def _read(self, xt: Tensor, t: int) -> list[Tensor]:
        """The chosen blocks' activations on the noisy images ``xt`` at step ``t``, upsampled
        to the image size."""
        tt = torch.full((len(xt),), t, dtype=torch.int64, device=xt.device)
        with capture(self.modules) as store:
            self.model(xt, tt)
        return [F.interpolate(store[f"block{b}"].float(), size=self.image_shape[1:],
                              mode="bilinear", align_corners=False) for b in self.blocks]

    @torch.no_grad()
    def __call__(self, x0: Tensor) -> Tensor:
        self._check(x0)
        device, out_device = model_device(self.model), x0.device
        x0 = x0.to(device)
        noise = self.noise.to(device).expand_as(x0)
        out = []
        for t in self.timesteps:
            tt = torch.full((len(x0),), t, dtype=torch.int64, device=device)
            out += self._read(self.schedule.add_noise(x0, noise, tt), t)
        return torch.cat(out, dim=1).to(out_device)


def sample_pixels(
    features,
    dataset,
    indices: Sequence[int],
    label_key: str = "semantic",
    pixels_per_image: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Stream images through ``features`` and keep a random subset of each one's pixels.

    features: a callable (B, C, H, W) -> (B, D, H, W); dataset items are dicts with ``image``
    and ``label_key``. Returns X (N, D) float32 and y (N,) int64, N = len(indices) *
    pixels_per_image (all pixels when None). Pixels labelled -1 are dropped. Only one batch of
    feature maps exists at a time.
    """
    if pixels_per_image is not None:
        check_int(pixels_per_image, "pixels_per_image", 1)
    if len(indices) == 0:
        raise ValueError("sample_pixels needs at least one image index, got none")
    gen = make_generator(seed)
    xs, ys = [], []
    for start in tqdm(range(0, len(indices), batch_size), disable=not progress, desc="features"):
        idx = list(indices[start : start + batch_size])
        items = [dataset[i] for i in idx]
        images = torch.stack([it["image"] for it in items])
        labels = torch.stack([it[label_key] for it in items])
        feats = features(images).cpu()  # (B, D, H, W)
        for f, lab in zip(feats, labels):
            flat_f, flat_y = f.flatten(1).T, lab.flatten()
            keep = (flat_y >= 0).nonzero().flatten()
            if pixels_per_image is not None and pixels_per_image < len(keep):
                keep = keep[torch.randperm(len(keep), generator=gen)[:pixels_per_image]]
            xs.append(flat_f[keep].clone())
            ys.append(flat_y[keep])
    return torch.cat(xs), torch.cat(ys)
