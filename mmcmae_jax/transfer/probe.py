"""Frozen-feature probes: how much depth and segmentation a frozen RGB encoder's patch tokens hold.

A probe is the `LinearHead` of fine-tuning (one linear map per final patch token, bilinearly
upsampled to the image) trained on cached tokens of a frozen encoder: the encoder runs once per frame,
so a probe costs seconds, and it has no seed of its own (zero init, full-batch Adam), so the only
spread left is that of the encoder. Depth is regressed as log-depth (squared error over valid pixels);
segmentation by softmax cross-entropy.

The image-blind predictor is the floor every read-out is judged against: the per-pixel median depth
and the per-pixel most common class of the labelled training frames, the same prediction for every
image.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmcmae_jax.models.vit import ViTEncoder, drop_cls
from mmcmae_jax.transfer import metrics
from mmcmae_jax.transfer.heads import resize_bilinear


class Frames(NamedTuple):
    """A labelled set in memory: rgb (N,H,W,3) normalised, depth_m (N,H,W,1) metres (0 = none),
    label (N,H,W) int (255 = none)."""
    rgb: np.ndarray
    depth_m: np.ndarray
    label: np.ndarray


def load_frames(data, image_size: int) -> Frames:
    """Every frame of the data config `data` once, as the evaluation transform gives it."""
    from mmcmae_jax.device_batch import prepare_batch_numpy
    from mmcmae_jax.transfer.evaluation import EVAL_INPUTS, eval_batches
    parts = [(prepare_batch_numpy(batch, EVAL_INPUTS, depth_trim=0.0), weight)
             for batch, weight in eval_batches(data, image_size, 64)]
    keep = np.concatenate([w for _, w in parts]) > 0
    stack = lambda k: np.concatenate([b[k] for b, _ in parts])[keep]
    return Frames(stack("rgb"), stack("depth_m"), stack("label"))


def encoder_tokens(encoder_params: dict, model_cfg, rgb: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, T, D) float32: the final, normalised patch tokens of the RGB encoder for every frame."""
    encoder = ViTEncoder(variant=model_cfg.variant, use_cls_token=model_cfg.use_cls_token,
                         pos_embed=model_cfg.pos_embed, image_size=model_cfg.image_size)
    encode = jax.jit(lambda p, x: drop_cls(encoder.apply({"params": p}, x)[0], model_cfg.use_cls_token))
    out = []
    for start in range(0, len(rgb), batch_size):
        chunk = rgb[start:start + batch_size]
        real = len(chunk)
        if real < batch_size:  # one compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(encode(encoder_params, chunk))[:real])
    return np.concatenate(out)


def random_encoder_params(model_cfg, seed: int, image_size: int) -> dict:
    """A randomly initialised RGB encoder, as fine-tuning from scratch starts it."""
    encoder = ViTEncoder(variant=model_cfg.variant, use_cls_token=model_cfg.use_cls_token,
                         pos_embed=model_cfg.pos_embed, image_size=model_cfg.image_size)
    return encoder.init(jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)))["params"]


def _upsampling_matrix(grid: int, size: int) -> np.ndarray:
    """(size, grid): bilinear upsampling along one axis as a matrix, exactly `resize_bilinear`'s."""
    eye = jnp.eye(grid)[None, :, :, None]  # each column a unit impulse
    return np.asarray(resize_bilinear(jnp.broadcast_to(eye, (1, grid, grid, 1)), size, grid)[0, :, :, 0])


def _probe_predict(params, tokens, up_rows, up_cols):
    """tokens (N, T, D) -> (N, H, W, C): standardised tokens, one linear map, bilinear upsampling (two
    small matmuls: much faster to differentiate on the CPU than jax.image.resize)."""
    x = (tokens - params["mean"]) / params["std"]
    out = x @ params["w"] + params["b"]
    grid = up_rows.shape[1]
    return jnp.einsum("ih,nhwc,jw->nijc", up_rows, out.reshape(out.shape[0], grid, grid, -1), up_cols)


def _probe_loss(task: str):
    def loss(pred, target):
        if task == "depth":
            valid = (target > 0).astype(jnp.float32)
            err = (pred - jnp.log(jnp.where(target > 0, target, 1.0))) * valid
            return jnp.sum(err ** 2) / jnp.maximum(jnp.sum(valid), 1.0)
        # A one-hot product, not a gather: its transpose stays a multiply (a scatter-add over every
        # pixel compiles slowly on the CPU).
        one_hot = jax.nn.one_hot(target, pred.shape[-1])  # 255 (no label) -> all zeros: not counted
        nll = -jnp.sum(jax.nn.log_softmax(pred, -1) * one_hot, -1)
        return jnp.sum(nll) / jnp.maximum(jnp.sum(one_hot), 1.0)
    return loss


