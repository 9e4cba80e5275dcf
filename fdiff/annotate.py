"""Self-annotation: the labels and layouts a guided model trains on, made without human labels.

Self-guided diffusion (Hu et al., CVPR 2023) replaces class labels by the clusters of a
self-supervised feature extractor. Without internet there are no DINO weights here, so the
extractor is the book's own diffusion model: the decoder activations of chapter 4, at one step
``t`` with one fixed noise for all images, each block's map averaged over the image
(:func:`pooled_features`). Then::

    features -> L2 normalisation -> k-means (k clusters) -> cluster id per image

(:func:`self_annotate`); :func:`cluster_scores` compares the ids with true labels (NMI, ARI,
purity), which the method itself never sees. Which features to cluster can be chosen without
them: self-labels should survive what does not change the image's content, a recolouring, a
mirror image, a quarter turn (:func:`augment_views`, :meth:`SelfLabels.agreement`); a generic
score of cluster quality, :func:`silhouette`, is there to compare. Mask-level
self-guidance needs layouts: the masks of an unsupervised segmenter of the book
(:func:`segment_layouts`). :func:`guided_training_data`
puts images and conditions together for :func:`fdiff.train.train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .checks import check_int
from .data import stack_images
from .datasets import TRAINING_SPLITS, load_dataset
from .profiles import model_device
from .seeding import make_generator, randn

__all__ = ["pooled_features", "augment_views", "SelfLabels", "self_annotate", "split_by_class",
           "cluster_scores", "silhouette", "majority_class", "cluster_purity", "image_classes",
           "training_labels", "class_subset", "segment_layouts", "Selected", "Conditioned"]


def _images_at(images, idx: list[int]) -> Tensor:
    """Images ``idx`` of a tensor (N, C, H, W) or of a dataset."""
    return images[idx] if isinstance(images, Tensor) else stack_images(images, idx)


@torch.no_grad()
def pooled_features(model: nn.Module, schedule, images, t: int, noise_seed: int = 0,
                    batch_size: int = 256, progress: bool = True,
                    blocks: Sequence[int] = ()) -> Tensor:
    """One feature vector per image: the decoder blocks' activations at step ``t``, each averaged
    over the image, concatenated (N, D), D the sum of the blocks' widths. ``blocks``: which
    decoder blocks, in the decoder's order (0 the deepest, at the lowest resolution); empty:
    all of them.

    ``images``: (N, C, H, W) in [-1, 1], or a dataset (items or ``batch`` with ``image``). All
    images are noised with one noise tensor drawn from ``noise_seed``, so that an image's features
    do not depend on a draw of its own.
    """
    n = len(images)
    if n == 0:
        raise ValueError("pooled_features got no images")
    check_int(t, "t", 0, schedule.num_timesteps - 1)
    device = model_device(model)
    model.eval()
    out, noise = [], None
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc=f"features t={t}"):
        idx = list(range(start, min(n, start + batch_size)))
        x0 = _images_at(images, idx)
        if noise is None:
            noise = randn((1, *x0.shape[1:]), make_generator(noise_seed))
        x0 = x0.to(device)
        tt = torch.full((len(idx),), t, dtype=torch.int64, device=device)
        xt = schedule.add_noise(x0, noise.to(device).expand_as(x0), tt)
        _, feats = model(xt, tt, return_features=True)
        out.append(torch.cat([f.float().mean((2, 3)) for f in _pick(feats, blocks)], 1).cpu())
    return torch.cat(out)


def _pick(feats: list[Tensor], blocks: Sequence[int]) -> list[Tensor]:
    """The decoder blocks ``blocks`` of a model's feature list (all of them if empty)."""
    if not blocks:
        return feats
    bad = [b for b in blocks if not 0 <= b < len(feats)]
    if bad:
        raise ValueError(f"blocks {bad} do not exist: this decoder has {len(feats)} blocks, "
                         f"0..{len(feats) - 1}")
    return [feats[b] for b in blocks]


