"""Pre-training command, for one stage or for stage 1 then stage 2.

    python -m mmcmae_jax.pretrain --config configs/demo.py --workdir /tmp/m3_demo
    python -m mmcmae_jax.pretrain --config configs/m3_stage1.py:vit_b16 --workdir gs://bucket/m3/stage1 \
        --config.data.path=gs://bucket/scannet_records

A config with `stages` (e.g. configs/demo.py) runs each stage in WORKDIR/<stage name>; a stage-2 config
there whose `init_from` is empty starts from, and distils, the stage-1 run before it. Re-running the
same command resumes from the newest checkpoint in the work directory.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally FILE.py:PRESET.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: checkpoints, metrics, pictures.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("MMCMAE_COORDINATOR_ADDRESS"),
                                   "host:port of process 0, for multi-process runs off TPU/SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("MMCMAE_NUM_PROCESSES", 0)) or None,
                                      "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("MMCMAE_PROCESS_ID", -1)),
                                   "This process's index in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: initialise jax.distributed on TPU pods, under SLURM, or when a "
                                 "coordinator is given.")


def initialize_distributed():
    """jax.distributed.initialize, with the coordinator from flags/environment or auto-detected."""
    import jax
    explicit = _COORDINATOR.value is not None
    cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    if _DISTRIBUTED.value == "off" or (_DISTRIBUTED.value == "auto" and not (explicit or cluster)):
        return
    if explicit:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value < 0:
            raise app.UsageError("--coordinator_address needs --num_processes and --process_id "
                                 "(or MMCMAE_NUM_PROCESSES / MMCMAE_PROCESS_ID)")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    else:
        jax.distributed.initialize()  # TPU pod slices and SLURM are detected by JAX itself
    logging.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count())


def check_workdir(workdir: str) -> None:
    """Refuse a --workdir that is a file, before anything is written (pretrain and finetune)."""
    from mmcmae_jax.config import ConfigError
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir}: is a file, not a directory")


def run(config, workdir: str) -> dict:
    """Run every stage of `config` (or the config itself, if it is one stage). Returns {stage: result}."""
    from mmcmae_jax.config import ConfigError, validate_training
    check_workdir(workdir)
    if "stages" not in config:
        return {"train": run_stage(config, workdir, "train")}
    for name in config.stages:  # every stage's config is checked before the first one starts
        try:
            validate_training(config[name])
        except ValueError as err:
            raise ConfigError(str(err).replace("config.", f"config.{name}.", 1)) from None
    results, previous = {}, None
    for name in config.stages:
        stage_config = config[name]
        stage_dir = os.path.join(workdir, name)
        if stage_config.objective.stage == 2 and not stage_config.init_from and previous is not None:
            with stage_config.unlocked():
                stage_config.init_from = previous
        results[name] = run_stage(stage_config, stage_dir, name)
        if results[name].preempted:
            break
        previous = stage_dir
    return results


def run_stage(config, workdir: str, name: str):
    from mmcmae_jax.config import validate_training
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.pictures import stage2_picture_fn
    from mmcmae_jax.train.trainer import train

    validate_training(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    objective = make_objective(config)
    iterator = make_train_iterator(config, "config.data" if name == "train" else f"config.{name}.data")
    images_fn = stage2_picture_fn(objective, config, workdir) if config.objective.stage == 2 else None
    frozen, initial_params = stage1_start(config, objective, name)
    print(f"[{name}] stage {config.objective.stage}, {config.model.variant} at {config.model.image_size}px, "
          f"global batch {config.batch_size}, {config.total_steps} steps -> {workdir}", flush=True)
    return train(config, workdir, iterator, objective, name=name, images_fn=images_fn, frozen=frozen,
                 initial_params=initial_params)


def stage1_start(config, objective, name: str = "stage2"):
    """(frozen teachers, initial_params) of a run: encoders from ImageNet MAE weights (config.init_from_mae)
    and/or, in stage 2, from the stage-1 checkpoint in config.init_from, which also gives the teachers."""
    from mmcmae_jax.objectives import init_stage2_from_stage1, teacher_params_from_stage1
    from mmcmae_jax.train.checkpoint import restore_params
    stage2 = config.objective.stage == 2
    if stage2 and objective.teacher is not None and not config.init_from:
        raise ValueError("config.init_from: stage 2 distils the stage-1 encoders, so it needs the stage-1 "
                         "work directory (or set config.objective.weights.distill=0)")
    if stage2 and not config.init_from and not config.init_from_mae:
        # Right for the baselines (MAE, MultiMAE-, Mask3D-style), wrong for M3 and its ablations: say so.
        print(f"[{name}] the encoders start from random weights: config.init_from and config.init_from_mae "
              "are empty (M3's stage 2 and its ablations start from stage 1: --config.init_from=W/stage1)",
              flush=True)
    stage1 = restore_params(config.init_from) if stage2 and config.init_from else None
    frozen = teacher_params_from_stage1(stage1, tuple(config.objective.inputs)) if objective.teacher else None
    if stage1 is None and not config.init_from_mae:
        return frozen, None

    def initial_params(params):
        if config.init_from_mae:
            from mmcmae_jax.port.mae_import import init_encoders_from_mae
            try:
                params = init_encoders_from_mae(params, config.init_from_mae, image_size=config.model.image_size)
            except (ValueError, OSError) as err:
                raise ValueError(f"config.init_from_mae={config.init_from_mae!r}: {err}") from None
        if stage1 is not None:
            try:
                params = init_stage2_from_stage1(params, stage1)
            except ValueError as err:
                raise ValueError(f"config.init_from={config.init_from!r}: {err}") from None
        return params

    return frozen, initial_params


def make_train_iterator(config, data_field: str = "config.data"):
    """The grain iterator of this process's share of every global batch, at the model's image size;
    `data_field` names config.data in errors."""
    import jax
    from mmcmae_jax.data import pipeline_from_config
    if config.batch_size % jax.process_count():
        raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                         f"{jax.process_count()} processes")
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.batch_size = config.batch_size // jax.process_count()
        data.image_size = config.model.image_size
        data.seed = config.seed
    from mmcmae_jax.config import ConfigError
    try:
        return pipeline_from_config(data, train=True, name=data_field)
    except FileNotFoundError as err:  # a path that does not exist: name the field that gave it
        raise ConfigError(f"{data_field}.path={data.path!r}: {err}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    initialize_distributed()
    from mmcmae_jax.config import ConfigError
    try:
        results = run(_CONFIG.value, _WORKDIR.value)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if any(result.preempted for result in results.values()):
        sys.exit(143)  # stopped by SIGTERM after saving: not finished, so a `&&` chain stops here


if __name__ == "__main__":
    from mmcmae_jax.config import parse_config_flags
    app.run(main, flags_parser=parse_config_flags)
