"""Evaluation metrics, accumulated over a whole evaluation set.

The device functions (`depth_metric_sums`, `confusion_matrix`) return per-batch sums that the host
adds up in float64/int64; `depth_metrics` and `segmentation_metrics` turn the totals into the
reported numbers. So a figure never depends on how the set was cut into batches.

Depth (the NYU protocol of Eigen et al., NIPS 2014, as BTS, AdaBins and DPT report it): over pixels
with min_depth < d* < max_depth (and inside the evaluation crop when asked), predictions clipped to
[min_depth, max_depth]:
    delta_k   fraction with max(d/d*, d*/d) < 1.25^k, k = 1, 2, 3
    abs_rel   mean |d - d*| / d*          sq_rel   mean (d - d*)^2 / d*
    rmse      sqrt(mean (d - d*)^2)       rmse_log sqrt(mean (log d - log d*)^2)
    log10     mean |log10 d - log10 d*|
`average="image"`: each metric per image, then the mean over images (the published protocol);
`average="pixel"`: every valid pixel of the set pooled.

Segmentation: a C x C confusion matrix (rows: ground truth, columns: prediction) over pixels whose
label is a class; IoU_c = TP / (TP + FP + FN), mIoU the mean over classes that occur in the ground
truth or the predictions, pixel accuracy = trace / total.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmcmae_jax.data.augment import center_crop_box

DEPTH_METRICS = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10")
# Per-pixel terms summed per image; rmse and rmse_log take the square root after averaging.
_PIXEL_TERMS = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "sq_err", "sq_log_err", "log10")

# NYU Depth V2 evaluation crop of Eigen et al. on the 480 x 640 frame: rows 45..470, columns 41..600.
NYU_EIGEN_CROP = (45, 471, 41, 601)  # top, bottom, left, right (bottom/right exclusive)
NYU_FRAME_HW = (480, 640)


def eval_crop_mask(size: int, frame_hw=NYU_FRAME_HW, crop=NYU_EIGEN_CROP) -> np.ndarray:
    """(size, size) bool: the pixels of an evaluation input (the central square of a `frame_hw` frame
    resized to size x size, as the data pipeline's eval transform makes it) whose centre falls inside
    `crop` of the original frame. For NYU the central square already drops the columns the Eigen crop
    drops, so only the top and bottom rows go."""
    left, top, right, bottom = center_crop_box(*frame_hw)
    centres = (np.arange(size) + 0.5) / size
    rows = top + centres * (bottom - top)
    cols = left + centres * (right - left)
    inside_rows = (rows >= crop[0]) & (rows < crop[1])
    inside_cols = (cols >= crop[2]) & (cols < crop[3])
    return inside_rows[:, None] & inside_cols[None, :]


def depth_as_measured(pred: jax.Array, target: jax.Array, *, min_depth: float, max_depth: float,
                      crop_mask: jax.Array | None = None):
    """(pred, target, counted) of a batch as the depth metrics see them, each (B, H*W): the prediction
    clipped to [min_depth, max_depth], and the pixels that count (min_depth < target < max_depth, inside
    `crop_mask`). Figures of predictions and errors draw these, so that they show what the metrics measure."""
    batch = pred.shape[0]
    pred = jnp.clip(pred.reshape(batch, -1).astype(jnp.float32), min_depth, max_depth)
    target = target.reshape(batch, -1).astype(jnp.float32)
    counted = (target > min_depth) & (target < max_depth)
    if crop_mask is not None:
        counted = counted & jnp.asarray(crop_mask, bool).reshape(1, -1)
    return pred, target, counted


def depth_metric_sums(pred: jax.Array, target: jax.Array, weight: jax.Array, *, min_depth: float,
                      max_depth: float, crop_mask: jax.Array | None = None) -> dict:
    """Sums for one batch. pred, target (B, H, W[, 1]) metres (target 0 = not measured);
    weight (B,) 1 for a real frame, 0 for padding. Returns {"pixel_<term>", "image_<metric>",
    "pixels", "images"} as float32 scalars, to be added up over batches."""
    pred, target, valid = depth_as_measured(pred, target, min_depth=min_depth, max_depth=max_depth,
                                            crop_mask=crop_mask)
    valid = valid.astype(jnp.float32) * weight.astype(jnp.float32)[:, None]
    gt = jnp.where(valid > 0, target, 1.0)  # any positive value: masked out below, keeps logs finite
    ratio = jnp.maximum(pred / gt, gt / pred)
    err = pred - gt
    terms = {
        "delta1": ratio < 1.25, "delta2": ratio < 1.25 ** 2, "delta3": ratio < 1.25 ** 3,
        "abs_rel": jnp.abs(err) / gt, "sq_rel": err ** 2 / gt, "sq_err": err ** 2,
        "sq_log_err": (jnp.log(pred) - jnp.log(gt)) ** 2,
        "log10": jnp.abs(jnp.log10(pred) - jnp.log10(gt)),
    }
    per_image = {k: jnp.sum(v.astype(jnp.float32) * valid, axis=1) for k, v in terms.items()}
    n = jnp.sum(valid, axis=1)
    has = (n > 0).astype(jnp.float32)
    safe_n = jnp.maximum(n, 1.0)
    image_values = {k: per_image[k] / safe_n for k in ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "log10")}
    image_values["rmse"] = jnp.sqrt(per_image["sq_err"] / safe_n)
    image_values["rmse_log"] = jnp.sqrt(per_image["sq_log_err"] / safe_n)
    sums = {f"pixel_{k}": jnp.sum(v) for k, v in per_image.items()}
    sums.update({f"image_{k}": jnp.sum(v * has) for k, v in image_values.items()})
    sums["pixels"] = jnp.sum(n)
    sums["images"] = jnp.sum(has)
    return sums


def depth_metrics(totals: dict, average: str = "image") -> dict:
    """Final depth metrics from summed `depth_metric_sums` (host floats)."""
    if average == "image":
        count = float(totals["images"])
        if count == 0:
            raise ValueError("no evaluation frame has a valid depth pixel within the depth caps")
        return {k: float(totals[f"image_{k}"]) / count for k in DEPTH_METRICS}
    if average == "pixel":
        count = float(totals["pixels"])
        if count == 0:
            raise ValueError("no valid depth pixel within the depth caps in the evaluation set")
        out = {k: float(totals[f"pixel_{k}"]) / count for k in ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "log10")}
        out["rmse"] = float(np.sqrt(float(totals["pixel_sq_err"]) / count))
        out["rmse_log"] = float(np.sqrt(float(totals["pixel_sq_log_err"]) / count))
        return {k: out[k] for k in DEPTH_METRICS}
    raise ValueError(f"depth metric average must be 'image' or 'pixel', got {average!r}")


def per_image_depth_metrics(pred, target, *, min_depth: float, max_depth: float, crop_mask=None) -> list:
    """The depth metrics of each image of a batch on its own (`depth_metrics` of that image's sums; None
    for an image with no counted pixel), for tables and figures of single frames that must agree with
    the evaluation's numbers."""
    pred, target = np.asarray(pred), np.asarray(target)
    out = []
    for i in range(len(pred)):
        sums = jax.device_get(depth_metric_sums(pred[i:i + 1], target[i:i + 1], np.ones(1, np.float32),
                                                min_depth=min_depth, max_depth=max_depth, crop_mask=crop_mask))
        out.append(depth_metrics(sums) if sums["images"] > 0 else None)  # None: no pixel of it counts
    return out


def confusion_matrix(pred: jax.Array, labels: jax.Array, weight: jax.Array, num_classes: int,
                     ignore_label: int = 255) -> jax.Array:
    """(C, C) int32 counts for one batch: rows ground truth, columns prediction. pred, labels
    (B, H, W) int; weight (B,) 0 for padded frames. Ignored and out-of-range labels are not counted."""
    # int32 first: label * num_classes overflows uint8 labels (the dtype of a decoded label PNG).
    pred, labels = pred.astype(jnp.int32), labels.astype(jnp.int32)
    counted = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    counted = counted & (weight[:, None, None] > 0)
    # Uncounted pixels go to one extra bin that is dropped: integer counts, no float rounding.
    index = jnp.where(counted, labels * num_classes + jnp.clip(pred, 0, num_classes - 1), num_classes ** 2)
    counts = jnp.bincount(index.reshape(-1), length=num_classes ** 2 + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def segmentation_metrics(confusion: np.ndarray, class_names=None) -> dict:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU from a summed confusion matrix."""
    confusion = np.asarray(confusion, np.int64)
    total = confusion.sum()
    if total == 0:
        raise ValueError("the evaluation set has no labelled pixel (every label is the ignore label)")
    tp = np.diag(confusion).astype(np.float64)
    gt_count = confusion.sum(axis=1).astype(np.float64)
    pred_count = confusion.sum(axis=0).astype(np.float64)
    union = gt_count + pred_count - tp
    present = union > 0  # a class absent from both ground truth and predictions has no IoU
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    class_acc = np.where(gt_count > 0, tp / np.maximum(gt_count, 1), np.nan)
    names = list(class_names) if class_names else [str(c) for c in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"{len(names)} class names for {len(tp)} classes")
    return {
        "miou": float(np.nanmean(iou)),
        "pixel_acc": float(tp.sum() / total),
        "mean_class_acc": float(np.nanmean(class_acc)),
        "labelled_pixels": int(total),
        "classes_present": int(present.sum()),
        "per_class_iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, iou)},
    }
