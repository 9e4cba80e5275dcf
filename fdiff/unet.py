"""A small DDPM U-Net (Ho et al., 2020) that reads on one screen.

The network is split into three parts so that later chapters can recombine them:
:class:`Encoder` (first half, produces the skip features), :class:`Middle` (the bottleneck) and
:class:`Decoder` (second half, consumes the skips). The factorized denoiser of chapter 2 reuses
all three; chapter 4 reads the decoder's block activations; classifier-free guidance (the
self-guidance method) passes a condition vector.

Shapes: ``xt`` (B, C, H, W) with H and W divisible by ``2 ** (len(channel_mults) - 1)``;
``t`` int64 (B,); ``cond`` (B, cond_dim) or None for the null condition; output (B, C_out, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .checks import check_finite, check_int

PADDING_MODES = ("zeros", "replicate", "reflect", "circular")

__all__ = ["UNetConfig", "UNet", "Encoder", "Middle", "Decoder", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    """Widths and depth of the U-Net. Vary it with ``dataclasses.replace``."""

    KIND: ClassVar[str] = "unet"  # names the model in checkpoints and runs (fdiff.configs)

    image_channels: int = 3
    out_channels: int | None = None  # None: same as image_channels (eps prediction)
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] | None = None  # None: the lowest resolution only
    num_heads: int = 4
    cond_dim: int = 0  # 0: unconditional
    groups: int = 8
    # How 3x3 convolutions see beyond the image's border: "zeros" (the usual) makes the outermost
    # pixels look different from the rest; "replicate" repeats the border pixels.
    padding_mode: str = "zeros"

    def __post_init__(self):
        for name, low in (("image_channels", 1), ("base_channels", 1), ("num_res_blocks", 1),
                          ("num_heads", 1), ("cond_dim", 0), ("groups", 1)):
            check_int(getattr(self, name), name, low)
        if self.out_channels is not None:
            check_int(self.out_channels, "out_channels", 1)
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}"
            )
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        if self.attention_levels is not None:
            object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be positive ints, got {self.channel_mults}")
        for mult in self.channel_mults:
            width = mult * self.base_channels
            if width % self.groups or width % self.num_heads:
                raise ValueError(
                    f"every width (base_channels * mult = {width}) must be divisible by "
                    f"groups={self.groups} and num_heads={self.num_heads}"
                )
        if any(not 0 <= lv < len(self.channel_mults) for lv in self.attn_levels):
            raise ValueError(
                f"attention_levels must index channel_mults (0..{len(self.channel_mults) - 1}), "
                f"got {self.attention_levels}"
            )

    @property
    def attn_levels(self) -> tuple[int, ...]:
        """Levels (0 = full resolution) that get self-attention."""
        if self.attention_levels is None:
            return (len(self.channel_mults) - 1,)
        return self.attention_levels

    @property
    def emb_dim(self) -> int:
        return 4 * self.base_channels

    @property
    def downsample_factor(self) -> int:
        """Image sides must be divisible by this number."""
        return 2 ** (len(self.channel_mults) - 1)

    def widths(self) -> list[int]:
        return [m * self.base_channels for m in self.channel_mults]

    @classmethod
    def from_profile(cls, profile, **overrides) -> UNetConfig:
        """Return the config of the profile's U-Net (widths and depth), with ``overrides``."""
        fields = {
            "base_channels": profile.base_channels,
            "channel_mults": profile.channel_mults,
            "num_res_blocks": profile.num_res_blocks,
        }
        return cls(**{**fields, **overrides})


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Embed integer timesteps t (B,) as sinusoids (B, dim), as in the Transformer and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time (and condition) embedding added in between."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        groups: int,
        padding_mode: str = "zeros",
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, padding_mode=padding_mode)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, padding_mode=padding_mode)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # The 1x1 convolutions are applied as matrix products on tokens (B, HW, C): the same
        # weights, but q, k, v come out with a contiguous last dimension, which lets
        # scaled_dot_product_attention pick a fused kernel.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.view(3 * c, c), self.qkv.bias)
        q, k, v = qkv.view(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:
            # On CPUs the fused bf16 kernel was measured 2-4x slower than the plain one.
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, head_dim)
        out = F.linear(
            out.transpose(1, 2).reshape(b, h * w, c), self.proj.weight.view(c, c), self.proj.bias
        )
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Block(nn.Module):
    """One U-Net stage: a residual block, optionally followed by self-attention."""

    def __init__(
        self, in_ch: int, out_ch: int, cfg: UNetConfig, attention: bool, emb_dim: int | None = None
    ):
        super().__init__()
        self.res = ResBlock(
            in_ch, out_ch, emb_dim or cfg.emb_dim, cfg.groups, cfg.padding_mode
        )
        self.attn = Attention(out_ch, cfg.num_heads, cfg.groups) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class Encoder(nn.Module):
    """First half of the U-Net: returns the features of every stage (the skips), finest first."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        pad = cfg.padding_mode
        self.conv_in = nn.Conv2d(
            cfg.image_channels, cfg.base_channels, 3, padding=1, padding_mode=pad
        )
        self.blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        ch = cfg.base_channels
        self.skip_channels = [ch]
        for level, width in enumerate(cfg.widths()):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(Block(ch, width, cfg, level in cfg.attn_levels))
                ch = width
                self.skip_channels.append(ch)
            if level < len(cfg.channel_mults) - 1:
                self.downsamplers.append(
                    nn.Conv2d(ch, ch, 3, stride=2, padding=1, padding_mode=pad)
                )
                self.skip_channels.append(ch)
        self.num_res_blocks = cfg.num_res_blocks
        self.out_channels = ch

    def forward(self, x: Tensor, emb: Tensor) -> list[Tensor]:
        h = self.conv_in(x)
        skips = [h]
        blocks = iter(self.blocks)
        for level in range(len(self.downsamplers) + 1):
            for _ in range(self.num_res_blocks):
                h = next(blocks)(h, emb)
                skips.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                skips.append(h)
        return skips


class Middle(nn.Module):
    """The bottleneck at the lowest resolution: residual block, attention, residual block."""

    def __init__(self, cfg: UNetConfig, ch: int):
        super().__init__()
        self.block1 = Block(ch, ch, cfg, attention=True)
        self.block2 = Block(ch, ch, cfg, attention=False)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return self.block2(self.block1(h, emb), emb)


class DecoderLevel(nn.Module):
    def __init__(self, blocks: list[Block], upsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.upsample = upsample


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, ch: int, padding_mode: str = "zeros"):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Second half of the U-Net: consumes the encoder's skips, coarsest first.

    Each level has ``num_res_blocks + 1`` blocks; block ``i`` of the flattened list
    (:attr:`block_names`) is what chapter 4 probes as "decoder block i".
    """

    def __init__(
        self,
        cfg: UNetConfig,
        skip_channels: list[int],
        in_ch: int,
        out_channels: int,
        emb_dim: int | None = None,
    ):
        """Build the blocks at ``cfg``'s widths; ``emb_dim`` is the width of the time embedding
        it receives (default ``cfg.emb_dim``; differs when it decodes another model's encoder)."""
        super().__init__()
        skip_channels = list(skip_channels)
        ch = in_ch
        levels = []
        widths = cfg.widths()
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                attention = level in cfg.attn_levels
                blocks.append(
                    Block(ch + skip_channels.pop(), widths[level], cfg, attention, emb_dim)
                )
                ch = widths[level]
            upsample = Upsample(ch, cfg.padding_mode) if level > 0 else None
            levels.append(DecoderLevel(blocks, upsample))
        self.levels = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(
            ch, out_channels, 3, padding=1, padding_mode=cfg.padding_mode
        )
        self.block_channels = [b.res.conv2.out_channels for lv in self.levels for b in lv.blocks]

    @property
    def block_names(self) -> list[str]:
        """Module names (relative to the decoder) of the blocks, in execution order."""
        return [
            f"levels.{i}.blocks.{j}"
            for i, lv in enumerate(self.levels)
            for j in range(len(lv.blocks))
        ]

    def forward(
        self, h: Tensor, skips: list[Tensor], emb: Tensor, features: list[Tensor] | None = None
    ) -> Tensor:
        """Decode ``h`` using ``skips`` (finest first); append block outputs to ``features``."""
        skips = list(skips)
        for lv in self.levels:
            for block in lv.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
                if features is not None:
                    features.append(h)
            if lv.upsample is not None:
                h = lv.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t followed by an MLP; adds the embedded condition if any."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.base = cfg.base_channels
        self.cond_dim = cfg.cond_dim
        self.mlp = nn.Sequential(
            nn.Linear(cfg.base_channels, cfg.emb_dim),
            nn.SiLU(),
            nn.Linear(cfg.emb_dim, cfg.emb_dim),
        )
        self.cond_mlp = None
        if cfg.cond_dim:
            self.cond_mlp = nn.Sequential(
                nn.Linear(cfg.cond_dim, cfg.emb_dim), nn.SiLU(), nn.Linear(cfg.emb_dim, cfg.emb_dim)
            )

    def forward(self, t: Tensor, cond: Tensor | None = None) -> Tensor:
        emb = self.mlp(timestep_embedding(t, self.base))
        if self.cond_mlp is None:
            if cond is not None:
                raise ValueError("this model is unconditional (cond_dim=0) but cond was given")
            return emb
        if cond is None:  # the null condition of classifier-free guidance
            cond = emb.new_zeros(emb.shape[0], self.cond_dim)
        if cond.shape != (emb.shape[0], self.cond_dim):
            raise ValueError(
                f"cond must have shape ({emb.shape[0]}, {self.cond_dim}), got {tuple(cond.shape)}"
            )
        return emb + self.cond_mlp(cond.to(emb.dtype))


