"""fdiff: diffusion models for image segmentation, the companion package of the book.

The public API, by concept (one module each):

- :mod:`fdiff.profiles`: ``get_profile``, ``describe_profile`` (``FDIFF_PROFILE=ci|cpu|gpu``)
- :mod:`fdiff.schedules`: ``NoiseSchedule`` (forward process, eps/x0/v conversions)
- :mod:`fdiff.unet`: ``UNet``, ``UNetConfig``
- :mod:`fdiff.samplers`: ``sample``, ``generate``, ``ddpm_step``, ``ddim_step``, ``ddim_invert``
- :mod:`fdiff.train`: ``train``, ``TrainConfig``, ``load_or_train``
- :mod:`fdiff.checkpoints`: ``save_model``, ``load_model``, ``load_pretrained``
- :mod:`fdiff.data`: ``ShapesDataset`` (built-in), ``load_dataset`` (real datasets)
- :mod:`fdiff.factorized`: ``FactorizedDenoiser``, ``FactorizedConfig``, ``segment``
- :mod:`fdiff.metrics`: ``foreground_scores``, ``hungarian_miou``, ``fg_ari``, ``mask_stats``
- :mod:`fdiff.viz`: figures and scrubbable animations
"""

from .profiles import describe_profile, get_profile
from .samplers import ddim_invert, ddim_step, ddpm_step, generate, sample
from .schedules import NoiseSchedule
from .train import TrainConfig, load_or_train
from .unet import UNet, UNetConfig

__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "TrainConfig",
    "UNet",
    "UNetConfig",
    "ddim_invert",
    "ddim_step",
    "ddpm_step",
    "describe_profile",
    "generate",
    "get_profile",
    "load_or_train",
    "sample",
]
