"""Evaluation of a fine-tuned model over a whole evaluation set: jitted prediction, metric sums per
batch on the device, totals on the host (see transfer/metrics.py).

Evaluation runs in one process on its local devices and reads every evaluation frame once (the
pipeline's eval transform: central square crop, resized to the model's input size). Metrics are
computed at that resolution, in metres against `depth_m` with its validity mask for depth. A work
directory's checkpoint is evaluated by `mmcmae_jax.run.workdir.evaluate_workdir`.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmcmae_jax.device_batch import prepare_batch
from mmcmae_jax.train import sharding
from mmcmae_jax.transfer import metrics
from mmcmae_jax.transfer.objective import label_table, predict_fn, remap_labels


EVAL_FIELDS = ("rgb", "depth_units", "depth_scale", "label")  # host fields (device_batch.py); no colour jitter in evaluation
# The model fields an evaluation reads, made on the device from EVAL_FIELDS.
EVAL_INPUTS = ("rgb", "depth_m", "label")


def eval_batches(data: ml_collections.ConfigDict, image_size: int, batch_size: int):
    """Every evaluation frame once, in batches of `batch_size` (the last one padded): yields
    (host batch of EVAL_FIELDS, weight (batch_size,) with 0 on padding)."""
    from mmcmae_jax.data import pipeline_from_config
    data = data.copy_and_resolve_references()
    with data.unlocked():
        data.num_epochs = 1
        data.read_threads = min(data.read_threads, 2)  # grain prefetches 2 x batch_size elements
    frames = []
    # One frame per pipeline batch, regrouped here, so no frame is dropped by drop_remainder.
    for frame in pipeline_from_config(data, batch_size=1, image_size=image_size, seed=0, train=False,
                                      shard_index=0, shard_count=1, name="config.eval_data"):
        frames.append(frame)
        if len(frames) == batch_size:
            yield _stack(frames, batch_size)
            frames = []
    if frames:
        yield _stack(frames, batch_size)


def _stack(frames, batch_size):
    batch = {k: np.concatenate([f[k] for f in frames]) for k in EVAL_FIELDS}
    real = len(batch["rgb"])
    if real < batch_size:  # pad with copies of the first frame, weighted 0
        batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, axis=0)]) for k, v in batch.items()}
    weight = np.zeros(batch_size, np.float32)
    weight[:real] = 1.0
    return batch, weight


def make_eval_step(config: ml_collections.ConfigDict):
    """A jitted (params, batch, weight) -> per-batch sums (depth) or confusion matrix (segmentation)."""
    predict = predict_fn(config)
    crop = None
    if config.task == "depth" and config.eval.nyu_crop:
        crop = jnp.asarray(metrics.eval_crop_mask(config.model.image_size))

    table = label_table(config)

    def step(params, batch, weight):
        batch = prepare_batch(batch, EVAL_INPUTS, depth_trim=0.0)  # no standardised depth is read
        out = predict(params, batch["rgb"])
        if config.task == "depth":
            return metrics.depth_metric_sums(out, batch["depth_m"], weight, min_depth=config.eval.min_depth,
                                             max_depth=config.eval.max_depth, crop_mask=crop)
        return {"confusion": metrics.confusion_matrix(jnp.argmax(out, -1), remap_labels(batch["label"], table), weight,
                                                      config.num_classes, config.ignore_label)}
    return jax.jit(step)


def evaluate(config: ml_collections.ConfigDict, params: dict, data: ml_collections.ConfigDict | None = None,
             eval_step=None) -> dict:
    """Metrics of `params` (full: encoder and head) over the evaluation set `data` (config.eval_data).
    eval_step: a `make_eval_step(config)` to reuse, so that repeated evaluations compile it once."""
    data = config.eval_data if data is None else data
    table = label_table(config)
    devices = jax.local_devices()
    mesh = sharding.make_mesh(1, devices)
    # Each local device takes an equal slice of every batch.
    batch_size = -(-config.eval.batch_size // len(devices)) * len(devices)
    params = jax.device_put(params, sharding.replicated(mesh))
    step = make_eval_step(config) if eval_step is None else eval_step
    totals, frames = None, 0
    for batch, weight in eval_batches(data, config.model.image_size, batch_size):
        if config.task == "segmentation":
            labels = batch["label"][weight > 0]
            if table is not None:
                labels = np.where((labels >= 0) & (labels < 256), table[np.clip(labels, 0, 255)], labels)
            bad = (labels != config.ignore_label) & ((labels < 0) | (labels >= config.num_classes))
            if bad.any():
                raise ValueError(f"evaluation labels {sorted(set(labels[bad].tolist()))[:5]} lie outside "
                                 f"config.num_classes={config.num_classes} (data {data.path or 'procedural'!r})")
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        sums = jax.device_get(step(params, batch, jax.device_put(weight, sharding.batch_sharding(mesh))))
        sums = {k: np.asarray(v, np.float64 if k != "confusion" else np.int64) for k, v in sums.items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        frames += int(weight.sum())
    if totals is None:
        raise ValueError(f"the evaluation set {data.path or 'procedural'!r} yielded no frame")
    results = {"task": config.task, "frames": frames}
    if config.task == "depth":
        results.update(metrics=metrics.depth_metrics(totals, config.eval.average),
                       valid_pixels=int(totals["pixels"]), average=config.eval.average,
                       min_depth=config.eval.min_depth, max_depth=config.eval.max_depth,
                       nyu_crop=bool(config.eval.nyu_crop))
    else:
        seg = metrics.segmentation_metrics(totals["confusion"], tuple(config.class_names) or None)
        per_class = seg.pop("per_class_iou")
        results.update(metrics=seg, per_class_iou=per_class, confusion=totals["confusion"].tolist())
    return results


def format_results(results: dict) -> str:
    """The results as a plain-text table."""
    lines = [f"{results['task']} evaluation, {results['frames']} frames"
             + (f", checkpoint step {results['step']}" if "step" in results else "")]
    scalars = results["metrics"]
    width = max(len(k) for k in scalars)
    lines += [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in scalars.items()]
    if results.get("per_class_iou"):
        lines.append("  per-class IoU:")
        name_width = max(len(k) for k in results["per_class_iou"])
        lines += [f"    {k:<{name_width}}  {'   -  ' if v is None else f'{v:.4f}'}"
                  for k, v in results["per_class_iou"].items()]
    return "\n".join(lines)


def write_results(results: dict, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
