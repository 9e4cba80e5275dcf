"""Figures, scrubbable animations and widgets.

Two ways to let a reader scrub through a sequence of frames (a diffusion trajectory, a partition
evolving over training): :func:`animate_frames` returns a JavaScript animation that works in the
static HTML of the book, with no kernel; :func:`frame_slider` returns an ipywidgets slider for a
live kernel. Chapters show both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation
from torch import Tensor

__all__ = [
    "outline",
    "to_numpy_image",
    "show_images",
    "animate_frames",
    "self_contained_player",
    "frame_slider",
    "loss_curve",
    "study_curves",
    "show_segmentations",
    "partition_frame",
    "partition_explorer",
    "pca_rgb",
    "glue",
    "show_source",
]


def to_numpy_image(x: Tensor) -> np.ndarray:
    """Convert an image (C, H, W) in [-1, 1] to a float array (H, W, C) in [0, 1] for imshow."""
    if x.ndim != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got {tuple(x.shape)}")
    img = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def _as_list(images: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        return list(images)
    return list(images)


def show_images(
    images: Tensor | Sequence[Tensor],
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    size: float = 1.2,
    suptitle: str | None = None,
) -> plt.Figure:
    """Draw images (N, C, H, W) in [-1, 1] on a grid; return the figure."""
    imgs = _as_list(images)
    ncols = max(1, min(ncols, len(imgs)))
    nrows = (len(imgs) + ncols - 1) // ncols
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * bool(titles)), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(imgs):
            ax.imshow(to_numpy_image(imgs[i]), cmap="gray", interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def _frame_grid(frame: Tensor | Sequence[Tensor], nrows: int = 1) -> np.ndarray:
    """Lay a frame (N, C, H, W) out as ``nrows`` rows of images with 1-pixel white gutters."""
    imgs = [to_numpy_image(x) for x in _as_list(frame)]
    imgs = [np.repeat(i[..., None], 3, -1) if i.ndim == 2 else i for i in imgs]
    if len(imgs) % nrows:
        raise ValueError(f"cannot lay {len(imgs)} images out in {nrows} equal rows")
    ncols = len(imgs) // nrows
    h, w = imgs[0].shape[:2]
    grid = np.ones((nrows * (h + 1) - 1, ncols * (w + 1) - 1, 3))
    for k, img in enumerate(imgs):
        r, c = divmod(k, ncols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img
    return grid


def _frame_grids(
    frames: Sequence[Tensor], labels: Sequence[str] | None, nrows: int
) -> tuple[list[np.ndarray], list[str]]:
    """Check frames and labels; return one laid-out image per frame and one title per frame."""
    if len(frames) == 0:
        raise ValueError("expected at least one frame")
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"got {len(labels)} labels for {len(frames)} frames")
    titles = list(labels) if labels is not None else [f"frame {i}" for i in range(len(frames))]
    return [_frame_grid(f, nrows) for f in frames], titles


def _show_grid(grid: np.ndarray, title: str, size: float, nrows: int):
    """Draw one laid-out frame on a new figure; return (figure, image artist, title artist)."""
    h, w = grid.shape[:2]
    height = size * nrows  # `size` inches per row of images; the width keeps the grid's aspect
    fig, ax = plt.subplots(figsize=(height * w / h, height + 0.3))
    ax.set_position((0, 0, 1, height / (height + 0.3)))  # the title goes in the top 0.3 inch
    ax.axis("off")
    im = ax.imshow(grid, interpolation="nearest")
    return fig, im, ax.set_title(title, fontsize=9)


def animate_frames(
    frames: Sequence[Tensor],
    labels: Sequence[str] | None = None,
    size: float = 1.6,
    interval: int = 150,
    nrows: int = 1,
) -> str:
    """Return a JavaScript animation (HTML with play and scrub controls) of image frames.

    frames: a sequence of (N, C, H, W) tensors in [-1, 1], one per time point; each frame is shown
    as ``nrows`` rows of images. labels: one title per frame. Display the result with
    ``IPython.display.HTML``; it needs no kernel, so it keeps working in the static book.
    """
    grids, titles = _frame_grids(frames, labels, nrows)
    fig, im, title = _show_grid(grids[0], titles[0], size, nrows)

    def update(i):
        im.set_data(grids[i])
        title.set_text(titles[i])
        return im, title

    anim = animation.FuncAnimation(fig, update, frames=len(grids), interval=interval, blit=False)
    html = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    return self_contained_player(html)


# matplotlib's player draws its buttons with an icon font it loads from a CDN; these characters
# need nothing, so the animation works offline (the buttons keep their titles).
_PLAYER_ICONS = {
    "fa fa-minus": "\u2212", "fa fa-plus": "+",
    "fa fa-fast-backward": "\u23ee", "fa fa-fast-forward": "\u23ed",
    "fa fa-step-backward": "\u25c1", "fa fa-step-forward": "\u25b7",
    "fa fa-play fa-flip-horizontal": "\u25c0", "fa fa-play": "\u25b6",
    "fa fa-pause": "\u275a\u275a",
}


def self_contained_player(html: str) -> str:
    """Return matplotlib's HTML animation player without its one external file (an icon font's
    stylesheet): each icon becomes a plain character."""
    html = re.sub(r"<link[^>]*font-awesome[^>]*>", "", html)
    for icon, char in _PLAYER_ICONS.items():
        html = html.replace(f'<i class="{icon}"></i>', char)
    if "fa fa-" in html or "://" in re.sub(r"data:[^\"']*", "", html):
        raise RuntimeError("matplotlib's animation player changed: it holds an icon or an "
                           "external link this function does not replace")
    return html


def frame_slider(
    frames: Sequence[Tensor],
    labels: Sequence[str] | None = None,
    size: float = 1.6,
    nrows: int = 1,
):
    """Return an ipywidgets view with a slider over ``frames`` (for a live kernel).

    Same arguments as :func:`animate_frames`. In the static book the slider is a frozen snapshot;
    use the animation there.
    """
    import ipywidgets as widgets

    grids, titles = _frame_grids(frames, labels, nrows)
    out = widgets.Output()
    slider = widgets.IntSlider(
        value=0, min=0, max=len(grids) - 1, description="frame", continuous_update=True
    )

    def draw(change=None):
        with out:
            out.clear_output(wait=True)
            _show_grid(grids[slider.value], titles[slider.value], size, nrows)
            plt.show()

    slider.observe(draw, names="value")
    draw()
    return widgets.VBox([slider, out])


def outline(images: Tensor, masks: Tensor, colour: Sequence[float] = (1.0, -1.0, -1.0)) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] with the boundary of each binary mask (N, H, W) painted in
    ``colour`` (RGB in [-1, 1], default red): a mask's pixels with a neighbour outside it."""
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"expected images (N, 3, H, W) and masks (N, H, W) of the same size, got "
                         f"{tuple(images.shape)} and {tuple(masks.shape)}")
    m = masks.bool().float().cpu()[:, None]
    inner = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)  # erosion
    edge = (m - inner).bool().expand(-1, 3, -1, -1)
    paint = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1).expand_as(edge)
    return torch.where(edge, paint, images.float().cpu())


