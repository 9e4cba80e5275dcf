"""Does the factorized denoiser segment the simplest possible images?

Trains the cpu profile's factorized model (K = 2, the paper's architecture, plain denoising
loss) on images that hold one flat disk or square of a random colour on a flat background of
another random colour, then segments held-out ones (noise to t, one forward pass) and prints:

- foreground IoU with a fixed region and with the best region per image, and pixel accuracy;
- how decided the masks are (|m_0 - 0.5| * 2: 0 undecided, 1 one-hot) on the pixels next to an
  edge (the object's outline or the image border) and on the pixels inside flat regions.

If the architecture turned the loss into a figure/ground split, IoU would be high here. The
training resumes from its file in the cache after an interruption.

    python scripts/factorized_sanity.py              # 600 steps: about 11 minutes on 2 cores
    python scripts/factorized_sanity.py --steps 100  # quicker, less trained
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from fdiff.factorized import segment_dataset
from fdiff.metrics import foreground_scores, mask_stats
from fdiff.train import Recipe, cache_dir, train

SIZE = 32


class FlatShapes:
    """One flat disk or square on a flat background; colours uniform in RGB, so a colour says
    nothing about figure or ground. Item i depends only on (seed, i)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        grid = torch.arange(SIZE) + 0.5
        self.yy, self.xx = torch.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def _one(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 10**7 + i)
        colours = torch.rand(2, 3, generator=g) * 1.8 - 0.9
        r = (0.2 + 0.15 * torch.rand(1, generator=g).item()) * SIZE
        cx, cy = (r + (SIZE - 2 * r) * torch.rand(2, generator=g)).tolist()
        if torch.rand(1, generator=g).item() < 0.5:
            fg = (self.xx - cx) ** 2 + (self.yy - cy) ** 2 < r * r
        else:
            fg = ((self.xx - cx).abs() < 0.85 * r) & ((self.yy - cy).abs() < 0.85 * r)
        image = torch.where(fg[None], colours[0].view(3, 1, 1), colours[1].view(3, 1, 1))
        image = image + 0.02 * torch.randn(3, SIZE, SIZE, generator=g)
        return image.clamp(-1, 1), fg.long()

    def batch(self, indices) -> dict[str, torch.Tensor]:
        images, masks = zip(*(self._one(int(i)) for i in indices))
        return {"image": torch.stack(images), "mask": torch.stack(masks)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image, mask = self._one(int(i))
        return {"image": image, "mask": mask}


def near_an_edge(fg: torch.Tensor) -> torch.Tensor:
    """Pixels (B, H, W) within one pixel of the figure's outline or of the image border."""
    x = fg[:, None].float()
    grown = F.max_pool2d(x, 3, 1, 1)
    shrunk = -F.max_pool2d(-x, 3, 1, 1)
    edge = (grown != shrunk)[:, 0]
    edge[:, [0, -1], :] = True
    edge[:, :, [0, -1]] = True
    return edge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--test-images", type=int, default=200)
    args = parser.parse_args()
    recipe = Recipe("factorized", "cpu", steps=args.steps, precision="bf16")
    model, schedule, _, config = recipe.parts()
    resume = cache_dir() / "runs" / f"factorized_sanity-{recipe.digest()}.resume.safetensors"
    start = time.perf_counter()
    result = train(model, schedule, FlatShapes(50_000, seed=0), config, checkpoint=resume)
    tail = result.losses[-50:]
    print(f"{result.step} steps, final loss {sum(tail) / len(tail):.4f}, "
          f"{time.perf_counter() - start:.0f} s in this run; resume file {resume}")
    test = FlatShapes(args.test_images, seed=1)
    fg = test.batch(range(len(test)))["mask"]
    edge = near_an_edge(fg)
    print(f"{len(test)} held-out images; foreground covers {fg.float().mean():.2f} of the pixels, "
          f"edges {edge.float().mean():.2f}")
    print(f"{'t':>4} {'IoU fixed':>10} {'IoU per image':>14} {'accuracy':>9} "
          f"{'entropy/logK':>13} {'decided, edges':>15} {'decided, inside':>16}")
    for t in (10, 30, 100):
        masks = segment_dataset(result.ema, schedule, test, t, progress=False)
        pred = masks.argmax(1)
        fixed = foreground_scores(pred, fg)
        per = foreground_scores(pred, fg, per_image=True)
        decided = (masks[:, 0] - 0.5).abs() * 2
        print(f"{t:>4} {fixed['iou']:>10.3f} {per['iou']:>14.3f} {per['accuracy']:>9.3f} "
              f"{mask_stats(masks)['entropy_ratio']:>13.3f} {decided[edge].mean():>15.3f} "
              f"{decided[~edge].mean():>16.3f}")


if __name__ == "__main__":
    main()
