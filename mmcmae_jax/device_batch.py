"""The batch on the device: what the host sends, and the model's inputs made from it inside the step.

The input pipeline hands over compact frames (docs/data.md, "The batch contract"):
  rgb           (B, H, W, 3) uint8, cropped, resized and flipped
  color_jitter  (B, 2, 3) float32: row 0 the colour operations in the order they apply (0 brightness,
                1 contrast, 2 saturation), row 1 their factors (1 = not applied)
  depth_units   (B, H, W) uint16 depth in the units the records store it in, 0 where nothing was measured
  depth_scale   (B,) float32 metres per unit (records' depth/scale: 0.001 for millimetres)
  label         (B, H, W) uint8 class ids, 255 = none
5 bytes a pixel (6 with labels) instead of the 20-28 of normalised float32 fields. Depth keeps the
records' own integer units, so it is never out of range and loses only the rounding of the resize. `prepare_batch` turns them, on the
device, into the fields the models and losses read (MODEL_FIELDS): normalised RGB, depth standardised per
frame, the valid-pixel mask, depth in metres, int32 labels. Photometric augmentation is drawn on the host
(its randomness belongs to the frame, so a resumed run sees the same batches) but applied here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Floor on the trimmed std of depth (metres): a nearly flat frame is not blown up into noise.
MIN_DEPTH_STD_M = 0.01
# ITU-R 601 luma, as torchvision's ColorJitter uses for its grey image.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# model field -> the host fields it is made from
SOURCES = {
    "rgb": ("rgb", "color_jitter"),
    "depth": ("depth_units", "depth_scale"),
    "depth_valid": ("depth_units",),
    "depth_m": ("depth_units", "depth_scale"),
    "label": ("label",),
}
MODEL_FIELDS = tuple(SOURCES)
HOST_FIELDS = ("rgb", "color_jitter", "depth_units", "depth_scale", "label")


def host_fields(model_fields) -> tuple:
    """The host fields the pipeline must send for `model_fields`, in HOST_FIELDS order."""
    unknown = [f for f in model_fields if f not in SOURCES]
    if unknown:
        raise KeyError(f"no host field makes the model field(s) {unknown}; known: {MODEL_FIELDS}")
    wanted = {h for f in model_fields for h in SOURCES[f]}
    return tuple(h for h in HOST_FIELDS if h in wanted)


def apply_color_jitter(rgb: jax.Array, jitter: jax.Array) -> jax.Array:
    """rgb (B,H,W,3) floats in [0, 1]; jitter (B,2,3) as the host drew it. Each operation is clipped to
    [0, 1], in the drawn order, as torchvision's ColorJitter; a factor of 1 leaves the image as it is."""
    for position in range(3):
        op = jitter[:, 0, position].astype(jnp.int32)[:, None, None, None]
        factor = jitter[:, 1, position][:, None, None, None]
        grey = (rgb @ jnp.asarray(_LUMA))[..., None]
        grey_mean = jnp.mean(grey, axis=(1, 2, 3), keepdims=True)
        brightness = rgb * factor
        contrast = grey_mean + (rgb - grey_mean) * factor
        saturation = grey + (rgb - grey) * factor
        changed = jnp.where(op == 0, brightness, jnp.where(op == 1, contrast, saturation))
        rgb = jnp.clip(jnp.where(factor == 1.0, rgb, changed), 0.0, 1.0)
    return rgb


def normalize_rgb(rgb_uint8: jax.Array, jitter: jax.Array | None = None) -> jax.Array:
    """uint8 RGB -> (x / 255, colour-jittered, - ImageNet mean) / ImageNet std, float32."""
    rgb = rgb_uint8.astype(jnp.float32) / 255.0
    if jitter is not None:
        rgb = apply_color_jitter(rgb, jitter)
    return (rgb - IMAGENET_MEAN) / IMAGENET_STD


def masked_quantiles(values: jax.Array, valid: jax.Array, qs) -> list:
    """Per row of values (B, N): the quantiles `qs` of its valid entries, interpolated linearly as
    np.quantile does; rows without a valid entry give inf or nan (the caller masks them)."""
    count = jnp.sum(valid, axis=-1)
    ordered = jnp.sort(jnp.where(valid, values, jnp.inf), axis=-1)
    last = jnp.maximum(count - 1, 0)
    out = []
    for q in qs:
        pos = q * last.astype(jnp.float32)
        below = jnp.floor(pos).astype(jnp.int32)
        above = jnp.minimum(below + 1, last)
        low = jnp.take_along_axis(ordered, below[:, None], axis=-1)[:, 0]
        high = jnp.take_along_axis(ordered, above[:, None], axis=-1)[:, 0]
        out.append(jnp.where(above > below, low + (high - low) * (pos - below), low))
    return out


