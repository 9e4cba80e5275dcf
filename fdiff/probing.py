"""Pixel classifiers on frozen features: the MLP ensemble of Baranchuk et al. (ICLR 2022).

Each pixel is a sample. :class:`PixelMLP` is the paper's classifier (Linear-ReLU-BatchNorm twice,
then a linear layer); :class:`ProbeEnsemble` trains several from different seeds with early
stopping on held-out pixels, predicts by majority vote and reports the ensemble's disagreement
as an uncertainty map.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_finite
from .seeding import init_module, make_generator

__all__ = ["PixelMLP", "ProbeConfig", "ProbeEnsemble", "vote", "predict_images"]


class PixelMLP(nn.Sequential):
    """Linear(d, h1)-ReLU-BN-Linear(h1, h2)-ReLU-BN-Linear(h2, C) on feature vectors (N, d)."""

    def __init__(self, in_dim: int, num_classes: int, hidden: tuple[int, int] = (128, 32)):
        h1, h2 = hidden
        super().__init__(
            nn.Linear(in_dim, h1),
            nn.ReLU(),
            nn.BatchNorm1d(h1),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.BatchNorm1d(h2),
            nn.Linear(h2, num_classes),
        )


@dataclass(frozen=True)
class ProbeConfig:
    """Training of each ensemble member: Adam, minibatches of pixels, early stopping."""

    ensemble_size: int = 10
    hidden: tuple[int, int] = (128, 32)
    lr: float = 1e-3
    batch_size: int = 1024
    max_epochs: int = 30
    patience: int = 3  # epochs without a better held-out loss before stopping
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.ensemble_size < 1 or self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError(
                "ensemble_size, max_epochs and batch_size must be >= 1, got "
                f"{self.ensemble_size}, {self.max_epochs}, {self.batch_size}"
            )
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def vote(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Majority vote of an ensemble's logits (M, N, C); return (labels (N,), uncertainty (N,)).

    Each member votes for its argmax; ties go to the smaller class index. Uncertainty is the
    fraction of members that disagree with the majority: 0 when all agree.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be (members, N, C), got {tuple(logits.shape)}")
    m, _, c = logits.shape
    votes = F.one_hot(logits.argmax(-1), c).sum(0)  # (N, C)
    labels = votes.argmax(-1)
    agree = votes.gather(1, labels[:, None])[:, 0].float()
    return labels, 1 - agree / m


class ProbeEnsemble:
    """An ensemble of :class:`PixelMLP` trained on (X (N, d), y (N,)) pixel samples."""

    def __init__(self, in_dim: int, num_classes: int, config: ProbeConfig | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.config = config or ProbeConfig()
        self.in_dim, self.num_classes = int(in_dim), int(num_classes)
        self.members: list[PixelMLP] = []
        self.epochs: list[int] = []
        self.mean = torch.zeros(in_dim)
        self.std = torch.ones(in_dim)

    def fit(self, X: Tensor, y: Tensor, progress: Callable | None = None) -> ProbeEnsemble:
        """Train every member; return self. Features are standardised with X's statistics.

        X: any float dtype (trained in float32), every value finite; y: integer labels.
        """
        if not isinstance(X, Tensor) or not X.is_floating_point():
            raise TypeError(f"X must be a float tensor of features, got {getattr(X, 'dtype', X)}")
        if not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"y must be a tensor of integer labels, got {getattr(y, 'dtype', y)}")
        check_finite(X, "X")
        X, y = X.float(), y.long()
        if X.ndim != 2 or X.shape[1] != self.in_dim or y.shape != (X.shape[0],):
            raise ValueError(
                f"expected X (N, {self.in_dim}) and y (N,), got {tuple(X.shape)}, {tuple(y.shape)}"
            )
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(
                f"labels must be in [0, {self.num_classes}), got {int(y.min())}..{int(y.max())}"
            )
        cfg = self.config
        self.mean, self.std = X.mean(0), X.std(0).clamp(min=1e-6)
        Xn = (X - self.mean) / self.std
        gen = make_generator(cfg.seed)
        perm = torch.randperm(len(X), generator=gen)
        n_val = int(len(X) * cfg.val_fraction)
        val, tr = perm[:n_val], perm[n_val:]
        self.members, self.epochs = [], []
        for i in range(cfg.ensemble_size):
            net = init_module(lambda: PixelMLP(self.in_dim, self.num_classes, cfg.hidden),
                              make_generator(cfg.seed, i))
            opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
            best, best_loss, bad, epochs = copy.deepcopy(net.state_dict()), float("inf"), 0, 0
            for _ in range(cfg.max_epochs):
                epochs += 1
                net.train()
                order = tr[torch.randperm(len(tr), generator=gen)]
                for s in range(0, len(order), cfg.batch_size):
                    b = order[s : s + cfg.batch_size]
                    if len(b) < 2:  # BatchNorm needs two samples
                        continue
                    loss = F.cross_entropy(net(Xn[b]), y[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if n_val == 0:
                    best = copy.deepcopy(net.state_dict())
                    continue
                net.eval()
                with torch.no_grad():
                    val_loss = F.cross_entropy(net(Xn[val]), y[val]).item()
                if val_loss < best_loss - 1e-4:
                    best, best_loss, bad = copy.deepcopy(net.state_dict()), val_loss, 0
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
            net.load_state_dict(best)
            self.members.append(net.eval())
            self.epochs.append(epochs)
            if progress is not None:
                progress(i)
        return self

    @torch.no_grad()
    def logits(self, X: Tensor, chunk: int = 65536) -> Tensor:
        """Return every member's logits (M, N, C) for features X (N, d)."""
        if not self.members:
            raise RuntimeError("the ensemble is not trained: call fit first")
        check_finite(X, "X")
        out = []
        for s in range(0, len(X), chunk):
            xn = (X[s : s + chunk].float() - self.mean) / self.std
            out.append(torch.stack([m(xn) for m in self.members]))
        return torch.cat(out, dim=1)

    def predict(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Return majority-vote labels (N,) and uncertainty (N,) in [0, 1) for X (N, d)."""
        return vote(self.logits(X))


@torch.no_grad()
def predict_images(
    features, ensemble: ProbeEnsemble, images: Tensor, batch_size: int = 8
) -> tuple[Tensor, Tensor]:
    """Segment images (B, C, H, W): labels (B, H, W) and uncertainty (B, H, W), streamed in
    batches so that only one batch of feature maps exists at a time."""
    labels, unc = [], []
    for s in range(0, len(images), batch_size):
        f = features(images[s : s + batch_size]).cpu()  # (b, D, H, W)
        b, d, h, w = f.shape
        lab, u = ensemble.predict(f.permute(0, 2, 3, 1).reshape(-1, d))
        labels.append(lab.view(b, h, w))
        unc.append(u.view(b, h, w))
    return torch.cat(labels), torch.cat(unc)
