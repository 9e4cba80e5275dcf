"""Classifier-free guidance (Ho & Salimans, 2021) and the conditioned U-Net it needs.

A :class:`GuidedUNet` is the book's U-Net with a condition:

- at image level, a class id in [0, C) (a true label, or a self-label from
  :mod:`fdiff.annotate`): its one-hot vector goes through a small MLP into the time embedding;
- at mask level, a layout of K soft masks (K, H, W) concatenated to x_t as extra input channels.

In training the condition of each image is dropped with probability ``cond_drop`` (the null
condition: class id -1, an all-zero layout), drawn from the generator of the training step, so a
resumed run stays bit-exact. One network thus learns eps(x_t, c) and eps(x_t, null), and
:class:`Guided` mixes them at sampling time::

    eps = eps_null + w * (eps_cond - eps_null)        w = 0: unguided, 1: conditional, > 1: guided

Guided sampling runs both inputs as one batch through the network, then hands the mixed eps to
any sampler of :mod:`fdiff.samplers`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_int
from .schedules import step_of
from .unet import UNet, UNetConfig

__all__ = ["CONDITIONS", "GuidedConfig", "GuidedUNet", "Guided", "drop_condition",
           "null_condition", "start_from"]

# What a guided model is conditioned on: a true class, a self-label (cluster id), a layout of
# masks, or nothing (the same network and training, unconditioned: the fair unguided reference).
# "split" is a diagnostic, not a label-free recipe: self-labels made pure with the true classes
# (each class's images clustered apart, :func:`fdiff.annotate.split_by_class`).
CONDITIONS = ("class", "self", "split", "layout", "none")


@dataclass(frozen=True)
class GuidedConfig:
    """A U-Net with a condition, and where its training conditions come from.

    ``condition``: one of :data:`CONDITIONS`. ``num_classes``: classes or clusters of an image-level
    condition; ``layout_channels``: masks of a layout. ``annotator`` names the run whose model
    annotates the training images: its features are clustered ("self", :mod:`fdiff.annotate`;
    "split": within each true class) or it segments them ("layout"). ``feature_t``: the step
    at which it reads them, out of a chain of 1000 (:meth:`annotation_t` scales it to a shorter
    chain). ``feature_blocks``: which of its decoder blocks a self-annotation pools (0 the
    deepest; empty: all of them).
    ``start_from``: a committed run whose weights the U-Net starts from ("" : fresh weights); the
    new input channels and the condition's MLP start at zero, so the model starts as that run.
    ``class_share``: for built-in worlds with shape classes, the share of each class (1..C) kept
    among the training images, for imbalanced (long-tail) data; empty keeps them all.
    """

    KIND: ClassVar[str] = "guided"

    unet: UNetConfig = field(default_factory=UNetConfig)
    condition: str = "class"
    num_classes: int = 5
    layout_channels: int = 2
    cond_drop: float = 0.1
    annotator: str = ""
    feature_t: int = 150
    feature_blocks: tuple[int, ...] = ()
    start_from: str = ""
    class_share: tuple[float, ...] = ()

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        check_int(self.num_classes, "num_classes", 1)
        check_int(self.layout_channels, "layout_channels", 1)
        check_int(self.feature_t, "feature_t", 0)
        if isinstance(self.cond_drop, bool) or not 0 <= self.cond_drop <= 1:
            raise ValueError(f"cond_drop must be a probability in [0, 1], got {self.cond_drop!r}")
        if self.unet.cond_dim:
            raise ValueError("give the U-Net with cond_dim=0: GuidedConfig sets it from the "
                             f"condition (got cond_dim={self.unet.cond_dim})")
        if self.condition in ("self", "split", "layout") and not self.annotator:
            raise ValueError(f"condition {self.condition!r} needs an annotator: the run whose "
                             "model clusters or segments the training images")
        object.__setattr__(self, "class_share", tuple(float(s) for s in self.class_share))
        object.__setattr__(self, "feature_blocks", tuple(self.feature_blocks))
        for i, b in enumerate(self.feature_blocks):
            check_int(b, f"feature_blocks[{i}]", 0)
        if len(set(self.feature_blocks)) != len(self.feature_blocks):
            raise ValueError(f"feature_blocks names a block twice: {self.feature_blocks}")
        if any(not 0 < s <= 1 for s in self.class_share):
            raise ValueError(f"class_share holds shares in (0, 1], got {self.class_share}")

    def annotation_t(self, num_timesteps: int) -> int:
        """``feature_t`` on a chain of ``num_timesteps`` steps (it is given out of 1000)."""
        return step_of(self.feature_t, num_timesteps)

    @property
    def labelled(self) -> bool:
        """True for an image-level condition (a class id)."""
        return self.condition in ("class", "self", "split")

    def unet_config(self) -> UNetConfig:
        """The inner U-Net: the condition's one-hot width, the layout's extra input channels."""
        u = self.unet
        return dataclasses.replace(
            u,
            cond_dim=self.num_classes if self.labelled else 0,
            image_channels=u.image_channels + (self.layout_channels
                                               if self.condition == "layout" else 0),
            out_channels=u.out_channels or u.image_channels,
        )


def null_condition(config: GuidedConfig, batch: int, like: Tensor) -> Tensor | None:
    """The null condition of ``batch`` images: ids -1, or an all-zero layout shaped as ``like``
    (x_t, B x C x H x W); None for an unconditioned model."""
    if config.labelled:
        return torch.full((batch,), -1, dtype=torch.int64, device=like.device)
    if config.condition == "layout":
        return like.new_zeros((batch, config.layout_channels, *like.shape[2:]))
    return None


def drop_condition(cond: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Replace each image's condition by the null one with probability ``p``.

    ``cond``: class ids (B,) int64 (null: -1) or layouts (B, K, H, W) float (null: zeros). The B
    uniform draws come from ``generator`` (on the CPU), so the same generator drops the same
    images.
    """
    if not p:
        return cond
    drop = (torch.rand(cond.shape[0], generator=generator) < p).to(cond.device)
    if cond.dtype == torch.int64:
        return torch.where(drop, torch.full_like(cond, -1), cond)
    return cond * (~drop).to(cond.dtype).view(-1, *([1] * (cond.ndim - 1)))


