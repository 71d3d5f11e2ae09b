"""Pre-training command, for one stage or for stage 1 then stage 2.

    python -m mmcmae_jax.pretrain --config configs/demo.py --workdir /tmp/m3_demo
    python -m mmcmae_jax.pretrain --config configs/m3_stage1.py:vit_b16 --workdir gs://bucket/m3/stage1 \
        --config.data.path=gs://bucket/scannet_records

A config with `stages` (e.g. configs/demo.py) runs each stage in WORKDIR/<stage name>; a stage-2 config
there whose `init_from` is empty starts from, and distils, the stage-1 run before it. Re-running the
same command resumes from the newest checkpoint in the work directory. Flags: mmcmae_jax/run/cli.py.
"""
from __future__ import annotations

import os

from mmcmae_jax.run import cli


def run(config, workdir: str) -> dict:
    """Check the config (every stage of it), then run every stage of `config` (or the config itself, if
    it is one stage). Returns {stage: TrainResult}."""
    from mmcmae_jax.config import validate_pretraining
    from mmcmae_jax.run.start import check_input_paths
    from mmcmae_jax.run.workdir import check_workdir
    validate_pretraining(config)
    check_workdir(workdir)
    if "stages" not in config:
        check_input_paths(config)
        return {"train": run_stage(config, workdir, "train")}
    for name in config.stages:
        check_input_paths(config[name], f"config.{name}")
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
    """Train one stage of a checked config in `workdir`; `name` labels its output and errors."""
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.pictures import stage2_picture_fn
    from mmcmae_jax.run.start import pretraining_start
    from mmcmae_jax.run.workdir import write_config
    from mmcmae_jax.train.trainer import make_train_iterator, train

    write_config(config, workdir)
    objective = make_objective(config)
    frozen, initial_params = pretraining_start(config, objective, name)  # weight files read before the data
    iterator = make_train_iterator(config, "config.data" if name == "train" else f"config.{name}.data")
    images_fn = stage2_picture_fn(objective, config, workdir) if config.objective.stage == 2 else None
    print(f"[{name}] stage {config.objective.stage}, {config.model.variant} at {config.model.image_size}px, "
          f"global batch {config.batch_size}, {config.total_steps} steps -> {workdir}", flush=True)
    return train(config, workdir, iterator, objective, name=name, images_fn=images_fn, frozen=frozen,
                 initial_params=initial_params)


def main(config, workdir: str) -> int:
    results = run(config, workdir)
    return cli.PREEMPTED if any(result.preempted for result in results.values()) else 0


if __name__ == "__main__":
    cli.run_command(main)