def partition_frame(images: Tensor, masks: Tensor, alpha: float = 0.55) -> Tensor:
    """Lay out images with their soft masks and argmax partition, for the frame viewers.

    images (N, C, H, W) in [-1, 1]; masks (N, K, H, W) in [0, 1] (or uint8 0..255), summing to 1
    over K. Returns (N * (K + 2), 3, H, W) in [-1, 1], row-major for ``nrows=K + 2``: the images,
    mask 1 .. mask K in grey (white = 1), then each image tinted by the colour of its argmax
    region (``tab10`` order, as in :func:`show_segmentations`).
    """
    if images.ndim != 4 or masks.ndim != 4 or images.shape[0] != masks.shape[0]:
        raise ValueError(
            f"expected images (N, C, H, W) and masks (N, K, H, W) with the same N, got "
            f"{tuple(images.shape)} and {tuple(masks.shape)}"
        )
    if images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"images are {tuple(images.shape[-2:])} but masks {tuple(masks.shape[-2:])}"
        )
    masks = masks.cpu()
    m = masks.float() / 255 if masks.dtype == torch.uint8 else masks.float()
    img = images.float().cpu()
    img = img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img
    k = m.shape[1]
    colours = torch.tensor(plt.get_cmap("tab10").colors[:k], dtype=torch.float32) * 2 - 1
    region = m.argmax(1)  # (N, H, W)
    tint = colours[region].permute(0, 3, 1, 2)  # (N, 3, H, W)
    overlay = (1 - alpha) * img + alpha * tint
    grey = [(m[:, j : j + 1] * 2 - 1).expand(-1, 3, -1, -1) for j in range(k)]
    return torch.cat([img, *grey, overlay])