def standardize_depth(depth_m: jax.Array, valid: jax.Array, trim: float) -> jax.Array:
    """(d - mean) / std per frame over its valid pixels, mean and std taken with `trim` of each tail cut
    off (MultiMAE's depth normalisation), std at least MIN_DEPTH_STD_M; invalid pixels (and frames with
    none valid) are 0. depth_m, valid: (B, H, W, 1)."""
    shape = depth_m.shape
    d, v = depth_m.reshape(shape[0], -1), valid.reshape(shape[0], -1)
    low, high = masked_quantiles(d, v, (trim, 1.0 - trim))
    kept = v & (d >= low[:, None]) & (d <= high[:, None])
    kept = jnp.where(jnp.any(kept, axis=-1, keepdims=True), kept, v)
    count = jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(kept, d, 0.0), axis=-1, keepdims=True) / count
    var = jnp.sum(jnp.where(kept, (d - mean) ** 2, 0.0), axis=-1, keepdims=True) / count
    std = jnp.maximum(jnp.sqrt(var), MIN_DEPTH_STD_M)
    return jnp.where(v, (d - mean) / std, 0.0).reshape(shape)


def prepare_batch(batch: dict, fields, depth_trim: float) -> dict:
    """The model fields `fields` made from a host batch (module docstring), on the device, in float32
    (labels int32). `depth_trim`: the data config's."""
    out = {}
    if "rgb" in fields:
        out["rgb"] = normalize_rgb(batch["rgb"], batch.get("color_jitter"))
    if {"depth", "depth_valid", "depth_m"} & set(fields):
        units = batch["depth_units"][..., None]
        valid = units > 0
        if {"depth", "depth_m"} & set(fields):
            depth_m = units.astype(jnp.float32) * batch["depth_scale"].astype(jnp.float32)[:, None, None, None]
        if "depth" in fields:
            out["depth"] = standardize_depth(depth_m, valid, depth_trim)
        if "depth_valid" in fields:
            out["depth_valid"] = valid.astype(jnp.float32)
        if "depth_m" in fields:
            out["depth_m"] = depth_m
    if "label" in fields:
        out["label"] = batch["label"].astype(jnp.int32)
    return out


def random_host_batch(rng: np.random.Generator, batch: int, image_size: int, num_classes: int = 0) -> dict:
    """A host batch of random frames (for step benchmarks and tests): uniform RGB, a random colour jitter,
    depth 0.5-10 m in millimetres with 5 % of the pixels unmeasured, and with `num_classes` random labels."""
    shape = (batch, image_size, image_size)
    order = np.stack([rng.permutation(3) for _ in range(batch)]).astype(np.float32)
    out = {"rgb": rng.integers(0, 256, shape + (3,), np.uint8),
           "color_jitter": np.stack([order, rng.uniform(0.6, 1.4, (batch, 3))], axis=1).astype(np.float32),
           "depth_units": np.where(rng.random(shape) < 0.05, 0, rng.integers(500, 10000, shape)).astype(np.uint16),
           "depth_scale": np.full((batch,), 0.001, np.float32)}
    if num_classes:
        out["label"] = rng.integers(0, num_classes, shape).astype(np.uint8)
    return out


def prepare_batch_numpy(batch: dict, fields, depth_trim: float) -> dict:
    """`prepare_batch` on the host, in NumPy, frame by frame: for tools that want model inputs without a
    device step (cached probe frames), and the host-side reference that benchmarks/input_pipeline.py
    times against. Equal to `prepare_batch` up to float rounding."""
    out = {}
    if "rgb" in fields:
        rgb = batch["rgb"].astype(np.float32) / 255.0
        jitter = batch.get("color_jitter")
        for i in range(len(rgb) if jitter is not None else 0):
            for op, factor in zip(jitter[i, 0].astype(int), jitter[i, 1]):
                if factor == 1.0:
                    continue
                grey = (rgb[i] @ _LUMA)[..., None]
                centre = {0: 0.0, 1: grey.mean(), 2: grey}[op]
                rgb[i] = np.clip(centre + (rgb[i] - centre) * factor, 0.0, 1.0)
        out["rgb"] = ((rgb - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    if {"depth", "depth_valid", "depth_m"} & set(fields):
        valid = batch["depth_units"][..., None] > 0
        depth_m = (batch["depth_units"][..., None].astype(np.float32)
                   * batch["depth_scale"].astype(np.float32)[:, None, None, None])
        if "depth" in fields:
            out["depth"] = np.stack([_standardize_frame(d, v, depth_trim) for d, v in zip(depth_m, valid)])
        if "depth_valid" in fields:
            out["depth_valid"] = valid.astype(np.float32)
        if "depth_m" in fields:
            out["depth_m"] = depth_m
    if "label" in fields:
        out["label"] = batch["label"].astype(np.int32)
    return out


def _standardize_frame(depth_m: np.ndarray, valid: np.ndarray, trim: float) -> np.ndarray:
    values = depth_m[valid]
    if values.size == 0:
        return np.zeros_like(depth_m, np.float32)
    low, high = np.quantile(values, [trim, 1 - trim])
    kept = values[(values >= low) & (values <= high)]
    kept = kept if kept.size else values
    std = max(float(kept.std()), MIN_DEPTH_STD_M)
    return np.where(valid, (depth_m - kept.mean()) / std, 0).astype(np.float32)
