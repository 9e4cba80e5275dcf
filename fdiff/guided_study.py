"""Chapter 6's study of guided sampling: what guidance does to samples, measured.

:func:`guidance_study` samples chapter 6's guided runs (``guided_*`` in :mod:`fdiff.runs`) with
DDIM (eta = :data:`ETA`) at guidance scales w in {0, 1, 2, 4}, ``n`` images per setting, and
measures:

- the Fréchet distance of the samples to held-out images in the pooled features of an ImageNet
  MobileNetV2 (:func:`fdiff.metrics.frechet_distance`), with two floors: two seeds of the
  unguided reference apart, and training images against the held-out ones;
- diversity: the mean pairwise distance of the samples' features, as a share of the held-out
  images' own;
- class match (image-level guidance): the share of samples that :mod:`fdiff.recognise`
  recognises as the class asked for (for self-labels: the class most of the cluster's training
  images hold), overall and per class asked for; for self-labels also on the pure clusters
  alone (:data:`PURE`), which parts the model's following of its condition from the clusters'
  mixing of classes;
- layout IoU (mask-level guidance): the figure of each sample, segmented by the segmenter that
  made the layouts, against the layout's figure;
- the long-tail runs: class match on the rare and on the frequent classes;
- how many clusters: the self-guided recipe with 10, 20 and 50 clusters, at w = 2 (NMI, purity,
  class match overall and on the pure clusters);
- which features: the recipe with the deepest decoder block's features alone
  (:data:`DEEP_RUNS`): NMI, purity, and FD, diversity and class match as above.
- what pure clusters give: the deepest block's features clustered within each true class
  (:data:`SPLIT_RUN`, a diagnostic that uses the labels), scored as the previous part.
- what a longer training gives: the deepest block's 20 self-labels and the true classes, each
  trained twice as long (:data:`LONG_RUNS`), at w = 0 and 2.

:func:`feature_choice` needs no sampling: it scores the self-labels themselves, for each step,
set of decoder blocks and number of clusters, by their agreement under other views of the images
(label-free) beside NMI, purity and pure share (judged with the true classes).

:func:`world_study` measures the same recipe on another dataset (the textured world in the cpu
profile, Pets in the gpu profile), where no recogniser says what a sample shows: there, *cluster
match* is the share of samples that the annotation itself puts back in the cluster asked for.

On two CPU cores this takes longer than a notebook cell should, so ``scripts/chapter6_guidance.py``
runs it once for the cpu profile and the chapter loads the result.
"""

from __future__ import annotations

import json
import time

import torch

from .annotate import (
    SelfLabels,
    augment_views,
    cluster_purity,
    cluster_scores,
    image_classes,
    majority_class,
    segment_layouts,
    self_annotate,
    training_labels,
)
from .annotate import pooled_features as diffusion_features
from .data import profile_dataset, stack_images
from .guidance import Guided
from .imagenet import load_mobilenet_v2, pooled_features
from .metrics import frechet_distance
from .profiles import Profile, default_device
from .recognise import recognise_shapes
from .runs import load_run, read_manifest, resolve_run
from .samplers import generate
from .schedules import step_of
from .seeding import make_generator, per_sample_generators
from .worlds import world

__all__ = ["SCALES", "ETA", "PURE", "RARE", "CLUSTER_COUNTS", "DEEP_RUNS", "SPLIT_RUN",
           "LONG_RUNS", "PART_RUNS",
           "GUIDED_RUNS", "PARTS", "WORLD_RUNS", "cluster_match", "diversity", "mask_iou",
           "same_shapes_baseline", "guidance_study", "world_study", "feature_choice"]