def check_input(cfg: UNetConfig, xt: Tensor, t: Tensor, num_timesteps: int | None = None) -> None:
    """Raise a clear error unless xt is finite (B, C, H, W) float with sides divisible as needed
    and t holds one timestep per image in [0, num_timesteps) (the bound when it is known)."""
    if not isinstance(xt, Tensor) or not xt.is_floating_point():
        raise TypeError(f"xt must be a floating-point tensor, got {getattr(xt, 'dtype', type(xt))}")
    check_finite(xt, "xt")
    if xt.ndim != 4 or xt.shape[1] != cfg.image_channels:
        raise ValueError(
            f"xt must have shape (B, {cfg.image_channels}, H, W), got {tuple(xt.shape)}"
        )
    f = cfg.downsample_factor
    if xt.shape[2] % f or xt.shape[3] % f:
        raise ValueError(
            f"image size {tuple(xt.shape[2:])} is not divisible by {f}, the U-Net's downsampling "
            f"factor (2 ** (len(channel_mults) - 1)); resize or pad the images"
        )
    if not isinstance(t, Tensor) or t.dtype != torch.int64:
        raise TypeError(
            f"t must be an int64 tensor of shape ({xt.shape[0]},), got "
            f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))}"
        )
    if t.shape != (xt.shape[0],):
        raise ValueError(
            f"t must have shape ({xt.shape[0]},), one timestep per image, got {tuple(t.shape)}"
        )
    if t.numel():
        low, high = int(t.min()), int(t.max())
        if low < 0 or (num_timesteps is not None and high >= num_timesteps):
            bound = "" if num_timesteps is None else f" and < T = {num_timesteps}"
            raise ValueError(f"t must be >= 0{bound}; got values from {low} to {high}")


