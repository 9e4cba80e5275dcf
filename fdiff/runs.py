"""Training runs: one frozen dataclass per run, a registry of named runs, and ``load_run``.

A :class:`Run` is everything that decides a trained model: the model's config, the training
config, the data and the noise schedule. Its canonical JSON names it: :meth:`Run.digest` hashes
that JSON, a committed checkpoint records it in the manifest and is used for a request exactly
when the JSON matches, and a self-trained one is cached under ``<name>-<digest>``.

Named runs live in :data:`RUNS`; a profile (:mod:`fdiff.profiles`) fills in what a name leaves
open (widths, budget, data size). Chapters ask for a model by name::

    model, info = load_run("ddpm_shapes")            # committed checkpoint, cache, or train now

and the command line trains the same run (``python -m fdiff.train --help`` lists them)::

    python -m fdiff.train ddpm_shapes-deep --profile cpu
    python -m fdiff.train ddpm_shapes --set train.steps=5000 --set model.num_res_blocks=2

``--set`` takes any field of the run by its dotted path, so a new config field needs no code here.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import (
    ModelConfig,
    build_model,
    ensure_writable,
    load_model,
    load_pretrained,
    read_manifest,
    save_model,
)
from .configs import canonical, change, to_json
from .data import DATASET_NAMES, stack_images, training_data
from .datasets import REAL_DATASETS, load_dataset
from .factorized import FactorizedConfig, FactorizedDenoiser, partition_probe
from .guidance import GuidedConfig
from .hub import fetch_published
from .profiles import Profile, get_profile
from .schedules import ScheduleConfig
from .seeding import init_module, make_generator
from .train import TrainConfig
from .unet import UNetConfig
from .worlds import WORLDS, world

__all__ = ["DataSpec", "Run", "RunEntry", "RUNS", "resolve_run", "load_run", "train_run",
           "INIT_STREAM"]

INIT_STREAM = -1  # the seeding stream of a run's initial weights (steps use 0, 1, 2, ...)
PROBE_IMAGES = 6  # held-out images whose partitions a factorized run records as it trains


@dataclass(frozen=True)
class DataSpec:
    """The training images of a run: a built-in world's first ``num_images`` training scenes,
    or a real dataset's non-test splits (``num_images`` None), at ``image_size`` pixels."""

    name: str = "shapes"
    image_size: int = 32
    num_images: int | None = 50_000
    seed: int = 0

    def __post_init__(self):
        if self.name not in DATASET_NAMES:
            raise ValueError(
                f"unknown dataset {self.name!r}: expected one of {list(DATASET_NAMES)}"
            )
        if (self.name in WORLDS) != (self.num_images is not None):
            raise ValueError(
                f"num_images is the size of a built-in world's training split and None for a real "
                f"dataset; got {self.num_images!r} for {self.name!r}"
            )

    def training_images(self, root=None, download: bool = False, progress: bool = True):
        """Return the images the run trains on."""
        return training_data(self.name, self.image_size, self.num_images, self.seed, root,
                             download, progress)

    def held_out(self, n: int, root=None, download: bool = False) -> torch.Tensor:
        """Return the first ``n`` held-out (test split) images, (n, 3, S, S) in [-1, 1]."""
        if self.name in WORLDS:
            data = world(self.name, n, self.image_size, self.seed, split="test")
        else:
            data = load_dataset(self.name, root, "test", self.image_size, download)
        return stack_images(data, range(min(n, len(data))))


@dataclass(frozen=True)
class Run:
    """Everything that decides a trained model. Vary it with :meth:`change`."""

    model: ModelConfig
    train: TrainConfig
    data: DataSpec = field(default_factory=DataSpec)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_json(self) -> dict:
        """The run as JSON values; the manifest stores exactly this."""
        return to_json(self)

    def digest(self, budget: bool = True) -> str:
        """Hash of the canonical JSON. ``budget=False`` leaves ``train.steps`` out: it names
        the run that the same settings with more steps continue."""
        run = self if budget else dataclasses.replace(
            self, train=dataclasses.replace(self.train, steps=1))
        return hashlib.sha256(canonical(run).encode()).hexdigest()[:12]

    def change(self, path: str, value: Any) -> Run:
        """Return the run with one field changed (``"model.num_res_blocks"``, ``"steps"``...)."""
        return change(self, path, value)

    def build_model(self) -> nn.Module:
        """Return the run's model with its initial weights, drawn from the run's seed."""
        return init_module(lambda: build_model(self.model),
                           make_generator(self.train.seed, INIT_STREAM))