SCALES = (0.0, 1.0, 2.0, 4.0)
# The study's sampler: DDIM on the profile's step grid with eta = 1, the variance of DDPM's
# ancestral steps: at 50 steps, deterministic DDIM (eta = 0) draws fewer recognisable shapes,
# and the main part measures by how much (its "deterministic" entry).
ETA = 1.0
PURE = 0.95  # a cluster is pure when this share of its training images hold one class
RARE = (3, 4)  # class ids (0-based: ring, cross) the long-tail runs keep at 5%
CLUSTER_COUNTS = (10, 20, 50)  # the self-guided runs of the "clusters" part
# the "features" part: the self-guided recipe on the deepest decoder block's features alone,
# with 50 and 20 clusters (the first swept over every scale, the second at w = 0 and 2)
DEEP_RUNS = ("guided_self-deep", "guided_self-deep-k20")
# the "split" part, a diagnostic: the deepest block's features clustered within each true class
# (4 clusters per class, as fine as guided_self-deep-k20's but never mixing classes), so the
# class match it reaches is what the recipe does with pure clusters of that size
SPLIT_RUN = "guided_split-deep-k20"
# the "long" part: the label-free 20 clusters of the deepest block and the true classes, each
# trained twice as long as the other runs (self-labels first)
LONG_RUNS = ("guided_self-deep-k20-long", "guided_class-long")
# The runs the study loads, by the part of it that uses them
PART_RUNS = {"main": ("ddpm_simple-shapes", "factorized_simple-shapes-replicate", "guided_none",
                      "guided_class", "guided_self", "guided_layout"),
             "longtail": ("guided_class-longtail", "guided_self-longtail"),
             "clusters": ("guided_self-k10", "guided_self-k20", "guided_self"),
             "features": DEEP_RUNS, "split": (SPLIT_RUN,), "long": LONG_RUNS}
PARTS = tuple(PART_RUNS)
GUIDED_RUNS = tuple(dict.fromkeys(name for runs in PART_RUNS.values() for name in runs))
# world_study's runs on a dataset: "{}" stands for its name
WORLD_RUNS = ("ddpm_{}", "guided_none_{}", "guided_self_{}")


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance between feature vectors (N, D)."""
    d = torch.cdist(features.double(), features.double())
    n = len(features)
    return (d.sum() / (n * (n - 1))).item()


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of two sets of boolean masks (N, H, W), per image (an empty pair scores 1)."""
    inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _load_runs(names, profile: Profile, train: bool, **data) -> tuple[dict, dict, dict]:
    """(models, metadata, sha256) of the runs ``names`` in ``profile``: the sha256 of the
    committed checkpoint when the run is the committed one, else None (trained or cached
    here). ``data``: ``root``/``download`` of a real dataset."""
    manifest, models, metas, sha = read_manifest(), {}, {}, {}
    for name in names:
        models[name], metas[name] = load_run(name, profile, train=train, progress=False, **data)
        entry = manifest.get(name)
        sha[name] = entry["sha256"] if entry and entry["run"] == resolve_run(name, profile)\
            .to_json() else None
    return models, metas, sha


def _sampler(schedule, profile: Profile, n: int, size: int):
    """``sample(denoiser, seed, eta=ETA)``: ``n`` images by DDIM on the profile's steps, each
    image's noise drawn from its own seed (so the same seed gives the same noises)."""
    device = default_device()

    def sample(denoiser, seed: int, eta: float = ETA) -> torch.Tensor:
        return generate(denoiser, schedule, (n, 3, size, size), method="ddim",
                        num_steps=profile.ddim_steps, eta=eta,
                        generator=per_sample_generators(seed, n), device=device)
    return sample


def _feature_scores(net, images: torch.Tensor, reference: torch.Tensor) -> dict:
    """FD of ``images`` to the ``reference`` features (held-out images) in ``net``'s pooled
    features, and their diversity as a share of the reference's."""
    feats = pooled_features(net, images)
    return {"fd": round(frechet_distance(feats, reference), 3),
            "diversity": round(diversity(feats) / diversity(reference), 4)}


