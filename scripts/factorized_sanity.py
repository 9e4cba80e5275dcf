"""Does the factorized denoiser segment the simplest possible images?

Loads (or trains, resumably) the cpu profile's factorized model (K = 2, the paper's architecture,
plain denoising loss) trained on ``simple-shapes``, the built-in data's simplest form: one flat
shape on a flat background. It then segments held-out images (noise to t, one forward pass) and
prints, for a few t:

- foreground IoU with a fixed region (also with the image's outermost frame of pixels left out
  of the score) and with the best region per image, and pixel accuracy;
- the same IoU for 2-means on pixel colours, which solves this data;
- how decided the masks are (``fdiff.metrics.decidedness``: 0 uniform, 1 one-hot) on the pixels
  next to an edge (the shape's outline or the image border) and on the pixels inside flat regions.

If the architecture turned the loss into a figure/ground split, IoU would be high here.

    python scripts/factorized_sanity.py              # the committed 1000-step checkpoint
    python scripts/factorized_sanity.py --steps 100  # trains (and caches) a shorter run
"""

from __future__ import annotations

import argparse

from fdiff.baselines import colour_kmeans
from fdiff.metrics import decidedness, foreground_scores, image_frame, mask_stats, near_edges
from fdiff.profiles import get_profile
from fdiff.runs import load_run
from fdiff.schedules import NoiseSchedule
from fdiff.segmentation import segment_dataset
from fdiff.worlds import world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=200)
    args = parser.parse_args()
    profile = get_profile("cpu")
    model, info = load_run("factorized_simple-shapes", profile, changes={"steps": args.steps},
                           device="cpu")
    schedule = NoiseSchedule(**info["schedule"])
    test = world("simple-shapes", args.test_images, profile.image_size, split="test")
    batch = test.batch(list(range(len(test))))
    fg = batch["mask"]
    edge = near_edges(fg)
    # Ignored: the image's frame, where convolutions reach into padding.
    inner = fg.masked_fill(image_frame(*fg.shape[-2:]), -1)
    print(f"{info['steps']} steps; {len(test)} held-out images; the shape covers "
          f"{fg.float().mean():.2f} of the pixels, edges {edge.float().mean():.2f}")
    colour = foreground_scores(colour_kmeans(batch["image"], 2), fg, per_image=True)
    print(f"2-means on colours: IoU per image {colour['iou']:.3f}")
    print(f"{'t':>4} {'IoU fixed':>10} {'no frame':>9} {'IoU per image':>14} {'accuracy':>9} "
          f"{'entropy/logK':>13} {'decided, edges':>15} {'decided, inside':>16}")
    for t in (10, 30, 100):
        masks = segment_dataset(model, schedule, test, t, progress=False)
        pred = masks.argmax(1)
        fixed = foreground_scores(pred, fg)
        per = foreground_scores(pred, fg, per_image=True)
        decided = decidedness(masks)
        no_frame = foreground_scores(pred, inner)["iou"]
        print(f"{t:>4} {fixed['iou']:>10.3f} {no_frame:>9.3f} {per['iou']:>14.3f} "
              f"{per['accuracy']:>9.3f} "
              f"{mask_stats(masks)['entropy_ratio']:>13.3f} {decided[edge].mean():>15.3f} "
              f"{decided[~edge].mean():>16.3f}")


if __name__ == "__main__":
    main()