def augment_views(images: Tensor, generator: torch.Generator) -> Tensor:
    """One view of each image (N, C, H, W) with the same content: its colour channels in a
    random order, mirrored left to right with probability 1/2, then turned by a random multiple
    of 90 degrees, all drawn from ``generator``. On the built-in worlds, whose shapes come in any
    colour and at any angle, every view is an image the world could have drawn, of the same
    class."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"augment_views needs square images (N, C, H, W), got "
                         f"{tuple(getattr(images, 'shape', ()))}")
    n, c = images.shape[:2]
    order = torch.stack([torch.randperm(c, generator=generator) for _ in range(n)])
    out = images.gather(1, order[:, :, None, None].expand_as(images).to(images.device))
    mirror = torch.rand(n, generator=generator) < 0.5
    out = torch.where(mirror[:, None, None, None].to(images.device), out.flip(-1), out)
    turns = torch.randint(0, 4, (n,), generator=generator)
    for q in range(1, 4):
        chosen = (turns == q).to(images.device)
        out[chosen] = torch.rot90(out[chosen], q, (2, 3))
    return out


def _normalise(features: Tensor) -> np.ndarray:
    if features.ndim != 2 or not torch.isfinite(features).all():
        raise ValueError(f"features must be a finite (N, D) tensor, got shape "
                         f"{tuple(features.shape)}")
    return F.normalize(features.double(), dim=1).numpy()


@dataclass
class SelfLabels:
    """k-means on L2-normalised features: ``centroids`` (k, D) and each image's ``ids`` (N,)."""

    centroids: Tensor
    ids: Tensor

    @property
    def k(self) -> int:
        return len(self.centroids)

    def assign(self, features: Tensor) -> Tensor:
        """The nearest centroid's id of each new feature vector (N, D), after normalisation."""
        x = torch.from_numpy(_normalise(features)).float()
        return torch.cdist(x, self.centroids.float()).argmin(1)

    def agreement(self, features: Tensor) -> float:
        """The share of images that other features of theirs (N, D), in the order of ``ids``,
        assign to their own cluster: the features of other views of the images
        (:func:`augment_views`) or of another noise. 1 when nothing moves."""
        if len(features) != len(self.ids):
            raise ValueError(f"agreement needs features of the {len(self.ids)} clustered images, "
                             f"got {len(features)}")
        return float((self.assign(features) == self.ids).double().mean())


def self_annotate(features: Tensor, k: int, seed: int = 0, n_init: int = 3) -> SelfLabels:
    """Cluster the images' ``features`` (N, D) into ``k`` groups: L2 normalisation, then k-means
    (scikit-learn, ``n_init`` starts from ``seed``). Returns :class:`SelfLabels`."""
    from sklearn.cluster import KMeans

    check_int(k, "k", 1)
    x = _normalise(features)
    if len(x) < k:
        raise ValueError(f"k-means with k = {k} needs at least {k} images, got {len(x)}")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
    return SelfLabels(torch.from_numpy(km.cluster_centers_).float(),
                      torch.from_numpy(km.labels_).long())


def split_by_class(features: Tensor, classes: Tensor, k: int, seed: int = 0,
                   n_init: int = 3) -> SelfLabels:
    """Self-labels made pure with the true ``classes`` (N,): the images of each class clustered
    apart (:func:`self_annotate`), ``k`` clusters shared among the C classes as evenly as they
    go (the first ``k % C`` classes get one more), numbered class by class. Not a label-free
    recipe: a diagnostic of what self-guidance does with clusters as fine as k-means makes them
    but never mixing classes."""
    check_int(k, "k", 1)
    classes = torch.as_tensor(classes).long()
    if classes.shape != (len(features),):
        raise ValueError(f"one class per feature vector: got classes of shape "
                         f"{tuple(classes.shape)} for {len(features)} vectors")
    present = torch.unique(classes)
    if k < len(present):
        raise ValueError(f"split_by_class needs at least one cluster per class: k = {k} for "
                         f"{len(present)} classes")
    ids, centroids, start = torch.empty_like(classes), [], 0
    for i, c in enumerate(present.tolist()):
        members = classes == c
        part = self_annotate(features[members], k // len(present) + (i < k % len(present)),
                             seed=seed, n_init=n_init)
        ids[members] = part.ids + start
        centroids.append(part.centroids)
        start += part.k
    return SelfLabels(torch.cat(centroids), ids)