@dataclass(frozen=True)
class RunEntry:
    """A named run: a kind of model on a dataset, with changes to the profile's defaults.

    ``changes`` apply in every profile, ``per_profile[name]`` in that profile only; both map
    dotted field paths of :class:`Run` to values.
    """

    about: str
    kind: str = "unet"
    dataset: str = "shapes"
    changes: dict[str, Any] = field(default_factory=dict)
    per_profile: dict[str, dict[str, Any]] = field(default_factory=dict)


# The mask generator of the first factorized runs, the default: half the U-Net's width, no
# attention; and the paper's, the second half of a standard U-Net.
_NARROW = {"model.mask_width": 0.5, "model.mask_attention": False}
_PAPER_MASKS = {"model.mask_width": 1.0, "model.mask_attention": True}


def _ablation(about: str, **changes: Any) -> RunEntry:
    # A sixth of the profile's budget each, as in chapter 3's table (a twentieth in gpu, where
    # chapter 3 must train all of them within its share of a Colab session).
    budget = {"ci": 3, "cpu": 500, "gpu": 600, "paper": 8333}
    return RunEntry(f"chapter 3's ablation: {about}", "factorized",
                    changes={**_NARROW, **{f"model.{k}": v for k, v in changes.items()}},
                    per_profile={p: {"train.steps": s} for p, s in budget.items()})


_BF16 = {"train.precision": "bf16"}
# The share of each shape class (disk, square, triangle, ring, cross) kept in the long-tail runs.
_LONG_TAIL = (1.0, 1.0, 1.0, 0.05, 0.05)
_GUIDED_STEPS = {"ci": 4, "cpu": 2000, "gpu": 2000, "paper": 10_000}


def _guided(about: str, dataset: str = "simple-shapes", budget: int = 1,
            **changes: Any) -> RunEntry:
    """A run of chapter 6: ``ddpm_<dataset>`` continued for a few thousand steps (``budget``
    times :data:`_GUIDED_STEPS`) with a condition (``changes``: fields of
    :class:`~fdiff.guidance.GuidedConfig`)."""
    return RunEntry(f"chapter 6: {about}", "guided", dataset,
                    changes={"model.start_from": f"ddpm_{dataset}",
                             **{f"model.{k}": v for k, v in changes.items()}},
                    per_profile={p: {"train.steps": budget * s, **(_BF16 if p == "cpu" else {})}
                                 for p, s in _GUIDED_STEPS.items()})
# The emergence study's budget: short, since it trains one run per world.
_STUDY_BUDGET = {"ci": {"train.steps": 4}, "cpu": {**_BF16, "train.steps": 800},
                 "gpu": {"train.steps": 2000}, "paper": {"train.steps": 5000}}