class GuidedUNet(nn.Module):
    """eps_theta(x_t, t, c): the U-Net of :mod:`fdiff.unet` with a class id or a layout.

    ``model(xt, t, cond)``: ``cond`` is (B,) int64 ids in [0, C) or -1 (null), or (B, K, H, W)
    layouts in [0, 1]; None is the null condition for every image. In training mode, with the
    ``generator`` of the training step, conditions are dropped with probability ``cond_drop``.
    """

    def __init__(self, config: GuidedConfig | None = None):
        super().__init__()
        self.config = config or GuidedConfig()
        self.unet = UNet(self.config.unet_config())

    @property
    def decoder(self) -> nn.Module:
        """The U-Net's decoder (what :mod:`fdiff.features` reads)."""
        return self.unet.decoder

    @property
    def num_timesteps(self) -> int | None:
        return self.unet.num_timesteps

    @num_timesteps.setter
    def num_timesteps(self, value: int | None) -> None:
        self.unet.num_timesteps = value

    def check_condition(self, cond: Tensor | None, xt: Tensor) -> Tensor | None:
        """Return ``cond`` (or the null condition for None) checked against x_t."""
        cfg, b = self.config, xt.shape[0]
        if cfg.condition == "none":
            if cond is not None:
                raise ValueError("this model is unconditioned (condition='none') but cond was "
                                 "given")
            return None
        if cond is None:
            return null_condition(cfg, b, xt)
        if not isinstance(cond, Tensor):
            raise TypeError(f"cond must be a tensor, got {type(cond).__name__}")
        if cfg.labelled:
            if cond.dtype != torch.int64 or cond.shape != (b,):
                raise ValueError(f"cond must be int64 class ids of shape ({b},), got "
                                 f"{cond.dtype} of shape {tuple(cond.shape)}")
            if cond.numel() and (cond.min() < -1 or cond.max() >= cfg.num_classes):
                raise ValueError(f"class ids must be in [0, {cfg.num_classes}) or -1 (null), got "
                                 f"{int(cond.min())}..{int(cond.max())}")
            return cond
        want = (b, cfg.layout_channels, *xt.shape[2:])
        if not cond.is_floating_point() or tuple(cond.shape) != want:
            raise ValueError(f"cond must be float layouts of shape {want}, got {cond.dtype} of "
                             f"shape {tuple(cond.shape)}")
        return cond

    def forward(self, xt: Tensor, t: Tensor, cond: Tensor | None = None,
                generator: torch.Generator | None = None, return_features: bool = False):
        cond = self.check_condition(cond, xt)
        cfg = self.config
        if self.training and generator is not None and cond is not None:
            cond = drop_condition(cond, cfg.cond_drop, generator)
        if cfg.labelled:
            onehot = F.one_hot(cond.clamp_min(0), cfg.num_classes).to(xt.dtype)
            onehot = onehot * (cond >= 0).to(xt.dtype)[:, None]  # the null condition: zeros
            return self.unet(xt, t, cond=onehot, return_features=return_features)
        if cfg.condition == "layout":
            xt = torch.cat([xt, cond.to(xt.dtype)], dim=1)
        return self.unet(xt, t, return_features=return_features)


