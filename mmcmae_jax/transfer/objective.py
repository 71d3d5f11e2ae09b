"""Fine-tuning as an `Objective` for the one trainer: RGB in, depth or segmentation out.

    loss_fn(params, frozen, batch, rng) -> (loss, metrics)

`params` are the trained parameters: {"rgb_encoder", "head"}, or only {"head"} with a frozen encoder,
which then arrives in `frozen` (no gradient, no optimiser state). The encoder start (a pre-training
checkpoint, ImageNet MAE weights, or scratch: mmcmae_jax/run/start.py) and the layer-wise learning-rate
decay live here too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmcmae_jax.models import matmul
from mmcmae_jax.models.vit import parse_variant
from mmcmae_jax.objectives import Objective, with_matmul_precision
from mmcmae_jax.transfer import losses, metrics
from mmcmae_jax.transfer.heads import DenseModel

ENCODER = "rgb_encoder"  # the name pre-training gives the RGB encoder, in stage 1 and stage 2


def make_model(config: ml_collections.ConfigDict) -> DenseModel:
    m = config.model
    return DenseModel(task=config.task, out_channels=1 if config.task == "depth" else config.num_classes,
                      head=config.head.kind, head_features=config.head.features,
                      reassemble_dims=tuple(config.head.reassemble_dims), hooks=tuple(config.head.hooks),
                      variant=m.variant, use_cls_token=m.use_cls_token, pos_embed=m.pos_embed,
                      image_size=m.image_size, dtype=jnp.dtype(m.dtype))


def batch_keys(task: str) -> tuple:
    return ("rgb", "depth_m") if task == "depth" else ("rgb", "label")


def label_table(config: ml_collections.ConfigDict):
    """(256,) int32 lookup: stored label -> training label (config.label_remap), or None for identity."""
    if not config.label_remap:
        return None
    table = np.full(256, config.ignore_label, np.int32)
    table[:len(config.label_remap)] = np.asarray(config.label_remap, np.int32)
    return table


def remap_labels(labels: jax.Array, table) -> jax.Array:
    """Apply a `label_table` (None: unchanged). Labels outside 0..255 stay as they are."""
    if table is None:
        return labels
    inside = (labels >= 0) & (labels < 256)
    return jnp.where(inside, jnp.asarray(table)[jnp.clip(labels, 0, 255)], labels)


def make_transfer_objective(config: ml_collections.ConfigDict) -> Objective:
    """The fine-tuning objective of `config` (see transfer/config.py)."""
    model = make_model(config)
    frozen_encoder = bool(config.freeze_encoder)
    loss_cfg = config.loss

    def full_params(params, frozen):
        if not frozen_encoder:
            return params
        return {**params, ENCODER: jax.lax.stop_gradient(frozen[ENCODER])}

    def init(rng, batch):
        params = model.init(rng, batch["rgb"])["params"]
        if frozen_encoder:  # the encoder comes in through `frozen`
            params = {k: v for k, v in params.items() if k != ENCODER}
        return params

    def depth_loss(pred, batch):
        target = batch["depth_m"]
        valid = target > 0
        if loss_cfg.max_depth > 0:
            valid = valid & (target <= loss_cfg.max_depth)
        if loss_cfg.depth == "silog":
            loss = losses.silog_loss(pred, target, valid, loss_cfg.silog_lambda, loss_cfg.silog_scale)
        else:
            loss = losses.berhu_loss(pred, target, valid, loss_cfg.berhu_threshold)
        # AbsRel as the evaluation measures it (the prediction clipped to [eval.min_depth, eval.max_depth],
        # pixels inside that range), pooled over the batch's pixels: a raw prediction can be 0 or below.
        clipped, measured, counted = metrics.depth_as_measured(pred, target, min_depth=config.eval.min_depth,
                                                               max_depth=config.eval.max_depth)
        counted = counted.astype(jnp.float32)
        abs_rel = jnp.sum(jnp.abs(clipped - measured) / jnp.where(counted > 0, measured, 1.0) * counted) / (
            jnp.maximum(jnp.sum(counted), 1.0))
        return loss, {loss_cfg.depth: loss, "abs_rel": jax.lax.stop_gradient(abs_rel)}

    table = label_table(config)

    def segmentation_loss(logits, batch):
        labels = remap_labels(batch["label"], table)
        loss = losses.cross_entropy_ignore(logits, labels, config.ignore_label)
        counted = (labels != config.ignore_label) & (labels >= 0) & (labels < config.num_classes)
        correct = (jnp.argmax(logits, -1) == labels) & counted
        pixel_acc = jnp.sum(correct) / jnp.maximum(jnp.sum(counted), 1)
        return loss, {"cross_entropy": loss, "pixel_acc": pixel_acc,
                      "label_out_of_range": losses.label_out_of_range(labels, config.num_classes,
                                                                      config.ignore_label)}

    def loss_fn(params, frozen, batch, rng):
        del rng  # no randomness in the model (no dropout, no masking)
        out = model.apply({"params": full_params(params, frozen)}, batch["rgb"])
        return depth_loss(out, batch) if config.task == "depth" else segmentation_loss(out, batch)

    def forward(params, batch, rng):
        """params: the full parameters, encoder included (see `full_params` for a frozen encoder)."""
        del rng
        return {"pred": model.apply({"params": params}, batch["rgb"])}

    return with_matmul_precision(Objective(model, init, loss_fn, forward, None, batch_keys(config.task)),
                                 config.model.matmul_precision)


def predict_fn(config: ml_collections.ConfigDict):
    """(full params, rgb) -> depth (B,H,W,1) metres or class logits (B,H,W,C); full params include
    the encoder even when it was frozen in training."""
    model = make_model(config)
    return matmul.under_precision(lambda params, rgb: model.apply({"params": params}, rgb),
                                  config.model.matmul_precision)


def encoder_template(config: ml_collections.ConfigDict):
    """The shapes of the RGB encoder's parameters (no computation)."""
    size = config.model.image_size
    shapes = jax.eval_shape(lambda: make_model(config).init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return shapes["params"][ENCODER]


def random_encoder(config: ml_collections.ConfigDict):
    """A randomly initialised RGB encoder (NumPy), fixed by config.seed: the start of a frozen-encoder
    run from scratch (a random-features baseline)."""
    size = config.model.image_size
    init = jax.jit(lambda rng: make_model(config).init(rng, jnp.zeros((1, size, size, 3)))["params"][ENCODER])
    return jax.tree.map(np.asarray, init(jax.random.key(config.seed)))


def layer_decay_scale(depth: int, decay: float):
    """update_scale for the trainer: BEiT's layer-wise learning-rate decay (Bao et al., ICLR 2022).

    Layer ids: patch embedding, cls token and position table 0; block i (0-based) i + 1; the final
    norm and the head depth + 1. The learning rate of layer l is multiplied by decay^(depth + 1 - l),
    so the head trains at the full rate and the patch embedding at decay^(depth + 1)."""
    def layer_id(path) -> int:
        names = [str(getattr(p, "key", p)) for p in path]
        if names[0] != ENCODER:
            return depth + 1
        if names[1] in ("patch_embed", "cls_token", "pos_embed"):
            return 0
        if names[1] == "blocks":
            return int(names[2].split("_")[1]) + 1
        return depth + 1  # the final norm

    def scale(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.asarray(decay ** (depth + 1 - layer_id(path)), jnp.float32), params)
    return scale


def update_scale_for(config: ml_collections.ConfigDict):
    """The trainer's update_scale for this config, or None when every leaf trains at the full rate."""
    if config.layer_decay >= 1.0 or config.freeze_encoder:
        return None
    return layer_decay_scale(parse_variant(config.model.variant).depth, config.layer_decay)