RUNS: dict[str, RunEntry] = {
    **{f"ddpm_{d}": RunEntry(f"the plain U-Net on {d}", "unet", d, per_profile={"cpu": _BF16})
       for d in DATASET_NAMES},
    **{f"factorized_{d}": RunEntry(f"the factorized denoiser on {d}", "factorized", d,
                                   per_profile={"gpu": {"train.steps": 6000}})
       for d in DATASET_NAMES},
    "factorized_shapes": RunEntry("the factorized denoiser on shapes (narrow mask generator)",
                                  "factorized", "shapes", changes=_NARROW,
                                  per_profile={"gpu": {"train.steps": 6000}}),
    "ddpm_simple-shapes": RunEntry(
        "the plain U-Net on one flat shape per image (chapter 1)", "unet", "simple-shapes",
        per_profile={"cpu": {**_BF16, "train.steps": 10_000}, "gpu": {"train.steps": 10_000},
                     "paper": {"train.steps": 10_000}}),
    "ddpm_shapes-long": RunEntry(
        "chapter 1's U-Net trained longer", per_profile={"cpu": {**_BF16, "train.steps": 10_000}}),
    "ddpm_shapes-minsnr": RunEntry(
        "chapter 1's U-Net with Min-SNR-5 loss weighting", changes={"train.min_snr_gamma": 5.0},
        per_profile={"cpu": _BF16}),
    "ddpm_shapes-deep": RunEntry(
        "two residual blocks per resolution", changes={"model.num_res_blocks": 2},
        per_profile={"cpu": {**_BF16, "train.steps": 10_000}}),
    "ddpm_shapes-deep-long": RunEntry(
        "two residual blocks per resolution, trained longer", changes={"model.num_res_blocks": 2},
        per_profile={"cpu": {**_BF16, "train.steps": 23_000}}),
    "factorized_simple-shapes": RunEntry(
        "the factorized denoiser on one flat shape per image", "factorized", "simple-shapes",
        changes=_NARROW,
        per_profile={"cpu": {**_BF16, "train.steps": 1000}, "gpu": {"train.steps": 1000},
                     "paper": {"train.steps": 5000}}),
    "factorized_simple-shapes-replicate": RunEntry(
        "the same with replicate padding", "factorized", "simple-shapes",
        changes={**_NARROW, "model.unet.padding_mode": "replicate"},
        per_profile={"cpu": {**_BF16, "train.steps": 1000}, "gpu": {"train.steps": 1000},
                     "paper": {"train.steps": 5000}}),
    # The emergence study (scripts/emergence.py): the main world "object" and worlds that each
    # change one of its factors, trained for a short budget and measured along the way.
    **{f"emergence_{w}": RunEntry(
        f"the emergence study on {w}", "factorized", w,
        changes={"model.unet.padding_mode": "replicate", **_PAPER_MASKS},
        per_profile=_STUDY_BUDGET)
       for w in ("object", "objects", "object-shared", "object-flat", "simple-shapes")},
    "emergence_simple-shapes-narrow": RunEntry(
        "the emergence study on simple-shapes, with the narrow mask generator", "factorized",
        "simple-shapes", changes={"model.unet.padding_mode": "replicate", **_NARROW},
        per_profile=_STUDY_BUDGET),
    # Chapter 6: chapter 1's U-Net on simple-shapes continued with a condition, each run the
    # same number of steps, the unguided reference included (fdiff.guidance, fdiff.annotate).
    **{f"guided_{name}": _guided(about, **changes) for name, (about, changes) in {
        "none": ("the reference: the same steps without a condition", {"condition": "none"}),
        "class": ("guided by the true shape class", {"condition": "class"}),
        "self": ("guided by self-labels: 50 clusters of its own diffusion features",
                 {"annotator": "ddpm_simple-shapes", "condition": "self", "num_classes": 50}),
        "layout": ("guided by a layout: figure and ground as the factorized denoiser sees them",
                   {"annotator": "factorized_simple-shapes-replicate", "condition": "layout",
                    "feature_t": 20}),
        **{f"self-k{k}": (f"guided by self-labels: {k} clusters instead of 50",
                          {"annotator": "ddpm_simple-shapes", "condition": "self",
                           "num_classes": k}) for k in (10, 20)},
        **{f"self-deep{tail}": (f"guided by self-labels: {k} clusters of the deepest decoder "
                                "block's features alone",
                                {"annotator": "ddpm_simple-shapes", "condition": "self",
                                 "num_classes": k, "feature_blocks": (0,)})
           for k, tail in ((50, ""), (20, "-k20"))},
        "split-deep-k20": ("a diagnostic, not label-free: the deepest block's features "
                           "clustered within each true class, 4 clusters per class",
                           {"annotator": "ddpm_simple-shapes", "condition": "split",
                            "num_classes": 20, "feature_blocks": (0,)}),
        # twice the steps: does a longer training change how well conditions are followed?
        "self-deep-k20-long": ("guided by 20 self-labels of the deepest decoder block, trained "
                               "twice as long",
                               {"annotator": "ddpm_simple-shapes", "condition": "self",
                                "num_classes": 20, "feature_blocks": (0,), "budget": 2}),
        "class-long": ("guided by the true shape class, trained twice as long",
                       {"condition": "class", "budget": 2}),
        "class-longtail": ("guided by the true class, two classes kept at 5%",
                           {"condition": "class", "class_share": _LONG_TAIL}),
        "self-longtail": ("guided by self-labels, two classes kept at 5%",
                          {"annotator": "ddpm_simple-shapes", "condition": "self",
                           "num_classes": 50, "class_share": _LONG_TAIL}),
    }.items()},
    # Chapter 6 beyond simple shapes: self-guidance on the textured world (cpu) and on the real
    # datasets (gpu), each continuing that dataset's plain U-Net and clustering its features.
    **{f"guided_{c}_{d}": _guided(
        f"{about} on {d}", d,
        **({"annotator": f"ddpm_{d}", "num_classes": 50} if c == "self" else {}), condition=c)
       for d in ("shapes", *REAL_DATASETS)
       for c, about in (("none", "the unguided reference"), ("self", "self-guided, 50 clusters"))},
    "ablation_k2": _ablation("the reference, K = 2"),
    "ablation_k3": _ablation("K = 3", num_regions=3),
    "ablation_k4": _ablation("K = 4", num_regions=4),
    "ablation_concat": _ablation("the mask concatenated", mode="concat"),
    "ablation_mask_mid": _ablation("the middle features masked too", mode="mask_mid"),
    "ablation_unshared": _ablation("one decoder per region", shared_decoder=False),
    "ablation_mask_noise": _ablation("Gumbel noise on the mask logits", mask_noise=1.0),
    "ablation_replicate": _ablation("replicate padding", **{"unet.padding_mode": "replicate"}),
}


