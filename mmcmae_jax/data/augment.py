"""Per-frame transforms on the host: joint geometric augmentation, the draw of the photometric one, and
the compact arrays of the batch contract (device_batch.py normalises them on the device).

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


def resize_frame(frame: DecodedFrame, box, size: int, flip: bool, labels: bool = True):
    """Crop `box` of every modality and resize to size x size; returns rgb uint8, depth in the frame's
    units (uint16, 0 = not measured), and label uint8 (None without `labels`). Flipped arrays are views:
    batching copies them."""
    out = (size, size)
    rgb = np.asarray(Image.fromarray(frame.rgb).resize(out, Image.BILINEAR, box=box))
    valid = frame.depth_units > 0
    weight = np.asarray(Image.fromarray(valid.astype(np.float32)).resize(out, Image.BILINEAR, box=box))
    summed = np.asarray(Image.fromarray(frame.depth_units.astype(np.float32)).resize(out, Image.BILINEAR, box=box))
    valid_nn = np.asarray(Image.fromarray(valid.astype(np.uint8)).resize(out, Image.NEAREST, box=box)) > 0
    valid_out = valid_nn & (weight > 1e-6)
    # A weighted mean of uint16 values stays in range; a measured pixel never rounds to 0 ("none").
    depth = np.where(valid_out, np.maximum(np.rint(summed / np.maximum(weight, 1e-6)), 1), 0).astype(np.uint16)
    label = None
    if labels and frame.label is None:
        label = np.full(out, IGNORE_LABEL, np.uint8)
    elif labels:
        if frame.label.dtype != np.uint8 and frame.label.size and (frame.label.min() < 0 or frame.label.max() > 255):
            raise BatchRangeError(f"label holds class ids in [{frame.label.min()}, {frame.label.max()}]; the "
                                  f"batch carries labels as uint8: ids 0-254, {IGNORE_LABEL} for none")
        label = np.asarray(Image.fromarray(frame.label.astype(np.uint8)).resize(out, Image.NEAREST, box=box))
    if flip:
        rgb, depth = rgb[:, ::-1], depth[:, ::-1]
        label = None if label is None else label[:, ::-1]
    return rgb, depth, label


def draw_color_jitter(
    rng: np.random.Generator | None, brightness: float, contrast: float, saturation: float
) -> np.ndarray:
    """(2, 3) float32: the colour operations in a random order (0 brightness, 1 contrast, 2 saturation)
    and their factors, drawn from [1-s, 1+s] as torchvision's ColorJitter draws them; an operation of
    strength 0 keeps factor 1 (not applied). rng=None: no jitter. Applied on the device
    (device_batch.apply_color_jitter)."""
    jitter = np.array([[0, 1, 2], [1, 1, 1]], np.float32)
    if rng is None:
        return jitter
    strengths = (brightness, contrast, saturation)
    for position, op in enumerate(rng.permutation(3)):
        jitter[0, position] = op
        if strengths[op] > 0:
            jitter[1, position] = rng.uniform(1 - strengths[op], 1 + strengths[op])
    return jitter


class BatchRangeError(ValueError):
    """A value the batch's compact types cannot hold (a class id beyond 255)."""


def transform_frame(
    frame: DecodedFrame, rng: np.random.Generator | None, size: int, options: AugmentOptions, labels: bool = True
) -> dict:
    """One frame to the batch contract's compact arrays (device_batch.py): rgb uint8, color_jitter,
    depth_units uint16, depth_scale and, with `labels`, label uint8. rng=None: evaluation (central crop,
    no randomness)."""
    height, width = frame.depth_units.shape
    if rng is None:
        box, flip = center_crop_box(height, width), False
    else:
        box = random_resized_crop_box(rng, height, width, options.crop_scale, options.crop_ratio)
        flip = bool(rng.random() < options.hflip_prob)
    rgb, depth, label = resize_frame(frame, box, size, flip, labels)
    out = {
        "rgb": rgb,
        "color_jitter": draw_color_jitter(rng, options.brightness, options.contrast, options.saturation),
        "depth_units": depth,
        "depth_scale": np.float32(frame.depth_scale),
    }
    if labels:
        out["label"] = label
    return out