def as_weight_dtype(module: nn.Module, xt: Tensor) -> Tensor:
    """Return ``xt`` in the dtype of ``module``'s weights (float64 images meet float32 weights
    in the samplers; under autocast the convolutions then cast as usual)."""
    dtype = next(module.parameters()).dtype
    return xt if xt.dtype == dtype else xt.to(dtype)


class UNet(nn.Module):
    """The denoiser eps_theta(x_t, t[, cond]) of DDPM: encoder, middle, decoder.

    Example::

        model = UNet(UNetConfig(base_channels=32, channel_mults=(1, 2, 2)))
        eps_hat = model(xt, t)                                  # (B, 3, 32, 32)
        eps_hat, feats = model(xt, t, return_features=True)     # feats: decoder block outputs
    """

    num_timesteps: int | None = None  # the chain it was trained on, when known (checkpoints)

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = config or UNetConfig()
        self.config = cfg
        self.time_embed = TimeEmbedding(cfg)
        self.encoder = Encoder(cfg)
        self.middle = Middle(cfg, self.encoder.out_channels)
        out = cfg.out_channels or cfg.image_channels
        self.decoder = Decoder(cfg, self.encoder.skip_channels, self.encoder.out_channels, out)

    def forward(self, xt: Tensor, t: Tensor, cond: Tensor | None = None,
                return_features: bool = False, generator: torch.Generator | None = None
                ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Predict eps from x_t. With ``return_features``, also return the decoder block outputs.

        ``generator`` supplies a denoiser's random draws in training; the U-Net makes none and
        ignores it, which lets the training loss call every denoiser alike.
        """
        check_input(self.config, xt, t, self.num_timesteps)
        xt = as_weight_dtype(self, xt)
        emb = self.time_embed(t, cond)
        skips = self.encoder(xt, emb)
        h = self.middle(skips[-1], emb)
        features: list[Tensor] | None = [] if return_features else None
        out = self.decoder(h, skips, emb, features)
        return (out, features) if return_features else out


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
