"""The factorized denoiser of Yuan & Maire (NeurIPS 2024, arXiv 2309.15726).

A U-Net whose output is forced to be a sum over K regions. The encoder and middle block are
shared; a *mask generator* (a second decoder half fed by the middle features and every encoder
skip) predicts K per-pixel logits, softmaxed into masks ``m_1..m_K`` that sum to 1; one
*denoising decoder*, with weights shared by all regions, runs for every region at once (the
regions are folded into the batch), each run seeing the encoder skips multiplied by its mask
(average-pooled to each skip's resolution) and the unmasked middle features. The prediction is

    eps = sum_k m_k * eps_k.

Trained only with the denoising loss; the masks are an unsupervised segmentation.

Variants exist only for the paper's ablations (chapter 3): ``mode="concat"`` gives the decoder
the mask as extra input channels instead of multiplying, ``mode="mask_mid"`` also masks the middle
features, ``shared_decoder=False`` uses one decoder per region. ``mask_noise > 0`` is not in the
paper: in training it adds Gumbel noise of that scale to the mask logits, which makes each
pixel's masks close to one-hot (Gumbel-softmax), so the model cannot keep them undecided.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .profiles import model_device
from .samplers import randn
from .unet import Decoder, Encoder, Middle, TimeEmbedding, UNetConfig, as_weight_dtype, check_input

__all__ = [
    "FactorizedConfig",
    "FactorizedDenoiser",
    "segment",
    "segment_dataset",
    "masks_over_t",
    "snapshot_timesteps",
    "generate_with_masks",
]

MODES = ("multiply", "concat", "mask_mid")


@dataclass(frozen=True)
class FactorizedConfig:
    """A factorized denoiser: the U-Net's widths, K, and the mask generator's width."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    num_regions: int = 2
    mask_channels: int | None = None  # base width of the mask generator; None: half the U-Net's
    mode: str = "multiply"
    shared_decoder: bool = True
    mask_noise: float = 0.0  # scale of Gumbel noise on the mask logits in training; 0: none

    def __post_init__(self):
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig.from_dict(self.unet))
        if not isinstance(self.num_regions, int) or self.num_regions < 2:
            raise ValueError(f"num_regions (K) must be an int >= 2, got {self.num_regions!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.mask_noise, (int, float)) or not self.mask_noise >= 0:
            raise ValueError(f"mask_noise must be a number >= 0, got {self.mask_noise!r}")
        try:
            self.mask_config()
        except ValueError as err:
            raise ValueError(
                f"mask_channels={self.mask_channels} gives the mask generator widths "
                f"{[m * self.mask_config_base() for m in self.unet.channel_mults]}, which "
                f"GroupNorm cannot split into groups={self.unet.groups}: use a multiple of "
                f"{self.unet.groups} ({err})"
            ) from None

    def mask_config_base(self) -> int:
        """The mask generator's base width: ``mask_channels``, or half the U-Net's rounded up to
        a multiple of its GroupNorm groups."""
        if self.mask_channels:
            return self.mask_channels
        groups = self.unet.groups
        return -(-max(1, self.unet.base_channels // 2) // groups) * groups

    def mask_config(self) -> UNetConfig:
        """Return the mask generator's config: the U-Net's depth at ``mask_channels`` width.

        It has no self-attention, so its widths need not divide into attention heads."""
        return dataclasses.replace(
            self.unet,
            base_channels=self.mask_config_base(),
            attention_levels=(),
            num_heads=1,
            out_channels=self.num_regions,
        )

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "unet": self.unet.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> FactorizedConfig:
        return cls(**{**d, "unet": UNetConfig.from_dict(d["unet"])})


def _pool_mask(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool masks (N, 1, H, W) to ``size`` (the skips are 2^j times smaller)."""
    factor = masks.shape[-1] // size[-1]
    return masks if factor == 1 else F.avg_pool2d(masks, factor)


class FactorizedDenoiser(nn.Module):
    """eps_theta(x_t, t) = sum_k m_k(x_t, t) * eps_k(x_t, t), with shared-weight regions.

    Example::

        model = FactorizedDenoiser(FactorizedConfig(UNetConfig(base_channels=32), num_regions=2))
        eps = model(xt, t)                             # (B, C, H, W), trains like a U-Net
        eps, masks = model(xt, t, return_masks=True)   # masks (B, K, H, W), sum to 1 over K
    """

    def __init__(self, config: FactorizedConfig | None = None):
        super().__init__()
        cfg = config or FactorizedConfig()
        self.config = cfg
        ucfg = cfg.unet
        self.time_embed = TimeEmbedding(ucfg)
        self.encoder = Encoder(ucfg)
        self.middle = Middle(ucfg, self.encoder.out_channels)
        mid = self.encoder.out_channels
        skips = self.encoder.skip_channels
        self.mask_decoder = Decoder(cfg.mask_config(), skips, mid, cfg.num_regions, ucfg.emb_dim)
        # "concat" appends the mask as `groups` identical channels: GroupNorm still divides.
        self.extra = ucfg.groups if cfg.mode == "concat" else 0
        dec_skips = [c + self.extra for c in skips]
        out = ucfg.out_channels or ucfg.image_channels
        n_decoders = 1 if cfg.shared_decoder else cfg.num_regions
        self.decoders = nn.ModuleList(
            [Decoder(ucfg, dec_skips, mid, out) for _ in range(n_decoders)]
        )

    def forward(
        self, xt: Tensor, t: Tensor, cond: Tensor | None = None, return_masks: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Predict eps (B, C, H, W); with ``return_masks`` also the masks (B, K, H, W)."""
        check_input(self.config.unet, xt, t)
        xt = as_weight_dtype(self, xt)
        emb = self.time_embed(t, cond)
        skips = self.encoder(xt, emb)
        h = self.middle(skips[-1], emb)
        logits = self.mask_decoder(h, skips, emb).float()
        if self.training and self.config.mask_noise > 0:
            # Gumbel-softmax: noise drawn from the global generator, which train() seeds per step.
            u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
            logits = logits - self.config.mask_noise * torch.log(-torch.log(u))
        masks = logits.softmax(dim=1)
        eps_k = self.decode_regions(h, skips, emb, masks.to(h.dtype))  # (B, K, C, H, W)
        eps = (masks.unsqueeze(2) * eps_k.float()).sum(dim=1)
        return (eps, masks) if return_masks else eps

    def decode_regions(self, h: Tensor, skips: list[Tensor], emb: Tensor, masks: Tensor) -> Tensor:
        """Run the denoising decoder once per region, all regions in one batch.

        h: middle features (B, C_mid, h, w); skips: encoder features, finest first; emb (B, E);
        masks (B, K, H, W). Returns eps_k (B, K, C, H, W).
        """
        b, k = masks.shape[:2]
        flat = masks.reshape(b * k, 1, *masks.shape[-2:])
        pooled = {}

        def region_view(x: Tensor, mask: bool) -> Tensor:
            # (B, C, ...) -> (B*K, C, ...): each image repeated once per region, masked if asked.
            size = tuple(x.shape[-2:])
            if mask and size not in pooled:
                pooled[size] = _pool_mask(flat, size)
            if mask and not self.extra:
                # One broadcast product writes the B*K masked copies directly (no repeat first).
                m = pooled[size].view(b, k, 1, *size)
                return (x.unsqueeze(1) * m).reshape(b * k, *x.shape[1:])
            rep = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
            if not mask:
                return rep
            return torch.cat([rep, pooled[size].expand(-1, self.extra, -1, -1)], dim=1)

        h_k = region_view(h, mask=self.config.mode == "mask_mid")
        skips_k = [region_view(s, mask=True) for s in skips]
        emb_k = region_view(emb, mask=False)
        if len(self.decoders) == 1:
            out = self.decoders[0](h_k, skips_k, emb_k)
            return out.view(b, k, *out.shape[1:])
        # Unshared decoders (an ablation): decoder j sees only region j's rows.
        rows = [torch.arange(b, device=h.device) * k + j for j in range(k)]
        outs = [
            dec(h_k[r], [s[r] for s in skips_k], emb_k[r]) for dec, r in zip(self.decoders, rows)
        ]
        return torch.stack(outs, dim=1)

    @classmethod
    def from_config(cls, config: dict) -> FactorizedDenoiser:
        return cls(FactorizedConfig.from_dict(config))


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

    x0: (B, C, H, W) in [-1, 1]; t: an int in [0, T). Returns soft masks (B, K, H, W); their
    argmax over K is the segmentation. The paper uses a small t (about 30 of 1000). The model
    runs on its own device; the masks come back on x0's.
    """
    if noise is None:  # drawn on the generator's device, then moved to x0's
        noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    device = model_device(model)
    tt = torch.full((x0.shape[0],), int(t), dtype=torch.int64, device=device)
    xt = schedule.add_noise(x0.to(device), noise.to(device), tt)
    _, masks = model(xt, tt, return_masks=True)
    return masks.to(x0.device)


def _check_t(t: int, schedule) -> int:
    if not 0 <= int(t) < schedule.num_timesteps:
        raise ValueError(f"t must be in [0, {schedule.num_timesteps}), got {t}")
    return int(t)


@torch.no_grad()
def masks_over_t(
    model: FactorizedDenoiser, schedule, x0: Tensor, timesteps, noise: Tensor
) -> Tensor:
    """Return the masks of ``x0`` noised with the same ``noise`` to each of ``timesteps``.

    x0, noise: (P, C, H, W). Returns (P, len(timesteps), K, H, W): one forward pass over all
    (image, t) pairs. This is what the partition views of chapter 2 scrub through.
    """
    ts = [_check_t(t, schedule) for t in timesteps]
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

    The noise of image i depends only on (seed, i), so a sweep over t or over models sees the
    same noise. Returns (N, K, H, W) float masks on the CPU.
    """
    from tqdm.auto import tqdm

    from .data import stack_images

    _check_t(t, schedule)
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    device = model_device(model)
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc=f"segment t={t}"):
        idx = list(range(start, min(n, start + batch_size)))
        x0 = stack_images(dataset, idx).to(device)
        noise = torch.stack(
            [
                torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed * 7919 + i))
                for i in idx
            ]
        ).to(device)
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

    _check_t(t_mask, schedule)
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
