"""Segmentation metrics for unsupervised masks, whose region ids carry no meaning.

Foreground/background: the predicted region that best matches the true foreground is taken as
foreground (``foreground_scores``). Multi-region: predicted regions are matched to classes by the
Hungarian algorithm on IoU (``hungarian_miou``). Object-centric: adjusted Rand index over the
foreground pixels (``fg_ari``). Collapse of a factorized model: ``mask_stats`` (entropy and area
balance of soft masks). Where masks decide: ``decidedness`` per pixel, ``near_edges`` to split
pixels into those next to an outline and those inside flat regions.

Inputs are integer label maps: ``pred`` (B, H, W) with values in [0, K), ``target`` (B, H, W)
with values in [0, C) and -1 for pixels to ignore.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .checks import check_finite

__all__ = [
    "edge_strength",
    "pixel_correlation",
    "confusion",
    "foreground_scores",
    "merge_regions",
    "hungarian_miou",
    "adjusted_rand_index",
    "fg_ari",
    "mask_stats",
    "near_edges",
    "image_frame",
    "border_foreground",
    "decidedness",
    "frechet_distance",
    "miou",
    "saliency_scores",
    "largest_component_box",
    "box_iou",
    "corloc",
]


def _check_labels(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must be label maps of the same shape (B, H, W), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError("pred and target must be integer label maps (use masks.argmax(1))")
    if pred.numel() and int(pred.min()) < 0:
        raise ValueError(f"pred must have labels >= 0, got a minimum of {int(pred.min())}")


def confusion(pred: Tensor, target: Tensor, num_pred: int, num_target: int) -> Tensor:
    """Count pixels per (predicted region, target class), ignoring target -1; (K, C) int64.

    pred must lie in [0, num_pred) and target in [-1, num_target); anything else is refused,
    since it would be counted in another cell.
    """
    valid = target >= 0
    for name, x, n, low in (("pred", pred, num_pred, 0), ("target", target, num_target, -1)):
        if x.numel() and not (low <= int(x.min()) and int(x.max()) < n):
            raise ValueError(
                f"{name} labels must lie in [{low}, {n}), got values from {int(x.min())} to "
                f"{int(x.max())}: is the number of classes or regions right?"
            )
    idx = pred[valid].long() * num_target + target[valid].long()
    return torch.bincount(idx, minlength=num_pred * num_target).view(num_pred, num_target)


def foreground_scores(pred: Tensor, fg: Tensor, per_image: bool = False,
                      region: int | None = None) -> dict[str, float]:
    """Score a K-region prediction against a binary foreground mask.

    The foreground is the predicted region with the highest IoU against the true foreground,
    chosen once over the whole set (``per_image=False``: a fixed model's region) or for every
    image (``per_image=True``: an upper bound, averaged over images). pred (B, H, W) in [0, K);
    fg (B, H, W) in {0, 1}, -1 ignored. Returns pixel accuracy, IoU and DICE of the foreground,
    and (over the whole set) the region chosen. Images without a foreground pixel have no
    foreground to find: ``per_image`` leaves them out, and a set without any is an error.
    ``region`` scores that region as the foreground instead of choosing one (e.g. the region
    chosen on labelled validation images, so that the scored images' labels choose nothing).
    """
    _check_labels(pred, fg)
    has_fg = (fg == 1).flatten(1).any(1)
    if not bool(has_fg.any()):
        raise ValueError("fg has no foreground pixel (value 1): there is nothing to score")
    k = int(pred.max()) + 1 if pred.numel() else 1
    if region is not None:
        if per_image or isinstance(region, bool) or not isinstance(region, int) or region < 0:
            raise ValueError(f"region must be an int >= 0 and per_image False, got region="
                             f"{region!r}, per_image={per_image!r}")
        k = max(k, region + 1)
    if per_image:
        rows = [foreground_scores(p[None], f[None]) for p, f, h in zip(pred, fg, has_fg) if h]
        return {key: float(np.mean([r[key] for r in rows])) for key in ("accuracy", "iou", "dice")}
    conf = confusion(pred, fg.clamp(max=1), k, 2).double()  # (K, 2): [region, bg/fg]
    tp = conf[:, 1]
    fp = conf[:, 0]
    fn = conf[:, 1].sum() - tp
    iou = tp / (tp + fp + fn).clamp(min=1)
    best = int(iou.argmax()) if region is None else region
    total = conf.sum().clamp(min=1)
    acc = (tp[best] + (conf[:, 0].sum() - fp[best])) / total
    dice = 2 * tp[best] / (2 * tp[best] + fp[best] + fn[best]).clamp(min=1)
    return {"accuracy": float(acc), "iou": float(iou[best]), "dice": float(dice), "region": best}


def merge_regions(pred: Tensor, fg: Tensor) -> Tensor:
    """Merge K predicted regions into foreground/background with the truth's help, per image.

    A region becomes foreground when most of its (non-ignored) pixels are true foreground. This
    is an oracle, and of all the ways to read the partition as foreground and background it is
    the one with the highest pixel accuracy: the accuracy of the result is an upper bound for
    the partition, comparable across K. Returns (B, H, W) int64 in {0, 1}.
    """
    _check_labels(pred, fg)
    k = int(pred.max()) + 1 if pred.numel() else 1
    out = torch.zeros_like(pred, dtype=torch.int64)
    for i, (p, f) in enumerate(zip(pred, fg)):
        conf = confusion(p[None], f[None].clamp(max=1), k, 2)  # (K, 2): [region, bg/fg]
        is_fg = conf[:, 1] > conf[:, 0]
        out[i] = is_fg[p.long()].long()
    return out


def miou(pred: Tensor, target: Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Mean IoU of predicted against true classes (no matching: the ids are the classes).

    pred, target (B, H, W) in [0, C), target -1 ignored. Classes absent from both prediction
    and target are left out of the mean. Returns (mean IoU, per-class IoU with nan for absent).
    """
    _check_labels(pred, target)
    conf = confusion(pred, target, num_classes, num_classes).double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    per_class = [float(i / u) if u > 0 else float("nan") for i, u in zip(inter, union)]
    present = [v for v in per_class if not math.isnan(v)]
    return (float(np.mean(present)) if present else float("nan")), per_class


def hungarian_miou(pred: Tensor, target: Tensor, num_classes: int | None = None) -> float:
    """Mean IoU over target classes after a one-to-one Hungarian matching of regions to classes.

    Classes left unmatched (more classes than regions) score 0. pred (B, H, W) in [0, K);
    target (B, H, W) in [0, C), -1 ignored.
    """
    _check_labels(pred, target)
    k = int(pred.max()) + 1 if pred.numel() else 1
    c = num_classes or (int(target.max()) + 1)
    conf = confusion(pred, target, k, c).double()
    inter = conf
    union = conf.sum(1, keepdim=True) + conf.sum(0, keepdim=True) - conf
    iou = (inter / union.clamp(min=1)).cpu().numpy()
    rows, cols = linear_sum_assignment(-iou)
    present = conf.sum(0) > 0
    matched = np.zeros(c)
    matched[cols] = iou[rows, cols]
    return float(matched[present.cpu().numpy()].mean()) if present.any() else float("nan")


def adjusted_rand_index(a: Tensor, b: Tensor) -> float:
    """Return the adjusted Rand index of two flat labelings (Hubert & Arabie, 1985)."""
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two flat labelings of equal length, got {a.shape}, {b.shape}")
    n = a.numel()
    if n < 2:
        return 1.0
    _, ai = torch.unique(a, return_inverse=True)
    _, bi = torch.unique(b, return_inverse=True)
    table = confusion(ai[None], bi[None], int(ai.max()) + 1, int(bi.max()) + 1).double()

    def pairs(x: Tensor) -> float:
        return float((x * (x - 1) / 2).sum())

    index = pairs(table)
    rows, cols = pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2)
    maximum = (rows + cols) / 2
    if math.isclose(maximum, expected):
        return 1.0
    return (index - expected) / (maximum - expected)


def fg_ari(pred: Tensor, instances: Tensor) -> float:
    """Mean over images of the ARI between predicted regions and true instances, on foreground
    pixels only (instances > 0), as in object-centric learning. pred, instances: (B, H, W)."""
    _check_labels(pred, instances)
    scores = []
    for p, inst in zip(pred, instances):
        fg = inst > 0
        if int(fg.sum()) >= 2:
            scores.append(adjusted_rand_index(p[fg], inst[fg]))
    return float(np.mean(scores)) if scores else float("nan")


def _as_probabilities(masks: Tensor) -> Tensor:
    """Soft masks as float in [0, 1]: uint8 masks (as snapshots store them) are divided by 255."""
    if masks.dtype == torch.uint8:
        return masks.float() / 255
    if not masks.is_floating_point():
        raise TypeError(f"masks must be float in [0, 1] or uint8 in [0, 255], got {masks.dtype}")
    masks = masks.float()
    if masks.numel() and not (masks.min() >= -1e-4 and masks.max() <= 1 + 1e-4):
        raise ValueError(
            f"soft masks must lie in [0, 1], got values from {float(masks.min()):.3g} to "
            f"{float(masks.max()):.3g}: pass the softmax masks, not logits"
        )
    return masks


def mask_stats(masks: Tensor) -> dict[str, float]:
    """Measure how decided and how balanced soft masks (B, K, H, W) are (float in [0, 1], or
    uint8 in [0, 255] as :func:`fdiff.factorized.partition_snapshots` stores them).

    Returns the mean per-pixel entropy (0: hard masks; log K: uniform), its ratio to log K, the
    area fraction of each region (argmax), and ``largest_area``: the biggest region's mean share
    of an image. A collapsed model has one region near 1 (or entropy near log K: no decision).
    """
    if masks.ndim != 4 or masks.shape[1] < 2:
        raise ValueError(
            f"masks must have shape (B, K, H, W) with K >= 2 regions, got {tuple(masks.shape)}"
        )
    k = masks.shape[1]
    masks = _as_probabilities(masks)
    p = masks.clamp(min=1e-12)
    entropy = float(-(p * p.log()).sum(1).mean())
    hard = masks.argmax(1)
    areas = torch.stack([(hard == j).float().mean((1, 2)) for j in range(k)], 1)  # (B, K)
    return {
        "entropy": entropy,
        "entropy_ratio": entropy / math.log(k),
        "areas": [float(a) for a in areas.mean(0)],
        "largest_area": float(areas.max(1).values.mean()),
    }


def near_edges(labels: Tensor, border: bool = True) -> Tensor:
    """Return bool (B, H, W): the pixels within one pixel (8-neighbourhood) of a change of label
    in ``labels`` (B, H, W), and with ``border`` also the image's outermost rows and columns."""
    if labels.ndim != 3:
        raise ValueError(f"labels must have shape (B, H, W), got {tuple(labels.shape)}")
    x = labels[:, None].float()
    pool = torch.nn.functional.max_pool2d
    # A label differs from a neighbour's exactly where the 3x3 max and min disagree.
    edge = (pool(x, 3, 1, 1) != -pool(-x, 3, 1, 1))[:, 0]
    if border:
        edge |= image_frame(*labels.shape[-2:], device=labels.device)
    return edge


def image_frame(height: int, width: int | None = None, thickness: int = 1, device=None) -> Tensor:
    """Return bool (H, W): the image's outermost ``thickness`` rows and columns (``width``
    defaults to ``height``). With ``thickness=1`` these are the pixels whose 3x3 convolutions
    reach into the padding around the image."""
    width = height if width is None else width
    if thickness < 1 or 2 * thickness >= min(height, width):
        raise ValueError(
            f"thickness must be at least 1 and leave an inside, got {thickness} for a "
            f"{height}x{width} image"
        )
    frame = torch.ones(height, width, dtype=torch.bool, device=device)
    frame[thickness:-thickness, thickness:-thickness] = False
    return frame


def border_foreground(pred: Tensor) -> Tensor:
    """Read a K-region partition (B, H, W) as foreground and background without labels.

    In each image the foreground is the region that holds the smallest share of the image's
    frame (its outermost pixels), ties going to the smaller region: an object is framed by its
    background, so the background touches the border more. An image whose partition is a single
    region holds all of its frame in that region: it is all background, and its foreground is
    empty (the partition found no figure there). Returns (B, H, W) int64 in {0, 1}.
    """
    if pred.ndim != 3 or pred.is_floating_point():
        raise ValueError(f"pred must be an integer label map (B, H, W), got {tuple(pred.shape)}")
    k = int(pred.max()) + 1 if pred.numel() else 1
    frame = image_frame(*pred.shape[-2:], device=pred.device)
    regions = torch.arange(k, device=pred.device)
    on_frame = (pred[:, frame][:, :, None] == regions).float().mean(1)  # (B, K)
    area = (pred.flatten(1)[:, :, None] == regions).float().mean(1)  # (B, K)
    present = area > 0
    # Rank by frame share, then area; regions absent from an image cannot be its foreground.
    score = torch.where(present, on_frame * 2 + area, torch.full_like(area, float("inf")))
    chosen = score.argmin(1)
    figure = (pred == chosen[:, None, None]).long()
    figure[present.sum(1) < 2] = 0  # one region: no figure
    return figure


def edge_strength(images: Tensor) -> Tensor:
    """Return (B, H, W): how strongly each pixel of images (B, C, H, W) sits on an edge, the
    largest absolute difference to its right or lower neighbour over channels (0 at the last
    row and column's missing neighbours)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    x = images.float()
    dx = torch.zeros_like(x)
    dy = torch.zeros_like(x)
    dx[..., :, :-1] = (x[..., :, 1:] - x[..., :, :-1]).abs()
    dy[..., :-1, :] = (x[..., 1:, :] - x[..., :-1, :]).abs()
    return torch.maximum(dx, dy).amax(1)


def pixel_correlation(a: Tensor, b: Tensor) -> float:
    """Mean over images of the Pearson correlation between two maps (B, H, W) pixel by pixel;
    images where either map is constant count as 0."""
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"a and b must be maps of one shape (B, H, W), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    r = torch.where(norm > 0, (a * b).sum(1) / norm.clamp_min(1e-300), torch.zeros_like(norm))
    return float(r.mean())


def decidedness(masks: Tensor) -> Tensor:
    """Return (B, H, W) in [0, 1]: how far each pixel's soft masks (B, K, H, W) are from uniform,
    (K max_k m_k - 1) / (K - 1): 0 when every region has 1/K, 1 when one region has it all.
    The masks are float in [0, 1] or uint8 in [0, 255], as :func:`mask_stats` takes them."""
    if masks.ndim != 4 or masks.shape[1] < 2:
        shape = tuple(masks.shape)
        raise ValueError(f"masks must have shape (B, K, H, W) with K >= 2, got {shape}")
    k = masks.shape[1]
    return (k * _as_probabilities(masks).amax(1) - 1) / (k - 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Return the Fréchet distance between Gaussians fitted to two feature sets (N, D), (M, D).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Dowson & Landau, 1982), the formula of
    FID (Heusel et al., 2017). With a feature network other than Inception it is *not* FID, and
    its values are not comparable with published ones.
    """
    from scipy import linalg

    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected (N, D) and (M, D) features, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least two samples per set, got {len(a)} and {len(b)}")
    check_finite(a, "a")
    check_finite(b, "b")
    x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    # atleast_2d: for D = 1, np.cov returns a scalar
    cov_x, cov_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(cov_x @ cov_y)
    if not np.isfinite(covmean).all():  # singular product: regularise slightly
        eye = np.eye(len(cov_x)) * 1e-6
        covmean = linalg.sqrtm((cov_x + eye) @ (cov_y + eye))
    covmean = covmean.real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * covmean))


