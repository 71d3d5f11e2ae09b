"""Draw docs/figures/m3_method.png, the README's picture of M3, from real procedural frames.

    python docs/figures/make_figures.py [--out docs/figures/m3_method.png] [--size 96]

One procedural room (frame 2 of the procedural set with seed 0), drawn with mmcmae_jax.visualize, the helpers
the trainer and the notebook use:
  stage 1: RGB and depth of the same frame; the same patch of each (lit) is a positive pair, every other
           patch of the batch a negative;
  stage 2: 80% of the RGB and 80% of the depth patches masked, Gaussian noise on depth; targets: the
           clean depth of the masked patches and the added noise on the visible ones;
  transfer: the RGB encoder alone, fine-tuned for depth and for semantic labels.
No model is trained here: the panels show the inputs and targets of each step.
"""
import argparse
import os

import numpy as np

from mmcmae_jax import visualize
from mmcmae_jax.data import PROCEDURAL_CLASS_NAMES, render_frame

PATCH = 16
MASK_RATIO = 0.8


def random_mask(num_patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """1 = masked, exactly round(ratio * N) patches, as the model's static-shape masks."""
    mask = np.zeros(num_patches, np.int32)
    mask[rng.permutation(num_patches)[: int(round(ratio * num_patches))]] = 1
    return mask


def draw(out: str, size: int, frame_index: int = 2, seed: int = 0):
    frame = render_frame(seed, frame_index, size)
    rgb, depth, labels = frame["rgb"], frame["depth_m"], frame["label"]
    valid = depth > 0
    grid = size // PATCH
    num_patches = grid * grid
    rng = np.random.default_rng(seed)

    (depth_image,), scale = visualize.colorize_depths([depth], valid=valid)
    # Stage 1: light one patch in both modalities (the positive pair), dim the rest.
    positive = np.ones(num_patches, np.int32)
    positive[(grid // 2) * grid + grid // 2] = 0
    stage1 = [visualize.masked_overlay(rgb, positive, PATCH, shade=0.45),
              visualize.masked_overlay(depth_image, positive, PATCH, shade=0.45)]

    # Stage 2: independent 80% masks, noisy depth (sigma in units of the frame's depth spread).
    rgb_mask, depth_mask = random_mask(num_patches, MASK_RATIO, rng), random_mask(num_patches, MASK_RATIO, rng)
    sigma = 0.5 * float(np.std(depth[valid]))
    noise = sigma * rng.standard_normal(depth.shape).astype(np.float32)
    hidden = visualize.patch_mask_pixels(depth_mask, size, size, PATCH)
    stage2 = [visualize.masked_overlay(rgb, rgb_mask, PATCH),
              visualize.masked_overlay(visualize.colorize(depth + noise, *scale, valid=valid), depth_mask, PATCH),
              visualize.colorize(depth, *scale, valid=valid & hidden),
              visualize.colorize_signed(noise, valid=valid & ~hidden, vmax=3 * sigma)]

    transfer = [rgb, depth_image, visualize.colorize_labels(labels, len(PROCEDURAL_CLASS_NAMES))]

    rows = [stage1, stage2, transfer]
    fig = visualize.plot_panels(
        rows, panel_size=1.7,
        row_labels=["stage 1\ncontrastive", "stage 2\nmasked + denoise", "transfer\nRGB only"])
    captions = [["RGB patch i", "depth patch i: positive", "", ""],
                ["RGB, 80% masked", "noisy depth, 80% masked", "target: masked depth", "target: added noise"],
                ["RGB input", "depth estimation", "segmentation", ""]]
    for ax, caption in zip(fig.get_axes(), [c for row in captions for c in row]):
        ax.set_xlabel(caption, fontsize=8)
    fig.suptitle("M3: two-stage RGB-D pre-training (a procedural room)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "m3_method.png"))
    parser.add_argument("--size", type=int, default=96, help="frame size in pixels, a multiple of 16")
    args = parser.parse_args()
    if args.size % PATCH:
        parser.error(f"--size must be a multiple of {PATCH}")
    draw(args.out, args.size)


if __name__ == "__main__":
    main()