def partition_explorer(
    images: Tensor,
    masks: Tensor,
    steps: Sequence[int],
    timesteps: Sequence[int],
    size: float = 1.4,
):
    """Return an ipywidgets view with two sliders: training step and diffusion timestep.

    images (N, C, H, W) in [-1, 1]; masks (S, N, n_t, K, H, W), the snapshot of training step
    ``steps[s]`` at timestep ``timesteps[i]`` (as saved with a factorized checkpoint). Each view
    is a :func:`partition_frame`. In the static book it is a frozen snapshot; the animations
    made with :func:`animate_frames` scrub there.
    """
    import ipywidgets as widgets

    if masks.ndim != 6 or masks.shape[0] != len(steps) or masks.shape[2] != len(timesteps):
        raise ValueError(
            f"masks must be (S={len(steps)}, N, n_t={len(timesteps)}, K, H, W), "
            f"got {tuple(masks.shape)}"
        )
    k = masks.shape[3]
    out = widgets.Output()
    step = widgets.SelectionSlider(options=list(steps), value=steps[-1], description="step")
    t = widgets.SelectionSlider(options=list(timesteps), value=timesteps[0], description="t")

    def draw(change=None):
        s, i = list(steps).index(step.value), list(timesteps).index(t.value)
        grid = _frame_grid(partition_frame(images, masks[s, :, i]), nrows=k + 2)
        with out:
            out.clear_output(wait=True)
            _show_grid(grid, f"training step {step.value}, t = {t.value}", size, k + 2)
            plt.show()

    step.observe(draw, names="value")
    t.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([step, t]), out])