def _check_saliency(pred: Tensor, gt: Tensor) -> None:
    if pred.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(f"expected a prediction and a mask of one shape (B, H, W), got "
                         f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    if pred.is_floating_point():
        check_finite(pred, "pred")
        if float(pred.min()) < 0 or float(pred.max()) > 1:
            raise ValueError("a soft prediction must lie in [0, 1]")


def saliency_scores(pred: Tensor, gt: Tensor, beta2: float = 0.3,
                    thresholds: int = 255) -> dict[str, float]:
    """Salient-object metrics of a prediction (B, H, W) against binary masks (B, H, W).

    ``pred``: a binary mask (bool or {0, 1}) or a soft map in [0, 1]. Returns, averaged over
    images: pixel ``accuracy`` and ``iou`` of the mask (a soft map thresholded at 0.5), ``mae``
    (mean absolute difference of the map and the mask) and ``max_fbeta``: over ``thresholds``
    evenly spaced thresholds of the map (one for a binary mask), precision and recall averaged
    over images, ``F = (1 + beta2) P R / (beta2 P + R)``, the best threshold's F (beta2 = 0.3,
    weighing precision more, as the saliency benchmarks do).
    """
    _check_saliency(pred, gt)
    g = gt.bool().flatten(1)
    soft = pred.float().flatten(1)
    binary = soft >= 0.5
    inter = (binary & g).sum(1).float()
    union = (binary | g).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    accuracy = (binary == g).float().mean(1)
    mae = (soft - g.float()).abs().mean(1)
    levels = (torch.tensor([0.5]) if not pred.is_floating_point()
              else torch.linspace(0, 1, thresholds + 2)[1:-1])
    best = 0.0
    for level in levels.tolist():
        m = soft >= level
        tp = (m & g).sum(1).float()
        precision = (tp / m.sum(1).clamp(min=1)).mean()
        recall = (tp / g.sum(1).clamp(min=1)).mean()
        denom = beta2 * precision + recall
        f = float((1 + beta2) * precision * recall / denom) if denom > 0 else 0.0
        best = max(best, f)
    return {"accuracy": float(accuracy.mean()), "iou": float(iou.mean()),
            "max_fbeta": best, "mae": float(mae.mean())}


def largest_component_box(mask: Tensor) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1), inclusive, of a binary mask's (H, W) largest 4-connected
    component; None for an empty mask."""
    from scipy import ndimage

    labels, n = ndimage.label(mask.bool().cpu().numpy())
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    ys, xs = np.nonzero(labels == 1 + int(sizes.argmax()))
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two pixel boxes (x0, y0, x1, y1), corners inclusive."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(ix, 0) * max(iy, 0)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def corloc(masks: Tensor, instances: Tensor, threshold: float = 0.5) -> float:
    """CorLoc: the fraction of images whose predicted box (the box of the mask's largest
    component) overlaps the box of some true object with an IoU of at least ``threshold``.

    masks (B, H, W) binary; instances (B, H, W) with 0 for background and 1, 2, ... for the
    objects (the box of each object is that of all its pixels). An empty mask misses.
    """
    if masks.shape != instances.shape or masks.ndim != 3:
        raise ValueError(f"expected masks and instances of one shape (B, H, W), got "
                         f"{tuple(masks.shape)} and {tuple(instances.shape)}")
    hits = 0
    for mask, inst in zip(masks, instances):
        box = largest_component_box(mask)
        if box is None:
            continue
        objects = []
        for k in inst.unique().tolist():
            if k <= 0:
                continue
            ys, xs = torch.nonzero(inst == k, as_tuple=True)
            objects.append((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
        hits += any(box_iou(box, obj) >= threshold for obj in objects)
    return hits / len(masks)