def start_from(model: GuidedUNet, base: nn.Module) -> GuidedUNet:
    """Copy a trained unconditioned U-Net's weights into ``model`` so that it predicts what
    ``base`` predicts: the layout's extra input channels and the condition MLP's last layer are
    zero, so the condition starts without effect. Returns ``model``."""
    inner = model.unet
    base_state = base.state_dict()
    own = inner.state_dict()
    for name, value in base_state.items():
        if name not in own:
            raise ValueError(f"the base model has {name!r}, which the guided U-Net lacks: it is "
                             "not the same U-Net")
        if own[name].shape == value.shape:
            own[name] = value.clone()
        elif name == "encoder.conv_in.weight" and own[name].shape[1] > value.shape[1]:
            extra = own[name].shape[1] - value.shape[1]
            own[name] = torch.cat([value, value.new_zeros(value.shape[0], extra,
                                                          *value.shape[2:])], 1)
        else:
            raise ValueError(f"{name!r} has shape {tuple(value.shape)} in the base model and "
                             f"{tuple(own[name].shape)} in the guided one")
    if inner.time_embed.cond_mlp is not None:
        last = inner.time_embed.cond_mlp[-1]
        own["time_embed.cond_mlp.2.weight"] = torch.zeros_like(last.weight)
        own["time_embed.cond_mlp.2.bias"] = torch.zeros_like(last.bias)
    inner.load_state_dict(own)
    return model


class Guided(nn.Module):
    """The guided denoiser eps_null + w (eps_cond - eps_null), for any sampler.

    ``cond``: one condition per image to generate, as :class:`GuidedUNet` takes it; ``scale``:
    the guidance scale w >= 0. The conditional and null inputs run as one batch of 2B.
    """

    def __init__(self, model: GuidedUNet, cond: Tensor, scale: float):
        super().__init__()
        if not isinstance(model, GuidedUNet):
            raise TypeError(f"Guided needs a GuidedUNet, got {type(model).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"the guidance scale must be a number >= 0, got {scale!r}")
        if model.config.condition == "none":
            raise ValueError("an unconditioned model (condition='none') cannot be guided")
        self.model, self.cond, self.scale = model, cond, float(scale)

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        cond = self.model.check_condition(self.cond.to(xt.device), xt)
        null = null_condition(self.model.config, xt.shape[0], xt)
        eps = self.model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([cond, null]))
        eps_cond, eps_null = eps.float().chunk(2)
        return eps_null + self.scale * (eps_cond - eps_null)
