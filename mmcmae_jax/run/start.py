"""Where a run's parameters start: the work directory of an earlier run (config.init_from) and/or
ImageNet MAE weights (config.init_from_mae), read before any data is, with errors naming the field."""
from __future__ import annotations

import os

from mmcmae_jax.errors import CheckpointError, ConfigError
from mmcmae_jax.progress import say
from mmcmae_jax.run.mismatch import check_encoder_fits
from mmcmae_jax.run.workdir import load_params, read_config


def pretraining_start(config, objective, name: str = "stage2"):
    """(frozen teachers, initial_params) of a pre-training run: encoders from ImageNet MAE weights
    (config.init_from_mae) and/or, in stage 2, from the stage-1 checkpoint in config.init_from, which
    also gives the teachers. initial_params maps freshly initialised params to the started ones, or is
    None when nothing is started from."""
    from mmcmae_jax.objectives import init_stage2_from_stage1, teacher_params_from_stage1
    stage2 = config.objective.stage == 2
    if stage2 and objective.teacher is not None and not config.init_from:
        raise ValueError("config.init_from: stage 2 distils the stage-1 encoders, so it needs the stage-1 "
                         "work directory (or set config.objective.weights.distill=0)")
    if stage2 and not config.init_from and not config.init_from_mae:
        # Right for the baselines (MAE, MultiMAE-, Mask3D-style), wrong for M3 and its ablations: say so.
        say(name, "the encoders start from random weights: config.init_from and config.init_from_mae are "
                  "empty (M3's stage 2 and its ablations start from stage 1: --config.init_from=W/stage1)")
    stage1 = None
    if stage2 and config.init_from:
        try:
            stage1 = load_params(config.init_from)[0]
        except (OSError, ValueError, CheckpointError) as err:
            raise ConfigError(f"config.init_from={config.init_from!r}: {err}") from None
    frozen = teacher_params_from_stage1(stage1, tuple(config.objective.inputs)) if objective.teacher else None
    # The weights file is read now, before the model and the data are built: a bad file ends the run here.
    mae_weights = None
    drop_table = config.init_from_mae_drop_learned_pos_embed
    if config.init_from_mae:
        from mmcmae_jax.port.mae_import import read_state_dict
        try:
            mae_weights = read_state_dict(config.init_from_mae)
        except (ValueError, OSError, ImportError) as err:
            raise ConfigError(f"config.init_from_mae={config.init_from_mae!r}: {err}") from None
        # The position table is checked now too, not after the data and the model are built.
        prefix = "" if name == "train" else f"{name}."  # a stage of a two-stage config: config.stage1.FIELD
        _check_position_table(config, mae_weights, prefix, name)
    if stage1 is None and mae_weights is None:
        return frozen, None

    def initial_params(params):
        if mae_weights is not None:
            from mmcmae_jax.port.mae_import import init_encoders_from_mae
            try:
                params = init_encoders_from_mae(params, mae_weights, image_size=config.model.image_size,
                                                check_sincos=not drop_table)
            except ValueError as err:
                raise ConfigError(f"config.init_from_mae={config.init_from_mae!r}: {err}") from None
        if stage1 is not None:
            try:
                params = init_stage2_from_stage1(params, stage1)
            except ValueError as err:
                raise ConfigError(f"config.init_from={config.init_from!r}: {err}") from None
        return params

    return frozen, initial_params


