"""fdiff: diffusion models for image segmentation, the companion package of the book.

The public API, by concept (one module each):

- :mod:`fdiff.profiles`: ``get_profile``, ``describe_profile`` (``FDIFF_PROFILE=ci|cpu|gpu``)
- :mod:`fdiff.seeding`: ``make_generator``, ``per_sample_generators`` (one seeding convention)
- :mod:`fdiff.schedules`: ``NoiseSchedule`` (forward process, eps/x0/v conversions)
- :mod:`fdiff.unet`: ``UNet``, ``UNetConfig``
- :mod:`fdiff.samplers`: ``sample``, ``generate``, ``ddpm_step``, ``ddim_step``, ``ddim_invert``
- :mod:`fdiff.train`: ``train``, ``TrainConfig``, ``denoising_loss``
- :mod:`fdiff.runs`: ``load_run``, ``Run``, ``RUNS`` (named runs; ``python -m fdiff.train NAME``)
- :mod:`fdiff.checkpoints`: ``save_model``, ``load_model``, ``load_pretrained``
- :mod:`fdiff.worlds`: the built-in worlds (``world``, ``ShapesDataset``); :mod:`fdiff.shapes`
  their geometry
- :mod:`fdiff.datasets`: real datasets (``load_dataset``, ``OxfordPets``, ``Flowers102``)
- :mod:`fdiff.data`: data by name (``labelled_data``, ``training_data``, ``stack_images``)
- :mod:`fdiff.factorized`: ``FactorizedDenoiser`` and its ablation variants, ``masks_over_t``,
  ``partition_snapshots``; :mod:`fdiff.segmentation`: ``segment``, ``segment_dataset``,
  ``generate_with_masks``, ``uniform_mask_gap``
- :mod:`fdiff.metrics`: ``foreground_scores``, ``miou``, ``hungarian_miou``, ``fg_ari``,
  ``mask_stats``, ``decidedness``, ``near_edges``, ``frechet_distance``
- :mod:`fdiff.recognise`: ``recognise_shapes``, ``fit_shapes``, ``two_colour_split``
- :mod:`fdiff.baselines`: ``colour_kmeans``, ``grabcut``, ``feature_kmeans``, ``kmeans``
- :mod:`fdiff.imagenet`: ``load_mobilenet_v2``, ``MobileNetPixelFeatures``, ``pooled_features``
- :mod:`fdiff.features`: ``capture``, ``decoder_blocks``, ``DiffusionFeatures``, ``sample_pixels``
- :mod:`fdiff.probing`: ``ProbeEnsemble``, ``ProbeConfig``, ``PixelMLP``, ``predict_images``
- :mod:`fdiff.viz`: figures, scrubbable animations, partition views, ``pca_rgb``
"""

from .profiles import default_device, describe_profile, get_profile
from .samplers import ddim_invert, ddim_step, ddpm_step, generate, sample
from .schedules import NoiseSchedule
from .seeding import make_generator, per_sample_generators
from .unet import UNet, UNetConfig

# fdiff.runs (and with it fdiff.train) is imported on first use, so that
# ``python -m fdiff.train`` runs that module once: importing it here would load it before runpy
# executes it as __main__, with a warning.
_LAZY = {"load_run": "runs", "TrainConfig": "train"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "TrainConfig",
    "UNet",
    "UNetConfig",
    "ddim_invert",
    "ddim_step",
    "ddpm_step",
    "default_device",
    "describe_profile",
    "generate",
    "get_profile",
    "load_run",
    "make_generator",
    "per_sample_generators",
    "sample",
]