def _profile(profile: Profile | str | None) -> Profile:
    return profile if isinstance(profile, Profile) else get_profile(profile)


def default_run(kind: str, profile: Profile, dataset: str = "shapes") -> Run:
    """Return the profile's run of a model ``kind`` ("unet" or "factorized") on ``dataset``."""
    unet = UNetConfig.from_profile(profile)
    models = {"unet": unet, "factorized": FactorizedConfig(unet), "guided": GuidedConfig(unet)}
    if kind not in models:
        raise ValueError(f"unknown model kind {kind!r}: expected one of {sorted(models)}")
    return Run(
        model=models[kind],
        train=TrainConfig(steps=profile.train_steps, batch_size=profile.batch_size,
                          lr=profile.learning_rate),
        data=DataSpec(dataset, profile.image_size,
                      profile.num_train_images if dataset in WORLDS else None),
        schedule=ScheduleConfig("cosine", profile.num_timesteps),
    )


def resolve_run(name: str, profile: Profile | str | None = None, dataset: str | None = None) -> Run:
    """Return the :class:`Run` that ``name`` (a key of :data:`RUNS`) means in ``profile``.

    ``dataset`` trains the same run on another dataset (a chapter running on Pets).
    """
    if name not in RUNS:
        raise ValueError(f"no run named {name!r}; the registered runs are: {', '.join(RUNS)}")
    entry, profile = RUNS[name], _profile(profile)
    run = default_run(entry.kind, profile, dataset or entry.dataset)
    for path, value in {**entry.changes, **entry.per_profile.get(profile.name, {})}.items():
        run = run.change(path, value)
    return run


