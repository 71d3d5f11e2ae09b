"""Per-frame transforms: joint geometric augmentation, RGB-only photometric augmentation, and the
normalisation of RGB and depth that the batch contract fixes.

Geometry (crop, resize, flip) moves RGB, depth, validity and labels together. RGB is resized
bilinearly; labels and the validity mask by nearest neighbour (no invented classes, no half-valid
pixels); depth bilinearly over valid pixels only (a validity-weighted average), so holes never bleed
into measured depth.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from mmcmae_jax.data.schema import IGNORE_LABEL, DecodedFrame

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Floor on the trimmed std of depth (metres): a nearly flat frame is not blown up into noise.
MIN_DEPTH_STD_M = 0.01


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """What the train-time transform does; eval uses a centre crop and no randomness. The defaults are
    the data config's (data/config.py)."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip_prob: float
    brightness: float
    contrast: float
    saturation: float
    depth_trim: float

    @classmethod
    def from_config(cls, c) -> "AugmentOptions":
        """The augmentation fields of a data config, as a plain value grain workers can be sent."""
        return cls(tuple(c.crop_scale), tuple(c.crop_ratio), *(float(c[f]) for f in (
            "hflip_prob", "brightness", "contrast", "saturation", "depth_trim")))


def random_resized_crop_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
):
    """(left, top, right, bottom) of a crop with area fraction in `scale` and aspect in `ratio`,
    sampled as torchvision's RandomResizedCrop does (10 tries, then the central crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    return center_crop_box(height, width)


def center_crop_box(height: int, width: int):
    """The largest central square."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return left, top, left + side, top + side


def resize_frame(frame: DecodedFrame, box, size: int, flip: bool):
    """Crop `box` of every modality and resize to size x size; returns rgb uint8, depth_m, valid, label."""
    out = (size, size)
    rgb = np.asarray(Image.fromarray(frame.rgb).resize(out, Image.BILINEAR, box=box))
    valid = (frame.depth_m > 0) & np.isfinite(frame.depth_m)
    depth = np.where(valid, frame.depth_m, 0).astype(np.float32)
    weight = np.asarray(Image.fromarray(valid.astype(np.float32)).resize(out, Image.BILINEAR, box=box))
    summed = np.asarray(Image.fromarray(depth).resize(out, Image.BILINEAR, box=box))
    valid_nn = np.asarray(Image.fromarray(valid.astype(np.uint8)).resize(out, Image.NEAREST, box=box)) > 0
    valid_out = valid_nn & (weight > 1e-6)
    depth_out = np.where(valid_out, summed / np.maximum(weight, 1e-6), 0).astype(np.float32)
    if frame.label is None:
        label = np.full(out, IGNORE_LABEL, np.int32)
    else:
        label = np.asarray(Image.fromarray(frame.label.astype(np.int32)).resize(out, Image.NEAREST, box=box))
        label = label.astype(np.int32)
    if flip:
        rgb, depth_out, valid_out, label = (a[:, ::-1] for a in (rgb, depth_out, valid_out, label))
    return rgb, depth_out, valid_out, label


def color_jitter(
    rng: np.random.Generator, rgb: np.ndarray, brightness: float, contrast: float, saturation: float
) -> np.ndarray:
    """Brightness, contrast and saturation factors drawn from [1-s, 1+s], applied in a random order
    (as torchvision's ColorJitter) to rgb floats in [0, 1]."""
    for op in rng.permutation(3):
        if op == 0 and brightness > 0:
            rgb = rgb * rng.uniform(1 - brightness, 1 + brightness)
        elif op == 1 and contrast > 0:
            grey_mean = np.mean(rgb @ np.array([0.299, 0.587, 0.114], np.float32))
            rgb = grey_mean + (rgb - grey_mean) * rng.uniform(1 - contrast, 1 + contrast)
        elif op == 2 and saturation > 0:
            grey = (rgb @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
            rgb = grey + (rgb - grey) * rng.uniform(1 - saturation, 1 + saturation)
        rgb = np.clip(rgb, 0, 1)
    return rgb.astype(np.float32)


def standardize_depth(depth_m: np.ndarray, valid: np.ndarray, trim: float) -> np.ndarray:
    """(d - mean) / std over valid pixels, mean and std taken with `trim` of each tail cut off
    (MultiMAE's depth normalisation); invalid pixels are 0."""
    values = depth_m[valid]
    if values.size == 0:
        return np.zeros_like(depth_m, np.float32)
    lo, hi = np.quantile(values, [trim, 1 - trim]) if trim > 0 else (values.min(), values.max())
    kept = values[(values >= lo) & (values <= hi)]
    kept = kept if kept.size else values
    std = max(float(kept.std()), MIN_DEPTH_STD_M)
    return np.where(valid, (depth_m - kept.mean()) / std, 0).astype(np.float32)


def transform_frame(
    frame: DecodedFrame, rng: np.random.Generator | None, size: int, options: AugmentOptions
) -> dict:
    """One frame to the batch contract's arrays. rng=None: evaluation (central crop, no randomness)."""
    height, width = frame.depth_m.shape
    if rng is None:
        box, flip = center_crop_box(height, width), False
    else:
        box = random_resized_crop_box(rng, height, width, options.crop_scale, options.crop_ratio)
        flip = bool(rng.random() < options.hflip_prob)
    rgb, depth_m, valid, label = resize_frame(frame, box, size, flip)
    rgb = rgb.astype(np.float32) / 255.0
    if rng is not None:
        rgb = color_jitter(rng, rgb, options.brightness, options.contrast, options.saturation)
    return {
        "rgb": ((rgb - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32),
        "depth": standardize_depth(depth_m, valid, options.depth_trim)[..., None],
        "depth_valid": valid.astype(np.float32)[..., None],
        "depth_m": depth_m[..., None],
        "label": np.ascontiguousarray(label, dtype=np.int32),
    }