def guidance_study(profile: Profile, n: int = 256, train: bool = False,
                   progress: bool = True, parts: tuple[str, ...] = PARTS) -> dict:
    """Measure chapter 6's guided runs of ``profile`` (module docstring) on ``n`` samples per
    setting; ``train``: train runs that are not committed, published or cached (else they must
    be). ``parts``: some of :data:`PARTS`: "main" (the floors, image- and mask-level guidance),
    "longtail", "clusters", "features", "split" and "long" (the module's description).
    Returns the measurements as JSON values, with the sha256 of each committed checkpoint used
    (None for one trained here)."""
    if not parts or any(p not in PARTS for p in parts):
        raise ValueError(f"parts must be some of {PARTS}, got {parts}")
    S = profile.image_size
    schedule = resolve_run("guided_none", profile).schedule.build()
    net = load_mobilenet_v2()
    held_out = world("simple-shapes", max(n, 256), S, split="test").batch(list(range(n)))
    train_images = world("simple-shapes", profile.num_train_images, S, split="train")
    reference = pooled_features(net, held_out["image"])
    classes = image_classes(train_images, progress=False)
    start = time.perf_counter()

    def guided(model, cond: torch.Tensor, w: float):
        """The guided denoiser; at w = 0 and 1 only the one input that counts runs."""
        if w == 0:
            return lambda x, t: model(x, t, None)
        if w == 1:
            return lambda x, t: model(x, t, cond.to(x.device))
        return Guided(model, cond, w)

    sample = _sampler(schedule, profile, n, S)

    def scores(images: torch.Tensor) -> dict:
        return _feature_scores(net, images, reference)

    def log(text: str) -> None:
        if progress:
            print(f"{text}  ({time.perf_counter() - start:.0f} s)", flush=True)

    models, metas, sha = _load_runs(
        dict.fromkeys(name for part in parts for name in PART_RUNS[part]), profile, train)

    result: dict = {"profile": profile.name, "n": n, "ddim_steps": profile.ddim_steps,
                    "eta": ETA, "scales": list(SCALES), "sha256": sha}
    if "main" in parts:
        _main_part(result, models, metas, n, sample, scores, guided, log, classes, held_out,
                   train_images, schedule)
    if "longtail" in parts:
        _longtail_part(result, models, metas, n, sample, log, classes)
    if "clusters" in parts:
        _clusters_part(result, models, metas, n, sample, log, classes)
    if "features" in parts:
        _features_part(result, models, metas, n, sample, scores, guided, log, classes)
    if "split" in parts:
        _split_part(result, models, metas, n, sample, scores, guided, log, classes)
    if "long" in parts:
        _long_part(result, models, metas, n, sample, scores, guided, log, classes)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _main_part(result, models, metas, n, sample, scores, guided, log, classes, held_out,
               train_images, schedule) -> None:

    # floors: the unguided reference from two seeds, and training images vs held-out ones
    unguided = [sample(models["guided_none"], seed) for seed in (100, 200)]
    fds = [scores(x)["fd"] for x in unguided]
    result["unguided"] = {**scores(unguided[0]), "fd_other_seed": fds[1],
                          "recognised": round(recognise_shapes(unguided[0]).rate, 4)}
    result["fd_seed_spread"] = round(abs(fds[0] - fds[1]), 3)
    train_batch = train_images.batch(list(range(n)))["image"]
    result["fd_training_images"] = scores(train_batch)["fd"]
    log(f"unguided: FD {fds[0]:.2f} / {fds[1]:.2f} (two seeds); training images "
        f"{result['fd_training_images']:.2f}")

    def guided_sweep(key: str, model, cond: torch.Tensor, wanted: torch.Tensor | None,
                     layout_fg: torch.Tensor | None = None,
                     pure: torch.Tensor | None = None) -> dict:
        """FD, diversity, class match or layout IoU of ``model`` guided by ``cond`` at each w.
        Class match is also given per class asked for, and (``pure``: the samples whose
        cluster is pure) on the pure clusters alone."""
        out = {}
        for w in SCALES:
            x = sample(guided(model, cond, w), 100)
            row = scores(x)
            if wanted is not None:
                row.update(_match_scores(x, wanted, pure))
            if layout_fg is not None:
                seg = segment_layouts(models["factorized_simple-shapes-replicate"], schedule, x,
                                      models["guided_layout"].config.annotation_t(
                                          schedule.num_timesteps), progress=False)
                row["layout_iou"] = round(mask_iou(seg[:, 0] > 0, layout_fg).mean().item(), 4)
            out[str(w)] = row
            log(f"{key} w = {w}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
        return out

    # image level: true classes, evenly; self-labels, drawn as often as in the training data
    label_cond = torch.arange(n) % 5
    result["class"] = guided_sweep("class", models["guided_class"], label_cond, label_cond)
    self_model, self_meta = models["guided_self"], metas["guided_self"]
    ids = self_meta["tensors"]["cluster_ids"]
    k = self_model.config.num_classes
    self_cond, wanted, purity = _self_conditions(ids, classes, k, n)
    pure = purity >= PURE
    result["self_asked_purity"] = round(purity.mean().item(), 4)
    result["self_pure_share"] = round(pure.float().mean().item(), 4)
    result["self"] = guided_sweep("self", self_model, self_cond, wanted, pure=pure)
    # the same at w = 2 with deterministic DDIM (eta = 0)
    result["deterministic"] = {
        key: _match_scores(sample(Guided(model, cond, 2.0), 100, eta=0.0), want)
        for key, model, cond, want in (("class", models["guided_class"], label_cond, label_cond),
                                       ("self", self_model, self_cond, wanted))}
    log("deterministic DDIM, w = 2: " + json.dumps(result["deterministic"]))
    # mask level: the layouts of held-out images, made by the segmenter the run trained with
    layout_model = models["guided_layout"]
    t_seg = layout_model.config.annotation_t(schedule.num_timesteps)
    layouts = segment_layouts(models["factorized_simple-shapes-replicate"], schedule,
                              held_out["image"], t_seg, progress=False)
    truth_iou = mask_iou(layouts[:, 0] > 0, held_out["mask"] > 0).mean().item()
    result["layout_vs_truth_iou"] = round(truth_iou, 4)
    result["layout"] = guided_sweep("layout", layout_model, layouts.float() / 255, None,
                                    layouts[:, 0] > 0)


def _longtail_part(result, models, metas, n, sample, log, classes) -> None:
    # imbalance: each long-tail model asked for the rare classes (self-labels: the clusters
    # whose training images are mostly of a rare class) and for the frequent ones
    longtail = {}
    lt_class_model, lt_meta = models["guided_class-longtail"], metas["guided_class-longtail"]
    kept = lt_meta["tensors"]["train_indices"]
    counts = torch.bincount(classes[kept], minlength=5)
    longtail["class_counts"] = counts.tolist()
    for which, pool in (("rare", RARE), ("frequent", tuple(c for c in range(5) if c not in RARE))):
        cond = torch.tensor(pool)[torch.arange(n) % len(pool)]
        x = sample(Guided(lt_class_model, cond, 2.0), 100)
        rep = recognise_shapes(x)
        longtail[f"class_{which}_match"] = round((rep.ok & (rep.label == cond + 1)).float()
                                                 .mean().item(), 4)
    lt_self_model, lt_self_meta = models["guided_self-longtail"], metas["guided_self-longtail"]
    lt_ids = lt_self_meta["tensors"]["cluster_ids"]
    lt_classes = classes[lt_self_meta["tensors"]["train_indices"]]
    lt_major = majority_class(lt_ids, lt_classes, lt_self_model.config.num_classes)
    longtail["self_clusters_per_class"] = torch.bincount(lt_major[lt_major >= 0],
                                                         minlength=5).tolist()
    for which, pool in (("rare", RARE), ("frequent", tuple(c for c in range(5) if c not in RARE))):
        clusters = torch.tensor([c for c in range(len(lt_major)) if int(lt_major[c]) in pool])
        if not len(clusters):  # no cluster holds mostly these classes: they cannot be asked for
            longtail[f"self_{which}_match"] = 0.0
            continue
        cond = clusters[torch.arange(n) % len(clusters)]
        x = sample(Guided(lt_self_model, cond, 2.0), 100)
        rep = recognise_shapes(x)
        longtail[f"self_{which}_match"] = round((rep.ok & (rep.label == lt_major[cond] + 1))
                                                .float().mean().item(), 4)
    result["longtail"] = longtail
    log("long tail: " + json.dumps(longtail))


def _match_scores(images: torch.Tensor, wanted: torch.Tensor,
                  pure: torch.Tensor | None = None) -> dict:
    """Class match of ``images`` against the classes ``wanted`` (0-based): overall, per class
    asked for (None for a class never asked for), and on the ``pure`` samples alone if given."""
    report = recognise_shapes(images)
    match = (report.ok & (report.label == wanted + 1)).float()
    out = {"class_match": round(match.mean().item(), 4), "recognised": round(report.rate, 4),
           "match_by_class": [round(match[wanted == c].mean().item(), 4)
                              if (wanted == c).any() else None for c in range(5)]}
    if pure is not None and pure.any():
        out["pure_match"] = round(match[pure].mean().item(), 4)
    return out


def _self_conditions(ids: torch.Tensor, classes: torch.Tensor, k: int, n: int):
    """``n`` self-labels drawn as often as the training data holds them, with the class each
    asks for (its cluster's majority class) and the purity of its cluster."""
    cond = ids[torch.randint(len(ids), (n,), generator=make_generator(6))]
    return (cond, majority_class(ids, classes, k)[cond], cluster_purity(ids, classes, k)[cond])


def _self_guided_match(model, ids: torch.Tensor, classes: torch.Tensor, n: int, sample,
                       w: float) -> dict:
    """Class match of a self-guided model at scale ``w``, overall and on the pure clusters."""
    cond, wanted, purity = _self_conditions(ids, classes, model.config.num_classes, n)
    pure = purity >= PURE
    scores = _match_scores(sample(Guided(model, cond, w), 100), wanted, pure)
    out = {key: scores.get(key) for key in ("class_match", "recognised", "pure_match")}
    out["pure_share"] = round(pure.float().mean().item(), 4)
    return out


def _clusters_part(result, models, metas, n, sample, log, classes) -> None:
    # how many clusters: the same self-guided recipe with k = 10, 20, 50, at w = 2
    out = {}
    for k in CLUSTER_COUNTS:
        name = "guided_self" if k == 50 else f"guided_self-k{k}"
        model, meta = models[name], metas[name]
        if model.config.num_classes != k:
            raise ValueError(f"{name} has {model.config.num_classes} clusters, expected {k}")
        ids = meta["tensors"]["cluster_ids"]
        scores = cluster_scores(ids, classes)
        if name == "guided_self" and "self" in result:  # sampled by the main part already
            row = result["self"]["2.0"]
            match = {key: row.get(key) for key in ("class_match", "recognised", "pure_match")}
            match["pure_share"] = result["self_pure_share"]
        else:
            match = _self_guided_match(model, ids, classes, n, sample, 2.0)
        out[str(k)] = {"nmi": round(scores["nmi"], 4), "purity": round(scores["purity"], 4),
                       **match}
        log(f"k = {k}: " + json.dumps(out[str(k)]))
    result["clusters"] = out


def _features_part(result, models, metas, n, sample, scores, guided, log, classes) -> None:
    # which features: self-labels from the deepest decoder block alone
    result["features"] = _cluster_runs(zip(DEEP_RUNS, (SCALES, (0.0, 2.0))), models, metas, n,
                                       sample, scores, guided, log, classes)


def _split_part(result, models, metas, n, sample, scores, guided, log, classes) -> None:
    # the diagnostic: the deepest block's clusters made pure with the labels (SPLIT_RUN)
    result["split"] = _cluster_runs([(SPLIT_RUN, (0.0, 2.0))], models, metas, n, sample, scores,
                                    guided, log, classes)[SPLIT_RUN]


def _long_part(result, models, metas, n, sample, scores, guided, log, classes) -> None:
    # twice the training steps: self-labels of the deepest block (k = 20) and true classes
    self_name, class_name = LONG_RUNS
    steps = [resolve_run(name, result["profile"]).train.steps for name in (class_name,
                                                                             "guided_class")]
    out = {"steps_factor": steps[0] / steps[1],
           "self": _cluster_runs([(self_name, (0.0, 2.0))], models, metas, n, sample, scores,
                                 guided, log, classes)[self_name], "class": {}}
    label_cond = torch.arange(n) % 5
    for w in (0.0, 2.0):
        x = sample(guided(models[class_name], label_cond, w), 100)
        out["class"][str(w)] = {**scores(x), **_match_scores(x, label_cond)}
        log(f"{class_name} w = {w}: " + json.dumps(out["class"][str(w)]))
    result["long"] = out


def _cluster_runs(runs, models, metas, n, sample, scores, guided, log, classes) -> dict:
    """For each (name, scales) of ``runs``, a run guided by cluster ids: its clusters' NMI,
    purity and pure share, and at each scale FD, diversity and class match (as
    :func:`_match_scores`), its conditions drawn as often as its training data holds them."""
    out = {}
    for name, scales in runs:
        model, ids = models[name], metas[name]["tensors"]["cluster_ids"]
        cluster = cluster_scores(ids, classes)
        cond, wanted, purity = _self_conditions(ids, classes, model.config.num_classes, n)
        pure = purity >= PURE
        row: dict = {"k": model.config.num_classes, "blocks": list(model.config.feature_blocks),
                     "nmi": round(cluster["nmi"], 4), "purity": round(cluster["purity"], 4),
                     "pure_share": round(pure.float().mean().item(), 4)}
        for w in scales:
            x = sample(guided(model, cond, w), 100)
            row[str(w)] = {**scores(x), **_match_scores(x, wanted, pure)}
            log(f"{name} w = {w}: " + json.dumps(row[str(w)]))
        out[name] = row
    return out


def same_shapes_baseline(ids: torch.Tensor, classes: torch.Tensor, k: int,
                         match_by_class: list) -> float | None:
    """The class match that true-label guidance gives on the shapes the pure clusters hold:
    ``match_by_class`` (the true-label model's match per class) averaged over the majority
    classes of the training images in pure clusters (:data:`PURE`). None if no cluster is pure
    or none of their classes was measured."""
    in_pure = cluster_purity(ids, classes, k)[ids] >= PURE
    mix = torch.bincount(majority_class(ids, classes, k)[ids][in_pure],
                         minlength=len(match_by_class)).double()
    measured = torch.tensor([v is not None for v in match_by_class])
    per_class = torch.tensor([0.0 if v is None else v for v in match_by_class],
                             dtype=torch.double)
    mix = mix * measured
    return round((mix / mix.sum() * per_class).sum().item(), 4) if mix.sum() else None


def cluster_match(annotator, schedule, labels: SelfLabels, images: torch.Tensor,
                  asked: torch.Tensor, t: int, noise_seed: int, blocks=()) -> float:
    """The share of ``images`` (N, 3, H, W) that the self-annotation puts in the cluster
    ``asked`` (N,) of each: their pooled features from ``annotator`` at step ``t`` and noise
    ``noise_seed`` (the annotation's own, for samples) and decoder ``blocks`` (all if empty),
    nearest the centroid of ``labels``."""
    if len(asked) != len(images):
        raise ValueError(f"one cluster per image: {len(images)} images, {len(asked)} clusters")
    back = labels.assign(diffusion_features(annotator, schedule, images, t,
                                            noise_seed=noise_seed, progress=False,
                                            blocks=blocks))
    return (back == asked.cpu()).float().mean().item()


def world_study(profile: Profile, dataset: str | None = None, n: int = 256, train: bool = False,
                progress: bool = True, root=None, download: bool = False) -> dict:
    """Self-guidance on ``dataset`` (default: the profile's, :func:`fdiff.data.profile_dataset`):
    ``guided_self_<dataset>`` against its unguided reference ``guided_none_<dataset>``, ``n``
    samples per setting, DDIM with the profile's steps and :data:`ETA`.

    Returns JSON values: the self-labels' NMI and purity against the dataset's own labels (None
    where it has none); the Fréchet distance (MobileNetV2 features, to held-out images) of the
    reference from two seeds and of the self-guided model at w = 0 and 2, with diversity; the
    training images' own distance; and *cluster match*: the share of samples whose features
    (the annotator's, at the annotation step and noise) are nearest the centroid of the cluster
    asked for, at w = 0 and 2 and for the reference, with its ceiling: the share of training
    images that the annotation puts back in their own cluster when noised with another noise.
    The sha256 of each committed checkpoint used (None for one trained or cached here)."""
    dataset = profile_dataset(profile, dataset)
    names = [name.format(dataset) for name in WORLD_RUNS]
    models, metas, sha = _load_runs(names, profile, train, root=root, download=download)
    annotator, reference, self_model = (models[name] for name in names)
    run = resolve_run(names[2], profile)
    schedule, S = run.schedule.build(), run.data.image_size
    t = self_model.config.annotation_t(schedule.num_timesteps)
    blocks = self_model.config.feature_blocks
    tensors = metas[names[2]]["tensors"]
    labels = SelfLabels(tensors["cluster_centroids"], tensors["cluster_ids"])
    truth = training_labels(run.data, root, download, progress=False)
    net = load_mobilenet_v2()
    held_out = run.data.held_out(n, root, download)
    ref_feats = pooled_features(net, held_out)
    train_images = run.data.training_images(root, download, progress=False)
    train_batch = stack_images(train_images, range(min(n, len(train_images))))
    sample = _sampler(schedule, profile, n, S)
    start = time.perf_counter()
    # n self-labels drawn as often as the training images hold them
    cond = labels.ids[torch.randint(len(labels.ids), (n,), generator=make_generator(6))]

    def draw(denoiser, seed: int) -> dict:
        x = sample(denoiser, seed)
        row = {**_feature_scores(net, x, ref_feats),
               "cluster_match": round(cluster_match(annotator, schedule, labels, x, cond, t,
                                                    run.train.seed, blocks), 4)}
        if progress:
            print(f"{dataset}: {row}  ({time.perf_counter() - start:.0f} s)", flush=True)
        return row

    out: dict = {"dataset": dataset, "n": n, "k": labels.k, "ddim_steps": profile.ddim_steps,
                 "eta": ETA, "sha256": sha, "held_out": len(held_out)}
    if truth is not None:
        scores = cluster_scores(labels.ids, truth)
        out.update(nmi=round(scores["nmi"], 4), purity=round(scores["purity"], 4),
                   num_labels=int(truth.max()) + 1)
    else:
        out.update(nmi=None, purity=None, num_labels=None)
    out["fd_training_images"] = _feature_scores(net, train_batch, ref_feats)["fd"]
    # the ceiling of cluster match: training images, noised with another noise, land back in
    # their own cluster this often
    out["ceiling"] = round(cluster_match(annotator, schedule, labels, train_batch,
                                         labels.ids[:len(train_batch)], t,
                                         run.train.seed + 1, blocks), 4)
    unguided = [draw(lambda x, tt: reference(x, tt, None), seed) for seed in (100, 200)]
    out["unguided"] = {**unguided[0], "fd_other_seed": unguided[1]["fd"]}
    out["fd_seed_spread"] = round(abs(unguided[0]["fd"] - unguided[1]["fd"]), 3)
    out["self"] = {"0.0": draw(lambda x, tt: self_model(x, tt, None), 100),
                   "2.0": draw(Guided(self_model, cond, 2.0), 100)}
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def feature_choice(model, schedule, images: torch.Tensor, classes: torch.Tensor,
                   steps=(150,), block_sets=((),), ks=(50,), views: int = 1, seed: int = 1,
                   progress: bool = False) -> list[dict]:
    """Self-labels of ``images`` (N, C, H, W) made with ``model``'s pooled features
    (:func:`fdiff.annotate.pooled_features`), one row per step in ``steps`` (out of 1000; the
    row's ``t`` is the step on the schedule's own chain), decoder blocks in ``block_sets``
    (``()``: all) and k in ``ks``:

    - ``agreement``: the share of images whose view (:func:`fdiff.annotate.augment_views`, drawn
      from ``seed``) falls in their own cluster; label-free;
    - ``nmi``, ``purity`` and ``pure_share`` (the share of images in clusters at least
      :data:`PURE` pure), judged with the true ``classes`` (N,).

    ``views`` > 1 clusters each image's features averaged over itself and ``views - 1`` other
    views (each L2-normalised first), features made more invariant by construction."""
    if len(classes) != len(images):
        raise ValueError(f"one class per image: got {len(classes)} for {len(images)} images")
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    gen = make_generator(seed)
    probe = augment_views(images, gen)  # the view that judges the agreement
    extra = [augment_views(images, gen) for _ in range(views - 1)]
    rows = []
    for t in (step_of(s, schedule.num_timesteps) for s in steps):
        for blocks in block_sets:
            own, seen, *more = (diffusion_features(model, schedule, x, t, progress=progress,
                                                   blocks=blocks)
                                for x in (images, probe, *extra))
            if more:
                own = torch.stack([torch.nn.functional.normalize(f, dim=1)
                                   for f in (own, *more)]).mean(0)
            for k in ks:
                labels = self_annotate(own, k)
                scores = cluster_scores(labels.ids, classes)
                pure = cluster_purity(labels.ids, classes, k)[labels.ids] >= PURE
                rows.append({"t": t, "blocks": list(blocks), "k": k, "views": views,
                             "agreement": round(labels.agreement(seen), 4),
                             "nmi": round(scores["nmi"], 4),
                             "purity": round(scores["purity"], 4),
                             "pure_share": round(pure.float().mean().item(), 4)})
    return rows
