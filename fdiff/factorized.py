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

The module also reads what a trained model does: :func:`segment` (noise real images to t, one
forward pass, the masks), :func:`segment_dataset`, :func:`masks_over_t`,
:func:`generate_with_masks`, and the partition snapshots recorded during training
(:func:`partition_probe`, :func:`partition_snapshots`).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_int
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
    "segment",
    "segment_dataset",
    "masks_over_t",
    "snapshot_timesteps",
    "generate_with_masks",
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
    mask_channels: int | None = None  # base width of the mask generator; None: half the U-Net's
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
        try:
            self.mask_config()
        except ValueError as err:
            raise ValueError(
                f"mask_channels={self.mask_channels} gives the mask generator widths "
                f"{[m * self.mask_base_channels() for m in self.unet.channel_mults]}, which "
                f"GroupNorm cannot split into groups={self.unet.groups}: use a multiple of "
                f"{self.unet.groups} ({err})"
            ) from None

    def mask_base_channels(self) -> int:
        """The mask generator's base width: ``mask_channels``, or half the U-Net's rounded up to
        a multiple of its GroupNorm groups."""
        if self.mask_channels:
            return self.mask_channels
        groups = self.unet.groups
        return -(-max(1, self.unet.base_channels // 2) // groups) * groups

    def mask_config(self) -> UNetConfig:
        """Return the mask generator's config: the U-Net's depth at the mask generator's width,
        without self-attention (so its widths need not divide into attention heads)."""
        return dataclasses.replace(
            self.unet,
            base_channels=self.mask_base_channels(),
            attention_levels=(),
            num_heads=1,
            out_channels=self.num_regions,
        )


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
                generator: torch.Generator | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Predict eps (B, C, H, W); with ``return_masks`` also the masks (B, K, H, W).

        ``generator`` draws the Gumbel mask noise in training when ``mask_noise > 0``.
        """
        check_input(self.config.unet, xt, t, self.num_timesteps)
        xt = as_weight_dtype(self, xt)
        emb = self.time_embed(t, cond)
        skips = self.encoder(xt, emb)  # h_enc
        h = self.middle(skips[-1], emb)  # h_mid
        masks = self.masks(h, skips, emb, generator)  # m_1..m_K
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


def check_t(t, schedule) -> int:
    """Return ``t`` as an int in [0, T), or raise a ValueError that says what was expected."""
    try:
        value = None if isinstance(t, bool) else operator.index(t)
    except TypeError:
        value = None
    if value is None or not 0 <= value < schedule.num_timesteps:
        raise ValueError(f"t must be an int in [0, {schedule.num_timesteps}), got {t!r}")
    return value


@torch.no_grad()
def segment(
    model: FactorizedDenoiser,
    schedule,
    x0: Tensor,
    t: int,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Segment real images: noise them to step ``t``, run one forward pass, return the masks.

    x0: (B, C, H, W) in [-1, 1]; t: an int in [0, T). The noise is ``noise``, else drawn from
    ``generator`` (default: seed 0). Returns soft masks (B, K, H, W); their argmax over K is
    the segmentation. The paper uses t = 30 of a linear schedule of 1000 steps. The model runs
    on its own device; the masks come back on x0's.
    """
    t = check_t(t, schedule)
    if noise is None:  # drawn on the generator's device, then moved to x0's
        noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    device = model_device(model)
    tt = torch.full((x0.shape[0],), t, dtype=torch.int64, device=device)
    xt = schedule.add_noise(x0.to(device), noise.to(device), tt)
    _, masks = model(xt, tt, return_masks=True)
    return masks.to(x0.device)


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


@torch.no_grad()
def segment_dataset(
    model: FactorizedDenoiser,
    schedule,
    dataset,
    t: int,
    num_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Tensor:
    """Segment the first ``num_images`` images of ``dataset`` at step ``t``; return soft masks.

    The noise of image i comes from ``make_generator(seed, i)``, so a sweep over t or over
    models sees the same noise. Returns (N, K, H, W) float masks on the CPU.
    """
    from tqdm.auto import tqdm

    from .data import stack_images

    t = check_t(t, schedule)
    n = len(dataset) if num_images is None else min(check_int(num_images, "num_images", 1),
                                                    len(dataset))
    if n == 0:
        raise ValueError("segment_dataset got a dataset without images: nothing to segment")
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc=f"segment t={t}"):
        idx = list(range(start, min(n, start + batch_size)))
        x0 = stack_images(dataset, idx)
        noise = torch.cat([randn((1, *x0.shape[1:]), make_generator(seed, i)) for i in idx])
        out.append(segment(model, schedule, x0, t, noise=noise).cpu())
    return torch.cat(out)


@torch.no_grad()
def generate_with_masks(
    model: FactorizedDenoiser, schedule, shape, t_mask: int, **sample_kwargs
) -> tuple[Tensor, Tensor]:
    """Generate images and the masks the model itself used near the end of sampling.

    Runs :func:`fdiff.samplers.sample` (keyword arguments pass through) and, at the visited
    timestep closest to ``t_mask``, reads the masks of that step's x_t. Returns the samples
    (B, C, H, W) clamped to [-1, 1] and the masks (B, K, H, W), where :func:`sample` puts
    its images (the CPU unless ``xT`` is elsewhere).
    """
    from .samplers import sample

    check_t(t_mask, schedule)
    closest = None
    last = None
    for st in sample(model, schedule, shape, **sample_kwargs):
        if st.t >= 0 and (closest is None or abs(st.t - t_mask) < abs(closest.t - t_mask)):
            closest = st
        last = st
    if closest is None:
        raise ValueError("sampling visited no timestep to read masks at")
    device = model_device(model)
    tt = torch.full((shape[0],), closest.t, dtype=torch.int64, device=device)
    _, masks = model(closest.xt.to(device), tt, return_masks=True)
    return last.xt.clamp(-1, 1), masks.to(last.xt.device)


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