def fit_probe(tokens: np.ndarray, target: np.ndarray, task: str, num_classes: int = 0, steps: int = 300,
              lr: float = 0.05, weight_decay: float = 1e-4, pixel_stride: int = 4) -> dict:
    """Train a probe on cached tokens (N, T, D) against depth_m (N,H,W,1) or labels (N,H,W).

    Full-batch AdamW from zero weights: deterministic, no seed. The loss reads every `pixel_stride`-th
    pixel along each axis (the full-resolution prediction at those pixels, not a smaller model): a
    softmax over every pixel of every frame would cost 16x more at stride 4 for little change in the
    fit. Returns the probe's parameters, with the feature standardisation (from these tokens) folded in."""
    n, t, d = tokens.shape
    grid = int(round(np.sqrt(t)))
    out_channels = 1 if task == "depth" else num_classes
    flat = tokens.reshape(-1, d)
    stats = {"mean": jnp.asarray(flat.mean(0)), "std": jnp.asarray(flat.std(0) + 1e-6)}
    trained = {"w": jnp.zeros((d, out_channels)), "b": jnp.zeros((out_channels,))}
    if task == "depth":  # start at the mean log-depth: the probe then learns the deviations
        valid = target > 0
        trained["b"] = jnp.full((1,), float(np.log(target[valid]).mean()))
    optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)
    loss_of = _probe_loss(task)
    first = pixel_stride // 2  # the pixels nearest the centres of pixel_stride x pixel_stride cells
    up = tuple(jnp.asarray(_upsampling_matrix(grid, size)[first::pixel_stride]) for size in target.shape[1:3])
    target = target[:, first::pixel_stride, first::pixel_stride]

    @jax.jit
    def train(trained, tokens, target):  # data as arguments: closed-over arrays would be folded as constants
        def step(carry, _):
            trained, opt_state = carry
            value, grads = jax.value_and_grad(
                lambda p: loss_of(_probe_predict({**stats, **p}, tokens, *up), target))(trained)
            updates, opt_state = optimizer.update(grads, opt_state, trained)
            return (optax.apply_updates(trained, updates), opt_state), value
        (trained, _), losses = jax.lax.scan(step, (trained, optimizer.init(trained)), None, length=steps)
        return trained, losses

    trained, losses = train(trained, jnp.asarray(tokens), jnp.asarray(target))
    return {**stats, **trained, "train_loss": np.asarray(losses)}


def probe_predictions(probe: dict, tokens: np.ndarray, image_hw, task: str) -> np.ndarray:
    """Depth in metres (N,H,W,1) or class ids (N,H,W) of a fitted probe."""
    grid = int(round(np.sqrt(tokens.shape[1])))
    params = {k: probe[k] for k in ("mean", "std", "w", "b")}
    up = (_upsampling_matrix(grid, image_hw[0]), _upsampling_matrix(grid, image_hw[1]))
    out = np.asarray(jax.jit(_probe_predict)(params, jnp.asarray(tokens), *up))
    return np.exp(out) if task == "depth" else out.argmax(-1)


def image_blind_predictions(train: Frames, num: int, task: str) -> np.ndarray:
    """The image-blind predictor of `train`, repeated `num` times: per-pixel median depth over the valid
    training pixels (N,H,W,1), or per-pixel most common class (N,H,W)."""
    if task == "depth":
        depth = np.where(train.depth_m > 0, train.depth_m, np.nan)
        with warnings.catch_warnings():  # a pixel never measured: its median is NaN, replaced below
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(depth, axis=0)
        median = np.where(np.isnan(median), np.nanmedian(depth), median)
        return np.broadcast_to(median, (num,) + median.shape)
    labels = np.where(train.label == 255, -1, train.label.astype(np.int64))
    classes = labels.max() + 1
    counts = np.stack([(labels == c).sum(0) for c in range(classes)])
    return np.broadcast_to(counts.argmax(0), (num,) + counts.shape[1:])


def score(pred: np.ndarray, frames: Frames, task: str, num_classes: int = 0, class_names=None,
          max_depth: float = 10.0) -> dict:
    """The transfer metrics of predictions over `frames`: δ1, AbsRel, RMSE, ... (per image, averaged)
    or mIoU, pixel accuracy and per-class IoU."""
    weight = np.ones(len(pred), np.float32)
    if task == "depth":
        sums = metrics.depth_metric_sums(jnp.asarray(pred), jnp.asarray(frames.depth_m), jnp.asarray(weight),
                                         min_depth=1e-3, max_depth=max_depth)
        return metrics.depth_metrics(jax.device_get(sums), "image")
    confusion = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(frames.label), jnp.asarray(weight),
                                         num_classes)
    return metrics.segmentation_metrics(np.asarray(confusion), class_names)



def class_shares(labels: np.ndarray, class_names) -> dict:
    """{class name: share of the labelled pixels}."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels != 255].ravel().astype(np.int64), minlength=len(class_names))
    return {name: float(c) / max(counts.sum(), 1) for name, c in zip(class_names, counts)}


def with_object_miou(seg: dict, stuff=("floor", "wall", "ceiling")) -> dict:
    """Segmentation metrics (with per_class_iou) plus `object_miou`: the mean IoU over the classes that
    are not layout (`stuff`), which the layout classes' large share would otherwise hide."""
    ious = [v for k, v in seg["per_class_iou"].items() if k not in stuff and v is not None]
    return {**seg, "object_miou": float(np.mean(ious)) if ious else 0.0}


def image_blind_metrics(train: Frames, evaluation: Frames, class_names, max_depth: float = 10.0) -> dict:
    """{"depth": ..., "segmentation": ...}: the image-blind predictor of `train` scored on `evaluation`."""
    n = len(evaluation.rgb)
    return {"depth": score(image_blind_predictions(train, n, "depth"), evaluation, "depth", max_depth=max_depth),
            "segmentation": with_object_miou(score(image_blind_predictions(train, n, "segmentation"), evaluation,
                                                   "segmentation", len(class_names), class_names))}
