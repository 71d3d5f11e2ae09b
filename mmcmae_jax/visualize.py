"""Pictures of RGB-D data and predictions, shared by the trainer's image summaries and the notebook.

Every function takes NumPy arrays and returns uint8 RGB images (H, W, 3), so they tile into grids and
write to PNG or TensorBoard alike.
"""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def rgb_to_uint8(rgb: np.ndarray, normalised: bool = True) -> np.ndarray:
    """(H, W, 3) RGB, ImageNet-normalised (or in [0, 1]) -> uint8."""
    rgb = np.asarray(rgb, np.float32)
    if normalised:
        rgb = rgb * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(rgb, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def colorize(values: np.ndarray, vmin: float, vmax: float, cmap: str = "turbo",
             valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W[, 1]) scalars -> uint8 RGB with a fixed scale [vmin, vmax]; invalid pixels black."""
    values = np.asarray(values, np.float32).reshape(np.shape(values)[:2])
    scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    image = (colormaps[cmap](np.nan_to_num(scaled))[..., :3] * 255 + 0.5).astype(np.uint8)
    if valid is not None:
        image[np.asarray(valid).reshape(image.shape[:2]) <= 0] = 0
    return image


def shared_depth_scale(*depths: np.ndarray, valid: np.ndarray | None = None, percentile: float = 2.0):
    """One (vmin, vmax) for several depth maps of the same frame, robust to outliers, so the
    colours of prediction and ground truth compare directly."""
    stacked = np.concatenate([np.asarray(d, np.float32).reshape(-1) for d in depths])
    if valid is not None:
        mask = np.concatenate([np.asarray(valid).reshape(-1) > 0] * len(depths))
        stacked = stacked[mask]
    stacked = stacked[np.isfinite(stacked)]
    if stacked.size == 0:
        return 0.0, 1.0
    return float(np.percentile(stacked, percentile)), float(np.percentile(stacked, 100 - percentile))


def error_map(pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None,
              vmax: float | None = None) -> np.ndarray:
    """|pred - target| in a sequential colour map, 0 black-ish to vmax bright; invalid pixels black."""
    error = np.abs(np.asarray(pred, np.float32) - np.asarray(target, np.float32)).reshape(np.shape(pred)[:2])
    if vmax is None:
        finite = error[np.isfinite(error)] if valid is None else error[(np.asarray(valid).reshape(error.shape) > 0)]
        vmax = float(np.percentile(finite, 98)) if finite.size else 1.0
    return colorize(error, 0.0, vmax, "inferno", valid)


def masked_overlay(image: np.ndarray, patch_mask: np.ndarray, patch_size: int, shade: float = 0.25) -> np.ndarray:
    """Darken the masked (hidden) patches of a uint8 image. patch_mask: (N,), 1 = masked, row-major."""
    image = np.asarray(image).copy()
    grid_h, grid_w = image.shape[0] // patch_size, image.shape[1] // patch_size
    pixel_mask = np.kron(np.asarray(patch_mask).reshape(grid_h, grid_w), np.ones((patch_size, patch_size)))
    image[pixel_mask > 0] = (image[pixel_mask > 0] * shade).astype(np.uint8)
    return image


def segmentation_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours; the last row (for the ignore label) is black."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 256, size=(num_classes, 3)).astype(np.uint8)
    return np.concatenate([palette, np.zeros((1, 3), np.uint8)])


def colorize_labels(labels: np.ndarray, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64)
    labels = np.where((labels < 0) | (labels >= num_classes) | (labels == ignore_label), num_classes, labels)
    return segmentation_palette(num_classes)[labels]


def grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile equally sized uint8 images, one list per row, with a white gap."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (height + pad) - pad, columns * (width + pad) - pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas[i * (height + pad): i * (height + pad) + height, j * (width + pad): j * (width + pad) + width] = image
    return canvas