def pca_rgb(features: Tensor) -> Tensor:
    """Project feature maps (B, D, H, W) on their first three principal components, as images.

    One PCA is fitted over all pixels of the batch, so colours are comparable across images.
    Each component is scaled to [-1, 1] by its 1st and 99th percentiles. Returns (B, 3, H, W).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, D, H, W), got {tuple(features.shape)}")
    b, d, h, w = features.shape
    x = features.float().permute(0, 2, 3, 1).reshape(-1, d)
    x = x - x.mean(0)
    q = min(3, d)
    # Exact PCA from the D x D covariance (no random projections, so the colours are the same
    # on every run); each axis's sign is fixed by making its largest entry positive.
    _, vecs = torch.linalg.eigh(x.T.double() @ x.double())
    v = vecs.flip(1)[:, :q]
    v = v * v.gather(0, v.abs().argmax(0, keepdim=True)).sign()
    proj = x @ v.float()
    if q < 3:
        proj = torch.cat([proj, proj.new_zeros(len(proj), 3 - q)], dim=1)
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    proj = ((proj - lo) / (hi - lo).clamp(min=1e-8)).clamp(0, 1) * 2 - 1
    return proj.view(b, h, w, 3).permute(0, 3, 1, 2)


def loss_curve(losses: Sequence[float], window: int = 50, ax: plt.Axes | None = None) -> plt.Axes:
    """Plot a training loss and its running mean over ``window`` steps; return the axes."""
    ax = ax or plt.subplots(figsize=(5, 3))[1]
    x = np.asarray(losses, dtype=float)
    ax.plot(x, alpha=0.3, label="loss")
    if len(x) >= window:
        smooth = np.convolve(x, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(x)), smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.legend()
    return ax


def study_curves(
    curves: dict[str, dict[str, Sequence[float]]],
    panels: dict[str, str],
    x: str = "steps",
    size: float = 3.4,
) -> plt.Figure:
    """Plot several measures of several runs against training steps, one panel per measure.

    ``curves[run][x]`` are the steps and ``curves[run][key]`` the values of measure ``key``;
    ``panels`` maps each key to its axis label. Runs whose name holds "->" (a transfer) are
    dashed.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size * 0.8),
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], panels.items()):
        for name, curve in curves.items():
            ax.plot(curve[x], curve[key], marker="o", ms=3, label=name,
                    linestyle="--" if "->" in name else "-")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def show_segmentations(
    images: Tensor,
    labels: Tensor | Sequence[Tensor],
    ncols: int = 8,
    row_titles: Sequence[str] | None = None,
    size: float = 1.2,
) -> plt.Figure:
    """Draw images (N, C, H, W) in [-1, 1] above one or more rows of label maps (N, H, W).

    Label maps are integer images (a class, an instance or a region per pixel) shown with a
    qualitative colour map; values below 0 (ignored pixels) are drawn grey.
    """
    label_rows = [labels] if isinstance(labels, Tensor) else list(labels)
    n = min(len(images), ncols)
    rows = 1 + len(label_rows)
    fig, axes = plt.subplots(rows, n, figsize=(size * n, size * rows), squeeze=False)
    vmax = max(int(lab.max()) for lab in label_rows)
    for j in range(n):
        axes[0, j].imshow(to_numpy_image(images[j]), interpolation="nearest")
        for r, lab in enumerate(label_rows, start=1):
            shown = np.ma.masked_less(lab[j].detach().cpu().numpy(), 0)
            axes[r, j].imshow(
                shown, cmap="tab10", vmin=0, vmax=max(vmax, 9), interpolation="nearest"
            )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, title in enumerate(row_titles or []):
        axes[r, 0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    return fig


def glue(name: str, value, display: bool = False) -> None:
    """Record a computed value for the book's prose (``{glue:text}`name```).

    The value is also printed, with the others of the same cell, in one line at the end of the
    cell ("in the text: name = value, ..."), so that a reader of the notebook outside the book
    (Jupyter, Colab), where the prose shows the markup rather than the number, sees it. Returns
    nothing, so that a cell ending with ``glue(...)`` shows no stray output. Outside a Jupyter
    Book build (no myst-nb installed, e.g. on Colab) only the printed line remains.
    """
    _print_at_cell_end(name, value)
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, value, display=display)


_pending: list[str] = []
_hooked: list[object] = []  # the IPython shell whose post_run_cell prints the pending values


def _flush_pending(result=None) -> None:
    import textwrap

    if _pending:
        line = "in the text: " + ", ".join(_pending)
        _pending.clear()
        print(textwrap.fill(line, width=100, subsequent_indent="  "))


def _print_at_cell_end(name: str, value) -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:  # a script or a test: nothing to print into
        return
    if shell not in _hooked:
        shell.events.register("post_run_cell", _flush_pending)
        _hooked.append(shell)
    _pending.append(f"{name} = {value}")


class SourceCode:
    """Python source that notebooks display highlighted (inline styles, so nothing leaks into
    the page's other code) and that reads as plain text anywhere else."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __repr__(self) -> str:
        return self.source

    def _repr_html_(self) -> str:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        return highlight(self.source, PythonLexer(), HtmlFormatter(noclasses=True))


def show_source(obj) -> SourceCode:
    """Return the source of a function, class or method of fdiff (or of anything Python can
    find the source of), for a notebook to display highlighted: the code a chapter discusses,
    read from the package itself, so that the text and the code cannot drift apart."""
    import inspect
    import textwrap

    try:
        source = inspect.getsource(obj)
    except (TypeError, OSError) as err:
        raise TypeError(f"cannot show the source of {obj!r}: {err}") from None
    return SourceCode(textwrap.dedent(source))
