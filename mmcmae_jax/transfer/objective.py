"""Fine-tuning as an `Objective` for the one trainer: RGB in, depth or segmentation out.

    loss_fn(params, frozen, batch, rng) -> (loss, metrics)

`params` are the trained parameters: {"rgb_encoder", "head"}, or only {"head"} with a frozen encoder,
which then arrives in `frozen` (no gradient, no optimiser state). The encoder start (a pre-training
checkpoint, ImageNet MAE weights, or scratch) and the layer-wise learning-rate decay live here too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmcmae_jax.config import ConfigError
from mmcmae_jax.models import matmul
from mmcmae_jax.models.vit import parse_variant
from mmcmae_jax.objectives import Objective, with_matmul_precision
from mmcmae_jax.transfer import losses
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
        validf = valid.astype(jnp.float32)
        abs_rel = jnp.sum(jnp.abs(pred - target) / jnp.where(valid, target, 1.0) * validf) / jnp.maximum(
            jnp.sum(validf), 1.0)
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


# The config.model fields that decide the RGB encoder's parameters (image_size with learned positions only).
ENCODER_FIELDS = ("variant", "image_size", "pos_embed", "use_cls_token")


def _check_shapes(found, template, config: ml_collections.ConfigDict):
    """Raise ConfigError when the encoder `found` in config.init_from does not fit config.model's
    `template`, saying both models in words (see `_encoder_mismatch`)."""
    mismatched = []

    def compare(path, a, b):
        if tuple(np.shape(a)) != tuple(b.shape):
            mismatched.append(f"{jax.tree_util.keystr(path)}: {tuple(np.shape(a))} vs {tuple(b.shape)}")
    try:
        jax.tree_util.tree_map_with_path(compare, found, template)
    except ValueError as err:  # different tree structure; JAX's account of it spans many lines
        brief = " ".join(str(err).split())
        brief = brief if len(brief) <= 200 else brief[:200] + " ..."
        raise ConfigError(_encoder_mismatch(config, found, f"another structure: {brief}")) from None
    if mismatched:
        raise ConfigError(_encoder_mismatch(config, found, f"other shapes: {mismatched[:3]}"))


def _weights_summary(encoder) -> str:
    """What the weights alone tell of an encoder (width, blocks, patch); heads and image size they do not."""
    try:
        patch, _, _, width = np.shape(encoder["patch_embed"]["proj"]["kernel"])
        return f"width {width}, {len(encoder['blocks'])} blocks, patch {patch}"
    except (KeyError, TypeError, ValueError):
        return "an encoder of another layout"


def _encoder_mismatch(config: ml_collections.ConfigDict, found, detail: str) -> str:
    """The message for an init_from encoder that does not fit config.model: the checkpoint's variant and
    image size (from the config.json its run recorded) against config.model's, and the overrides that
    make config.model the checkpoint's. The raw tree difference only when config.json cannot explain it."""
    from mmcmae_jax.train.checkpoint import recorded_config, recorded_field
    model = config.model
    where = f"config.init_from={config.init_from!r}"
    ours = f"{model.variant} at {model.image_size} px"
    recorded = recorded_config(config.init_from) or {}
    theirs = {k: recorded_field(recorded, f"model.{k}") for k in ENCODER_FIELDS}
    if theirs["variant"] is None:
        return (f"{where}: its RGB encoder ({_weights_summary(found)}) does not fit config.model, {ours}; "
                f"no config.json of its run is there to name its variant and image size: set "
                f"--config.model.variant (and image_size) to the pre-training run's ({detail})")
    differ = [k for k in ENCODER_FIELDS if theirs[k] is not None and theirs[k] != model[k]]
    if not differ:  # the record agrees with config.model, yet the weights do not
        return (f"{where}: its RGB encoder does not fit config.model, {ours}, although its run's config.json "
                f"records that model, so the config.json does not describe these weights ({detail})")
    head = (f"{where}: its RGB encoder is {theirs['variant']} at {theirs['image_size']} px (its run's "
            f"config.json) but config.model is {ours}")
    overrides = " ".join(f"--config.model.{k}={theirs[k]}" for k in differ)
    note = ""
    if "image_size" in differ and theirs["pos_embed"] == "sincos":
        note = " (with sin-cos positions image_size may also stay as it is)"
    return f"{head}; fine-tune it with {overrides}{note}"


def start_encoder(config: ml_collections.ConfigDict):
    """The RGB encoder's starting parameters as NumPy, or None to start from scratch.

    config.init_from: a work directory of stage 1, stage 2 or a fine-tuning run (its `rgb_encoder`);
    config.init_from_mae: ImageNet MAE / timm ViT weights (.pth, .safetensors), read by the port."""
    template = encoder_template(config)
    if config.init_from:
        from mmcmae_jax.train.checkpoint import restore_params
        try:
            params = restore_params(config.init_from)
        except (FileNotFoundError, OSError, ValueError) as err:
            raise ConfigError(f"config.init_from={config.init_from!r}: {err}") from None
        if ENCODER not in params:
            raise ConfigError(f"config.init_from={config.init_from!r}: the checkpoint has no {ENCODER!r} "
                             f"(it has {sorted(params)})")
        encoder = params[ENCODER]
        _check_shapes(encoder, template, config)
        return encoder
    if config.init_from_mae:
        from mmcmae_jax.port.mae_import import load_mae_into_encoder
        try:
            return load_mae_into_encoder(config.init_from_mae, template, in_chans=3,
                                         image_size=config.model.image_size)
        except (ValueError, OSError, KeyError) as err:
            raise ConfigError(f"config.init_from_mae={config.init_from_mae!r}: {err}") from None
    return None


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