def silhouette(features: Tensor, ids: Tensor, sample_size: int = 2000, seed: int = 0) -> float:
    """The silhouette of clusters ``ids`` (N,) of ``features`` (N, D), L2-normalised as
    :func:`self_annotate` clusters them: for each image, how much nearer it is to its own
    cluster than to the next one, from -1 to 1, averaged over ``sample_size`` images drawn from
    ``seed`` (all of them if fewer). A label-free score of how tight and separate clusters are."""
    from sklearn.metrics import silhouette_score

    ids = torch.as_tensor(ids).long()
    if ids.shape != (len(features),):
        raise ValueError(f"one cluster id per feature vector: got ids of shape "
                         f"{tuple(ids.shape)} for {len(features)} vectors")
    if len(torch.unique(ids)) < 2:
        raise ValueError("a silhouette needs at least two clusters")
    return float(silhouette_score(_normalise(features), ids.numpy(),
                                  sample_size=min(sample_size, len(ids)), random_state=seed))


def cluster_scores(ids: Tensor, labels: Tensor) -> dict[str, float]:
    """How well cluster ``ids`` (N,) follow true ``labels`` (N,): normalised mutual information
    (NMI, arithmetic mean normalisation), adjusted Rand index (ARI) and purity (the share of
    images whose cluster's majority label is their own)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    ids, labels = torch.as_tensor(ids).long(), torch.as_tensor(labels).long()
    if ids.shape != labels.shape or ids.ndim != 1 or not len(ids):
        raise ValueError(f"ids and labels must be two (N,) tensors of one length, got "
                         f"{tuple(ids.shape)} and {tuple(labels.shape)}")
    majority = majority_class(ids, labels)
    return {
        "nmi": float(normalized_mutual_info_score(labels.numpy(), ids.numpy())),
        "ari": float(adjusted_rand_score(labels.numpy(), ids.numpy())),
        "purity": float((majority[ids] == labels).float().mean()),
    }


def _cluster_counts(ids: Tensor, labels: Tensor, k: int | None) -> Tensor:
    """How many images of each true label (columns) each cluster 0..k-1 (rows) holds."""
    ids, labels = torch.as_tensor(ids).long(), torch.as_tensor(labels).long()
    k = int(ids.max()) + 1 if k is None else k
    counts = torch.zeros(k, int(labels.max()) + 1, dtype=torch.long)
    counts.index_put_((ids, labels), torch.ones_like(ids), accumulate=True)
    return counts


def majority_class(ids: Tensor, labels: Tensor, k: int | None = None) -> Tensor:
    """The most frequent true label in each of the clusters 0..k-1 (-1 for an empty cluster)."""
    counts = _cluster_counts(ids, labels, k)
    return torch.where(counts.sum(1) > 0, counts.argmax(1), torch.full((len(counts),), -1))


def cluster_purity(ids: Tensor, labels: Tensor, k: int | None = None) -> Tensor:
    """The share of each cluster 0..k-1 that holds its most frequent true label (0 if empty)."""
    counts = _cluster_counts(ids, labels, k)
    return counts.max(1).values.double() / counts.sum(1).clamp_min(1)


def image_classes(dataset, batch_size: int = 500, progress: bool = True) -> Tensor:
    """The class of each image of a built-in world with shape classes (N,), in [0, C): the class
    of the object that covers most of its pixels (simple-shapes has one)."""
    if not hasattr(dataset, "num_classes"):
        raise TypeError(f"image_classes needs a built-in world with shape classes, got "
                        f"{type(dataset).__name__}")
    c = dataset.num_classes
    out = []
    for start in tqdm(range(0, len(dataset), batch_size), disable=not progress, desc="classes"):
        sem = dataset.batch(list(range(start, min(len(dataset), start + batch_size))))["semantic"]
        area = F.one_hot(sem.flatten(1), c).sum(1)[:, 1:]  # pixels of each class, background out
        out.append(area.argmax(1))
    return torch.cat(out)


def training_labels(data, root=None, download: bool = False,
                    progress: bool = True) -> Tensor | None:
    """The image-level class of each training image of a run's data (a
    :class:`~fdiff.runs.DataSpec`), in the order the run trains on them: a built-in world's
    :func:`image_classes` (None for a world without shape classes), a real dataset's own labels
    (Pets: the breed, Flowers-102: the species) over its training splits. For judging
    self-labels only: the method never sees them."""
    if data.name not in TRAINING_SPLITS:
        images = data.training_images(root, download, progress=False)
        return image_classes(images, progress=progress) if hasattr(images, "num_classes") \
            else None
    parts = [load_dataset(data.name, root, s, data.image_size, download).labels
             for s in TRAINING_SPLITS[data.name]]
    return None if any(p is None for p in parts) else torch.cat(parts)


def class_subset(classes: Tensor, shares: Sequence[float], seed: int = 0) -> Tensor:
    """Indices of the images kept when each class c keeps the share ``shares[c]`` of its images
    (a long-tailed subset), chosen by uniform draws from ``seed``."""
    classes = torch.as_tensor(classes).long()
    shares_t = torch.tensor([float(s) for s in shares])
    if classes.numel() and int(classes.max()) >= len(shares_t):
        raise ValueError(f"shares names {len(shares_t)} classes, but the labels reach "
                         f"{int(classes.max())}")
    u = torch.rand(len(classes), generator=make_generator(seed, 7))
    return (u < shares_t[classes]).nonzero().flatten()


@torch.no_grad()
def segment_layouts(segmenter: nn.Module, schedule, images, t: int, batch_size: int = 128,
                    seed: int = 0, progress: bool = True) -> Tensor:
    """Foreground-background layouts (N, 2, H, W) uint8 in {0, 255} of ``images`` (a tensor or a
    dataset), made by one of the book's unsupervised segmenters: a factorized denoiser
    (chapters 2-3: its partition at step ``t``, the figure read by
    :func:`fdiff.metrics.border_foreground`) or a plain U-Net (chapter 5's AttentionCut, with its
    own step). Channel 0 is the figure, channel 1 the ground."""
    from .attention_cut import attention_cut
    from .factorized import FactorizedDenoiser
    from .metrics import border_foreground
    from .segmentation import segment

    n = len(images)
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="layouts"):
        idx = list(range(start, min(n, start + batch_size)))
        x0 = _images_at(images, idx)
        noise = torch.cat([randn((1, *x0.shape[1:]), make_generator(seed, i)) for i in idx])
        if isinstance(segmenter, FactorizedDenoiser):
            masks = segment(segmenter, schedule, x0, t, noise=noise)
            fg = border_foreground(masks.argmax(1).cpu()).bool()
        else:
            fg, _ = attention_cut(segmenter, schedule, x0, noise=noise)
            fg = fg.cpu().bool()
        out.append(torch.stack([fg, ~fg], 1).to(torch.uint8) * 255)
    return torch.cat(out)


class Selected(Dataset):
    """The images of ``dataset`` at ``indices`` (a subset such as :func:`class_subset`'s), with
    the dataset's fast ``batch`` kept."""

    def __init__(self, dataset, indices: Tensor):
        self.dataset, self.indices = dataset, torch.as_tensor(indices).long()
        if len(self.indices) == 0:
            raise ValueError("Selected needs at least one index, got none")
        if int(self.indices.min()) < 0 or int(self.indices.max()) >= len(dataset):
            raise IndexError(f"indices must be in [0, {len(dataset)}), got "
                             f"{int(self.indices.min())}..{int(self.indices.max())}")
        self.num_classes = getattr(dataset, "num_classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        chosen = self.indices[torch.as_tensor(list(indices), dtype=torch.long)].tolist()
        if hasattr(self.dataset, "batch"):
            return self.dataset.batch(chosen)
        return {"image": stack_images(self.dataset, chosen)}

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.batch([index]).items()}


class Conditioned(Dataset):
    """Images of ``dataset`` (at ``indices``, default all) with one condition each: items and
    batches are ``{"image", "cond"}``. ``cond``: class ids (N,) int64, or layouts (N, K, H, W)
    stored as uint8 (0..255) and served as float in [0, 1]."""

    def __init__(self, dataset, cond: Tensor, indices: Tensor | None = None):
        self.dataset = dataset
        self.indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices)
        if len(cond) != len(self.indices):
            raise ValueError(f"one condition per image: got {len(cond)} conditions for "
                             f"{len(self.indices)} images")
        if cond.dtype not in (torch.int64, torch.uint8):
            raise TypeError(f"cond must be int64 class ids or uint8 layouts, got {cond.dtype}")
        self.cond = cond

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        images = stack_images(self.dataset, self.indices[idx].tolist())
        cond = self.cond[idx]
        if cond.dtype == torch.uint8:
            cond = cond.float() / 255
        return {"image": images, "cond": cond}

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.batch([index]).items()}