def cache_dir() -> Path:
    """Return the folder for downloads and self-trained checkpoints (``$FDIFF_CACHE``)."""
    import os

    env = os.environ.get("FDIFF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fdiff"


def run_paths(name: str, run: Run) -> tuple[Path, Path]:
    """Return (trained checkpoint, resume file) of a run in the cache."""
    root = cache_dir()
    return (root / "checkpoints" / f"{name}-{run.digest()}.safetensors",
            root / "runs" / f"{name}-{run.digest(budget=False)}.resume.safetensors")


def _guided_setup(run: Run, model, data, profile, progress: bool, root, download):
    """For a guided run: start the model from its base run, and return its training data with
    their conditions, the tensors to keep beside its weights and metadata of its annotation."""
    from .annotate import (
        Conditioned,
        Selected,
        class_subset,
        image_classes,
        pooled_features,
        segment_layouts,
        self_annotate,
        split_by_class,
    )
    from .guidance import start_from

    cfg, tensors, meta = run.model, {}, {}

    def other(name):
        other_model, _ = load_run(name, profile, progress=progress, root=root, download=download)
        meta[f"{name}_run"] = resolve_run(name, profile).digest()
        return other_model

    if cfg.start_from:
        start_from(model, other(cfg.start_from).cpu())
    classes = image_classes(data, progress=progress) if cfg.class_share or \
        cfg.condition in ("class", "split") else None
    if cfg.class_share:
        indices = class_subset(classes, cfg.class_share, seed=run.train.seed)
        tensors["train_indices"] = indices
        data = Selected(data, indices)
        classes = classes[indices]
    if cfg.condition == "none":
        return data, tensors, meta
    if cfg.condition == "class":
        if int(classes.max()) >= cfg.num_classes:
            raise ValueError(f"the data has {int(classes.max()) + 1} classes, the run "
                             f"num_classes={cfg.num_classes}")
        return Conditioned(data, classes), tensors, meta
    annotator = other(cfg.annotator)
    schedule = resolve_run(cfg.annotator, profile).schedule.build()
    if cfg.condition in ("self", "split"):
        features = pooled_features(annotator, schedule, data,
                                   cfg.annotation_t(schedule.num_timesteps),
                                   noise_seed=run.train.seed, progress=progress,
                                   blocks=cfg.feature_blocks)
        labels = self_annotate(features, cfg.num_classes, seed=run.train.seed) \
            if cfg.condition == "self" else \
            split_by_class(features, classes, cfg.num_classes, seed=run.train.seed)
        tensors.update(cluster_centroids=labels.centroids, cluster_ids=labels.ids)
        return Conditioned(data, labels.ids), tensors, meta
    if cfg.layout_channels != 2:
        raise ValueError(f"layouts are figure and ground: layout_channels must be 2, got "
                         f"{cfg.layout_channels}")
    layouts = segment_layouts(annotator, schedule, data, cfg.annotation_t(schedule.num_timesteps),
                              seed=run.train.seed, progress=progress)
    return Conditioned(data, layouts), tensors, meta


def train_run(run: Run, resume: Path, progress: bool = True, root=None, download=False,
              save_every: int = 250, callback=None, profile: Profile | str | None = None):
    """Train ``run`` (resuming from ``resume`` if it exists); return (EMA model, metadata,
    tensors) ready for :func:`~fdiff.checkpoints.save_model`. ``callback(step, result)`` runs
    after every step (:func:`fdiff.train.train`). ``profile`` resolves the runs a guided run
    starts from or is annotated by (:class:`~fdiff.guidance.GuidedConfig`)."""
    from .profiles import default_device
    from .train import train

    model = run.build_model()
    schedule = run.schedule.build()
    data = run.data.training_images(root, download, progress)
    device = default_device()
    snapshot, tensors, guided = None, {}, {}
    if isinstance(run.model, GuidedConfig):
        data, tensors, guided = _guided_setup(run, model, data, _profile(profile), progress,
                                              root, download)
    if isinstance(model, FactorizedDenoiser):
        probe = run.data.held_out(PROBE_IMAGES, root, download)
        snapshot, tensors = partition_probe(schedule, probe, seed=run.train.seed)
    result = train(model.to(device), schedule, data, run.train, checkpoint=resume,
                   progress=progress, snapshot=snapshot,
                   snapshot_every=max(1, run.train.steps // 30), save_every=save_every,
                   callback=callback)
    if result.snapshots:
        tensors["snapshot_masks"] = torch.stack(result.snapshots)
        tensors["snapshot_steps"] = torch.tensor(result.snapshot_steps, dtype=torch.int64)
    extra = {
        "run": run.to_json(),
        "schedule": schedule.config(),
        "steps": result.step,
        "seconds": round(result.seconds, 1),
        "device": str(device),
        "losses": [round(v, 5) for v in result.losses],
        **guided,
    }
    return result.ema.cpu(), extra, tensors


def _estimate(run: Run, device: torch.device) -> str:
    """", about N minutes of a T4" for a run about to train on a GPU (fdiff.budget)."""
    if device.type != "cuda":
        return ""
    from .budget import gpu_minutes, run_flops

    return f", about {gpu_minutes(run_flops(run)):.0f} minutes of a T4"


def load_run(
    name: str,
    profile: Profile | str | None = None,
    dataset: str | None = None,
    changes: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    root=None,
    download: bool = False,
    train: bool = True,
):
    """Return (model, metadata) of the run ``name``: the committed checkpoint when its run is
    this one, else a cached one, else published weights of this run, downloaded into the cache
    (:mod:`fdiff.hub`), else train it now (resumable) and cache it; ``train=False`` raises a
    FileNotFoundError instead of training.

    The model is in eval mode on ``device`` (default: a GPU if there is one). ``dataset``: the
    same run on another dataset; ``changes``: fields to change, ``{"steps": 2000}`` (an
    experiment of one's own: trained and cached under its own digest); ``root``/``download``:
    where a real dataset is. On Colab, point ``FDIFF_CACHE`` at Google Drive to keep trained
    runs across disconnects.
    """
    from .profiles import default_device

    run = resolve_run(name, profile, dataset)
    for path, value in (changes or {}).items():
        run = run.change(path, value)
    device = default_device() if device is None else torch.device(device)
    entry = read_manifest().get(name)
    if entry is not None and entry.get("run") == run.to_json():
        model, meta = load_pretrained(name)
        return model.to(device), meta
    path, resume = run_paths(name, run)
    if not path.exists():
        ensure_writable(path.parent)
        if fetch_published(name, run.digest(), path, progress) is None:
            where = f"{name!r} ({run.train.steps} steps, run {run.digest()})"
            if not train:
                raise FileNotFoundError(
                    f"no weights for {where}: none committed, published or in {path.parent}. "
                    f"Train them with load_run({name!r}, train=True)")
            print(f"no published weights for {where}: training it now{_estimate(run, device)}; "
                  "it resumes if stopped")
            ensure_writable(resume.parent)
            ema, extra, tensors = train_run(run, resume, progress, root, download,
                                            profile=profile)
            save_model(path, ema, extra=extra, tensors=tensors)
    model, meta = load_model(path)
    return model.to(device), meta