def start_encoder(config):
    """The RGB encoder a fine-tuning run starts from, as NumPy, or None to start from scratch.

    config.init_from: a work directory of stage 1, stage 2 or a fine-tuning run (its RGB encoder);
    config.init_from_mae: ImageNet MAE / timm ViT weights (.pth, .safetensors), read by the port."""
    from mmcmae_jax.transfer.objective import ENCODER, encoder_template
    template = encoder_template(config)
    if config.init_from:
        try:
            params, _ = load_params(config.init_from)
        except (OSError, ValueError, CheckpointError) as err:
            raise ConfigError(f"config.init_from={config.init_from!r}: {err}") from None
        if ENCODER not in params:
            raise ConfigError(f"config.init_from={config.init_from!r}: the checkpoint has no {ENCODER!r} "
                              f"(it has {sorted(params)})")
        encoder = params[ENCODER]
        try:
            recorded = read_config(config.init_from) or {}
        except ValueError:  # unreadable: the explanation says what the weights tell
            recorded = {}
        check_encoder_fits(encoder, template, config, recorded)
        return encoder
    if config.init_from_mae:
        from mmcmae_jax.port.mae_import import load_mae_into_encoder, read_state_dict
        try:
            weights = read_state_dict(config.init_from_mae)
        except (ValueError, OSError, ImportError) as err:
            raise ConfigError(f"config.init_from_mae={config.init_from_mae!r}: {err}") from None
        _check_position_table(config, weights, "", "finetune")
        try:
            return load_mae_into_encoder(None, template, in_chans=3, image_size=config.model.image_size,
                                         check_sincos=not config.init_from_mae_drop_learned_pos_embed,
                                         state_dict=weights)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"config.init_from_mae={config.init_from_mae!r}: {err}") from None
    return None


def _check_position_table(config, weights: dict, prefix: str, name: str) -> None:
    """Refuse ImageNet weights with a learned position table for a sin-cos encoder unless the config
    drops the table on purpose (then say that it is dropped); `prefix` is the config's own path in a
    two-stage config ("stage1."), for the flags the message names."""
    from mmcmae_jax.models.vit import parse_variant
    from mmcmae_jax.port.mae_import import LearnedPositionTableError, check_position_table
    if config.model.pos_embed != "sincos" or "pos_embed" not in weights:
        return  # a learned-table encoder takes the table over (resampled where the grid differs)
    if config.init_from_mae_drop_learned_pos_embed:
        from mmcmae_jax.progress import say
        say(name, f"config.{prefix}init_from_mae_drop_learned_pos_embed=True: the position table of "
            f"{config.init_from_mae} is not used; the encoders keep their sin-cos positions")
        return
    where = f"config.{prefix}init_from_mae={config.init_from_mae!r}"
    try:
        check_position_table(weights, parse_variant(config.model.variant).width)
    except LearnedPositionTableError as err:
        # Both stages of a two-stage config: stage 2 starts its encoders from stage 1, table included.
        keep = (" ".join(f"--config.stage{n}.model.pos_embed=learned" for n in (1, 2)) + " (both stages)"
                if prefix.startswith("stage") else f"--config.{prefix}model.pos_embed=learned")
        raise ConfigError(f"{where}: {err.finding}; keep it with {keep}, or drop it with "
                          f"--config.{prefix}init_from_mae_drop_learned_pos_embed=True") from None
    except ValueError as err:  # a table of another width or grid: the weights do not fit this model
        raise ConfigError(f"{where}: {err}") from None


def check_input_paths(config, name: str = "config") -> None:
    """Every input a run's config names by path exists, checked before anything is built: the records
    (`data.path`, and `eval_data.path` where evaluation reads it), an earlier run (`init_from`) and
    ImageNet MAE weights (`init_from_mae`). ConfigError naming the field; `name` is the config's own path
    (config.stage2 in a two-stage run). Paths in a bucket (gs://) are left to their readers."""
    from mmcmae_jax.data.config import check_path_given
    from mmcmae_jax.data.records import expand_paths
    evaluates = config.get("eval", {}).get("at_end") or config.get("eval_every")  # at the end, or as it goes
    fields = ["data"] + (["eval_data"] if "eval_data" in config and evaluates else [])
    for field in fields:  # an empty path first: it says which config needs which records
        check_path_given(config[field], f"{name}.{field}")
    for field in fields:
        path = config[field].path
        if path and "://" not in path:
            try:
                expand_paths(path)
            except FileNotFoundError as err:
                raise ConfigError(f"{name}.{field}.path={path!r}: {err}") from None
    if config.get("init_from") and "://" not in config.init_from and not os.path.exists(config.init_from):
        raise ConfigError(f"{name}.init_from={config.init_from!r}: no such work directory or checkpoint")
    if config.get("init_from_mae") and "://" not in config.init_from_mae and not os.path.isfile(config.init_from_mae):
        raise ConfigError(f"{name}.init_from_mae={config.init_from_mae!r}: no such weights file")
