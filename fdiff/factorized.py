"""The factorized denoiser of Yuan & Maire (NeurIPS 2024, arXiv 2309.15726).

A U-Net whose prediction is forced to be a sum over K regions:

    h_enc = encoder(x_t, t)                      the skips, finest first
    h_mid = middle(h_enc)
    m_1..m_K = softmax(mask_generator(h_mid, h_enc))          (B, K, H, W), sum to 1
    eps_k = decoder(h_mid, h_enc * m_k)          one decoder, its weights shared by the regions
    eps = sum_k m_k * eps_k

Trained only with the denoising loss, the masks are an unsupervised segmentation.
:class:`FactorizedDenoiser` is the paper's model; the decoding schemes of the paper's ablation
(its table 6) are subclasses beside it, each overriding :meth:`FactorizedDenoiser.decode_regions`:
:class:`ConcatDenoiser` (the mask as extra input channels instead of a product),
:class:`MaskMidDenoiser` (h_mid masked too) and :class:`UnsharedDenoiser` (one decoder per
region). :func:`factorized_denoiser` builds the class a :class:`FactorizedConfig` names.
``mask_noise > 0`` is not in the paper: in training it adds Gumbel noise of that scale to the
mask logits (Gumbel-softmax), drawn from the generator the training step passes.

The partitions a model makes as it trains are recorded here too (:func:`masks_over_t`,
:func:`partition_probe`, :func:`partition_snapshots`); segmenting images with a trained model is
in :mod:`fdiff.segmentation`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_t
from .profiles import model_device
from .seeding import make_generator, randn
from .unet import Decoder, Encoder, Middle, TimeEmbedding, UNetConfig, as_weight_dtype, check_input

__all__ = [
    "FactorizedConfig",
    "FactorizedDenoiser",
    "ConcatDenoiser",
    "MaskMidDenoiser",
    "UnsharedDenoiser",
    "factorized_denoiser",
    "masks_over_t",
    "snapshot_timesteps",
    "partition_probe",
    "partition_snapshots",
]

MODES = ("multiply", "concat", "mask_mid")


@dataclass(frozen=True)
class FactorizedConfig:
    """A factorized denoiser: the U-Net's widths, K, the mask generator's width, the variant."""

    KIND: ClassVar[str] = "factorized"

    unet: UNetConfig = field(default_factory=UNetConfig)
    num_regions: int = 2
    # The mask generator is a decoder half: at the U-Net's widths times mask_width (rounded up to
    # GroupNorm's groups), with self-attention where the U-Net has it if mask_attention. The
    # paper's is the full decoder half (1.0, True); by default it is half as wide and without
    # attention, which found the figure sooner and better in chapter 3's emergence study, on the
    # one world where a partition emerged (scripts/emergence.py).
    mask_width: float = 0.5
    mask_attention: bool = False
    mode: str = "multiply"  # how a region's decoder sees its mask (ablations: concat, mask_mid)
    shared_decoder: bool = True  # False: one decoder per region (an ablation)
    mask_noise: float = 0.0  # scale of Gumbel noise on the mask logits in training; 0: none

    def __post_init__(self):
        if not isinstance(self.unet, UNetConfig):
            raise TypeError(f"unet must be a UNetConfig, got {type(self.unet).__name__}")
        if (isinstance(self.num_regions, bool) or not isinstance(self.num_regions, int)
                or self.num_regions < 2):
            raise ValueError(f"num_regions (K) must be an int >= 2, got {self.num_regions!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if (self.mode, self.shared_decoder) not in _VARIANTS:
            raise ValueError(
                f"mode={self.mode!r} with shared_decoder={self.shared_decoder} is not a variant "
                f"of the paper's ablation: unshared decoders use mode='multiply'"
            )
        if not isinstance(self.mask_noise, (int, float)) or not self.mask_noise >= 0:
            raise ValueError(f"mask_noise must be a number >= 0, got {self.mask_noise!r}")
        if (isinstance(self.mask_width, bool) or not isinstance(self.mask_width, (int, float))
                or not 0 < self.mask_width <= 4):
            raise ValueError(f"mask_width must be a number in (0, 4], got {self.mask_width!r}")
        try:
            self.mask_config()
        except ValueError as err:
            raise ValueError(
                f"mask_width={self.mask_width} gives the mask generator the base width "
                f"{self.mask_base_channels()}, which its attention heads cannot split ({err})"
            ) from None

    def mask_base_channels(self) -> int:
        """The mask generator's base width: the U-Net's times ``mask_width``, rounded up to a
        multiple of GroupNorm's groups."""
        groups = self.unet.groups
        wanted = max(1, round(self.unet.base_channels * self.mask_width))
        return -(-wanted // groups) * groups

    def mask_config(self) -> UNetConfig:
        """Return the mask generator's config: the U-Net's depth and attention levels at the mask
        generator's width (no attention without ``mask_attention``), with K outputs."""
        attention = {} if self.mask_attention else {"attention_levels": (), "num_heads": 1}
        return dataclasses.replace(self.unet, base_channels=self.mask_base_channels(),
                                   out_channels=self.num_regions, **attention)


def _pool_mask(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool masks (N, 1, H, W) to ``size`` (the skips are 2^j times smaller)."""
    factor = masks.shape[-1] // size[-1]
    return masks if factor == 1 else F.avg_pool2d(masks, factor)


def per_region(x: Tensor, k: int) -> Tensor:
    """Repeat a batch (B, ...) once per region, region-major within each image: (B*K, ...)."""
    return x.unsqueeze(1).expand(x.shape[0], k, *x.shape[1:]).reshape(-1, *x.shape[1:])


def masked_per_region(x: Tensor, masks: Tensor) -> Tensor:
    """Return features x (B, C, h, w) times each region's mask (B, K, H, W) pooled to (h, w),
    as (B*K, C, h, w): one broadcast product writes the masked copies directly."""
    b, k = masks.shape[:2]
    pooled = _pool_mask(masks.reshape(b * k, 1, *masks.shape[-2:]), tuple(x.shape[-2:]))
    return (x.unsqueeze(1) * pooled.view(b, k, 1, *x.shape[-2:])).reshape(b * k, *x.shape[1:])


class FactorizedDenoiser(nn.Module):
    """eps_theta(x_t, t) = sum_k m_k(x_t, t) * eps_k(x_t, t), with shared-weight regions.

    Example::

        model = FactorizedDenoiser(FactorizedConfig(UNetConfig(base_channels=32), num_regions=2))
        eps = model(xt, t)                             # (B, C, H, W), trains like a U-Net
        eps, masks = model(xt, t, return_masks=True)   # masks (B, K, H, W), sum to 1 over K
    """

    num_timesteps: int | None = None  # the chain it was trained on, when known (checkpoints)

    def __init__(self, config: FactorizedConfig | None = None):
        super().__init__()
        cfg = config or FactorizedConfig()
        if _VARIANTS[cfg.mode, cfg.shared_decoder] is not type(self):
            raise TypeError(
                f"{type(self).__name__} cannot build mode={cfg.mode!r}, "
                f"shared_decoder={cfg.shared_decoder}: use factorized_denoiser(config)"
            )
        self.config = cfg
        ucfg = cfg.unet
        self.time_embed = TimeEmbedding(ucfg)
        self.encoder = Encoder(ucfg)
        self.middle = Middle(ucfg, self.encoder.out_channels)
        mid, skips = self.encoder.out_channels, self.encoder.skip_channels
        self.mask_generator = Decoder(cfg.mask_config(), skips, mid, cfg.num_regions, ucfg.emb_dim)
        self.build_decoders(ucfg, skips, mid, ucfg.out_channels or ucfg.image_channels)

    def build_decoders(self, ucfg: UNetConfig, skips: list[int], mid: int, out: int) -> None:
        """The paper's one denoising decoder, shared by every region."""
        self.decoder = Decoder(ucfg, skips, mid, out)

    def forward(self, xt: Tensor, t: Tensor, cond: Tensor | None = None, return_masks: bool = False,
                generator: torch.Generator | None = None,
                masks: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Predict eps (B, C, H, W); with ``return_masks`` also the masks (B, K, H, W).

        ``generator`` draws the Gumbel mask noise in training when ``mask_noise > 0``.
        ``masks`` (B, K, H, W), summing to 1 over K: use these instead of the mask generator's
        (uniform 1/K masks measure what the learned partition is worth, :func:`uniform_mask_gap`).
        """
        check_input(self.config.unet, xt, t, self.num_timesteps)
        xt = as_weight_dtype(self, xt)
        emb = self.time_embed(t, cond)
        skips = self.encoder(xt, emb)  # h_enc
        h = self.middle(skips[-1], emb)  # h_mid
        if masks is None:
            masks = self.masks(h, skips, emb, generator)  # m_1..m_K
        elif masks.shape != (xt.shape[0], self.config.num_regions, *xt.shape[-2:]):
            raise ValueError(f"masks must have shape {(xt.shape[0], self.config.num_regions)} "
                             f"+ the image's (H, W), got {tuple(masks.shape)}")
        masks = masks.float()
        eps_k = self.decode_regions(h, skips, emb, masks.to(h.dtype))  # (B, K, C, H, W)
        eps = (masks.unsqueeze(2) * eps_k.float()).sum(dim=1)  # sum_k m_k eps_k
        return (eps, masks) if return_masks else eps

    def masks(self, h: Tensor, skips: list[Tensor], emb: Tensor, generator=None) -> Tensor:
        """Return the soft masks (B, K, H, W): the mask generator's logits, softmaxed over K."""
        logits = self.mask_generator(h, skips, emb).float()
        if self.training and self.config.mask_noise > 0:
            if generator is None:
                raise ValueError(
                    "mask_noise draws Gumbel noise in training: pass generator= (train() does)"
                )
            u = torch.rand(logits.shape, generator=generator, device=generator.device)
            u = u.to(logits.device).clamp_(1e-6, 1 - 1e-6)
            logits = logits - self.config.mask_noise * torch.log(-torch.log(u))
        return logits.softmax(dim=1)

    def decode_regions(self, h: Tensor, skips: list[Tensor], emb: Tensor, masks: Tensor) -> Tensor:
        """Run the shared decoder once per region, all regions in one batch.

        Region k sees the unmasked h_mid (B, C_mid, h, w) and every encoder skip multiplied by
        m_k, average-pooled to the skip's resolution. masks: (B, K, H, W). Returns eps_k
        (B, K, C, H, W).
        """
        b, k = masks.shape[:2]
        skips_k = [masked_per_region(s, masks) for s in skips]
        out = self.decoder(per_region(h, k), skips_k, per_region(emb, k))
        return out.view(b, k, *out.shape[1:])


class ConcatDenoiser(FactorizedDenoiser):
    """Ablation: a region's decoder gets its mask as extra input channels beside every skip,
    instead of skips multiplied by it (``mode="concat"``)."""

    def build_decoders(self, ucfg: UNetConfig, skips: list[int], mid: int, out: int) -> None:
        # The mask goes in as `groups` identical channels, so GroupNorm still divides the widths.
        self.decoder = Decoder(ucfg, [c + ucfg.groups for c in skips], mid, out)

    def decode_regions(self, h, skips, emb, masks):
        b, k = masks.shape[:2]
        flat = masks.reshape(b * k, 1, *masks.shape[-2:])
        skips_k = [
            torch.cat([per_region(s, k), _pool_mask(flat, tuple(s.shape[-2:])).expand(
                -1, self.config.unet.groups, -1, -1)], dim=1)
            for s in skips
        ]
        out = self.decoder(per_region(h, k), skips_k, per_region(emb, k))
        return out.view(b, k, *out.shape[1:])


class MaskMidDenoiser(FactorizedDenoiser):
    """Ablation: h_mid is multiplied by each region's mask too (``mode="mask_mid"``)."""

    def decode_regions(self, h, skips, emb, masks):
        b, k = masks.shape[:2]
        skips_k = [masked_per_region(s, masks) for s in skips]
        out = self.decoder(masked_per_region(h, masks), skips_k, per_region(emb, k))
        return out.view(b, k, *out.shape[1:])


class UnsharedDenoiser(FactorizedDenoiser):
    """Ablation: one decoder per region instead of one shared by all (``shared_decoder=False``)."""

    def build_decoders(self, ucfg: UNetConfig, skips: list[int], mid: int, out: int) -> None:
        k = self.config.num_regions
        self.decoders = nn.ModuleList([Decoder(ucfg, skips, mid, out) for _ in range(k)])

    def decode_regions(self, h, skips, emb, masks):
        outs = [
            decoder(h, [s * _pool_mask(masks[:, j : j + 1], tuple(s.shape[-2:])) for s in skips],
                    emb)
            for j, decoder in enumerate(self.decoders)
        ]
        return torch.stack(outs, dim=1)


_VARIANTS = {
    ("multiply", True): FactorizedDenoiser,
    ("concat", True): ConcatDenoiser,
    ("mask_mid", True): MaskMidDenoiser,
    ("multiply", False): UnsharedDenoiser,
}


def factorized_denoiser(config: FactorizedConfig | None = None) -> FactorizedDenoiser:
    """Build the model a config names: the paper's, or one of its ablation variants."""
    cfg = config or FactorizedConfig()
    return _VARIANTS[cfg.mode, cfg.shared_decoder](cfg)


@torch.no_grad()
def masks_over_t(
    model: FactorizedDenoiser, schedule, x0: Tensor, timesteps, noise: Tensor
) -> Tensor:
    """Return the masks of ``x0`` noised with the same ``noise`` to each of ``timesteps``.

    x0, noise: (P, C, H, W). Returns (P, len(timesteps), K, H, W): one forward pass over all
    (image, t) pairs. This is what the partition views of chapter 2 scrub through.
    """
    ts = [check_t(t, schedule) for t in timesteps]
    p, n = x0.shape[0], len(ts)
    device = model_device(model)
    tt = torch.tensor(ts, dtype=torch.int64, device=device).repeat_interleave(p)
    xt = schedule.add_noise(
        x0.to(device).repeat(n, 1, 1, 1), noise.to(device).repeat(n, 1, 1, 1), tt
    )
    _, masks = model(xt, tt, return_masks=True)
    return masks.view(n, p, *masks.shape[1:]).transpose(0, 1).to(x0.device)


def snapshot_timesteps(num_timesteps: int) -> tuple[int, ...]:
    """Return the timesteps at which training snapshots record masks (1% to 50% of T)."""
    return tuple(max(1, round(f * num_timesteps)) for f in (0.01, 0.03, 0.06, 0.12, 0.25, 0.5))


def partition_probe(schedule, images: Tensor, seed: int = 0):
    """Return ``(snapshot, tensors)`` for recording a factorized model's partitions in training.

    ``images`` (P, C, H, W): the probe, held-out images noised with one fixed noise tensor
    (``make_generator(seed)``); ``snapshot(model)`` returns their masks at
    :func:`snapshot_timesteps` as uint8 (0..255) of all regions but the last, shape
    (P, n_t, K - 1, H, W): the masks sum to one, so the last is implied and storing it would only
    make checkpoints bigger (:func:`partition_snapshots` restores it). ``tensors`` holds the
    probe images and timesteps, to save beside the weights.
    """
    noise = randn(images.shape, make_generator(seed))
    ts = snapshot_timesteps(schedule.num_timesteps)

    def snapshot(model: nn.Module) -> Tensor:
        device = model_device(model)
        masks = masks_over_t(model, schedule, images.to(device), ts, noise.to(device))
        return (masks[:, :, :-1].float() * 255).round().to(torch.uint8).cpu()

    return snapshot, {"snapshot_images": images, "snapshot_timesteps": torch.tensor(ts)}


def partition_snapshots(tensors: dict[str, Tensor]) -> Tensor:
    """Return a factorized checkpoint's training snapshots with every region's mask.

    ``tensors``: the ``meta["tensors"]`` of the checkpoint. Returns uint8 (S, P, n_t, K, H, W)
    in 0..255 (S snapshots of P probe images at n_t timesteps): the stored K - 1 masks and the
    last one as 255 minus their sum, so the K masks sum to 255 (exactly for K = 2; for more
    regions the K - 1 stored roundings can push the sum a little past it).
    """
    if "snapshot_masks" not in tensors:
        raise KeyError("no partition snapshots here: only factorized training records them")
    head = tensors["snapshot_masks"]
    last = (255 - head.int().sum(dim=3, keepdim=True)).clamp(0, 255).to(torch.uint8)
    return torch.cat([head, last], dim=3)
