"""Why a checkpoint does not fit a config, said in words before anything is restored into a model.

Without these checks Flax stops with a raw ScopeParamShapeError, or a tree difference many lines long.
Each message names the config field, what the run recorded in its config.json (read by
run/workdir.py and handed in here as a dict), and the command-line overrides that make the config the
checkpoint's.
"""
from __future__ import annotations

import os

import numpy as np

from mmcmae_jax.errors import ConfigError

# The config.model fields that decide the RGB encoder's parameters (image_size with learned positions only).
ENCODER_FIELDS = ("variant", "image_size", "pos_embed", "use_cls_token")


def recorded_field(recorded: dict, field: str):
    """A dotted field ("model.variant") of a recorded config, or None when it is not there."""
    value = recorded
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


# --- fine-tuning: the encoder of config.init_from against config.model --------------------------------

def check_encoder_fits(found, template, config, recorded: dict) -> None:
    """Raise ConfigError when the encoder `found` in config.init_from does not have the shapes of
    config.model's encoder `template`, saying both models in words; `recorded`: the config its run
    recorded, {} when there is none."""
    import jax
    mismatched = []

    def compare(path, a, b):
        if tuple(np.shape(a)) != tuple(b.shape):
            mismatched.append(f"{jax.tree_util.keystr(path)}: {tuple(np.shape(a))} vs {tuple(b.shape)}")
    try:
        jax.tree_util.tree_map_with_path(compare, found, template)
    except ValueError as err:  # different tree structure; JAX's account of it spans many lines
        brief = " ".join(str(err).split())
        brief = brief if len(brief) <= 200 else brief[:200] + " ..."
        raise ConfigError(_encoder_mismatch(config, found, recorded, f"another structure: {brief}")) from None
    if mismatched:
        raise ConfigError(_encoder_mismatch(config, found, recorded, f"other shapes: {mismatched[:3]}"))


def _weights_summary(encoder) -> str:
    """What the weights alone tell of an encoder (width, blocks, patch); heads and image size they do not."""
    try:
        patch, _, _, width = np.shape(encoder["patch_embed"]["proj"]["kernel"])
        return f"width {width}, {len(encoder['blocks'])} blocks, patch {patch}"
    except (KeyError, TypeError, ValueError):
        return "an encoder of another layout"


def _encoder_mismatch(config, found, recorded: dict, detail: str) -> str:
    """The checkpoint's variant and image size (from the config.json its run recorded) against
    config.model's, and the overrides that make config.model the checkpoint's. The raw tree difference
    only when config.json cannot explain it."""
    model = config.model
    where = f"config.init_from={config.init_from!r}"
    ours = f"{model.variant} at {model.image_size} px"
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


# --- evaluation: a fine-tuning config against the one its work directory recorded -----------------------

def shape_fields(task: str, pos_embed) -> tuple:
    """The config fields, besides the task, that decide a fine-tuned model's parameter shapes: the
    encoder, the head, the classes of segmentation, the image size with learned positions only."""
    fields = ("model.variant", "model.pos_embed", "model.use_cls_token", "head.kind", "head.features",
              "head.reassemble_dims")
    if task == "segmentation":
        fields += ("num_classes",)
    if pos_embed == "learned":
        fields += ("model.image_size",)
    return fields


def _config_value(config, field: str):
    """A dotted field of `config`, as config.json records it (tuples as lists)."""
    value = config
    for key in field.split("."):
        value = value[key]
    return list(value) if isinstance(value, tuple) else value


def _override(field: str, value) -> str:
    """The command-line flag that sets `field` to a recorded `value`."""
    if isinstance(value, list):  # a tuple field: quoted for the shell
        return f"--config.{field}='({','.join(map(str, value))})'"
    return f"--config.{field}={value}"


def check_recorded_config(config, recorded: dict | None, workdir: str) -> None:
    """Raise ConfigError when a fine-tuning `config` would not build the model `workdir` was fine-tuned
    as (`recorded`: its config.json). Without one (an older run) nothing is checked."""
    if not recorded:
        return
    task = recorded_field(recorded, "task")
    if task is not None and task != config.task:
        raise ConfigError(f"{workdir!r} was fine-tuned for {task} (task={task!r} in its config.json) but "
                          f"the config is for {config.task} (config.task={config.task!r}): evaluate it with "
                          f"the config it was fine-tuned with")
    fields = shape_fields(config.task, recorded_field(recorded, "model.pos_embed"))
    differ = [f for f in fields if recorded_field(recorded, f) not in (None, _config_value(config, f))]
    if differ:
        given = ", ".join(f"config.{f}={_config_value(config, f)!r}" for f in differ)
        overrides = " ".join(_override(f, recorded_field(recorded, f)) for f in differ)
        raise ConfigError(f"{workdir!r} was fine-tuned as another {config.task} model than the config's "
                          f"({given}): evaluate it with the config it was fine-tuned with, or add "
                          f"{overrides} (from its config.json)")


# --- export: which checkpoint, and a --variant that the weights refute ----------------------------------

def check_single_stage(checkpoint: str, stages: list) -> None:
    """Raise ValueError when `checkpoint` is a two-stage work directory (holding the work directories
    `stages`): which stage to export is the user's choice (stage 2 holds M3's final encoders), so say
    how to make it instead of the checkpoint reader's "holds no orbax checkpoint"."""
    if stages:
        raise ValueError(f"{checkpoint!r} is a multi-stage work directory (stages: {', '.join(stages)}): "
                         f"give one stage's, e.g. --checkpoint {os.path.join(checkpoint, stages[-1])}")


def variant_mismatch(given: str, modality: str, wanted, found) -> str:
    """The message for a variant (`given`: the flag or the config.json field it came from) whose width,
    depth or patch differ from the `modality` encoder's weights."""
    return (f"{given} is width {wanted.width}, depth {wanted.depth}, patch {wanted.patch_size}; the "
            f"{modality} encoder has {found.width}, {found.depth}, {found.patch_size}")
