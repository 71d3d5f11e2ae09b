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
import shlex

from mmcmae_jax.run import cli


def run(config, workdir: str) -> dict:
    """Check the config (every stage of it), then run every stage of `config` (or the config itself, if
    it is one stage). Returns {stage: TrainResult}."""
    from mmcmae_jax.config import validate_pretraining
    from mmcmae_jax.run.start import check_input_paths
    from mmcmae_jax.run.workdir import check_workdir
    from mmcmae_jax.run.summary import print_summary
    validate_pretraining(config)
    check_workdir(workdir)
    if "stages" not in config:
        check_input_paths(config)
        result = run_stage(config, workdir, "train")
        print_summary("pretrain", [("train", workdir, result, config.total_steps)],
                      next_steps(config, workdir, result))
        return {"train": result}
    for name in config.stages:
        check_input_paths(config[name], f"config.{name}")
    results, previous, ran = {}, None, []
    for name in config.stages:
        stage_config = config[name]
        stage_dir = os.path.join(workdir, name)
        if stage_config.objective.stage == 2 and not stage_config.init_from and previous is not None:
            with stage_config.unlocked():
                stage_config.init_from = previous
        results[name] = run_stage(stage_config, stage_dir, name)
        ran.append((name, stage_dir, results[name], stage_config.total_steps))
        if results[name].preempted:
            break
        previous = stage_dir
    print_summary("pretrain", ran, next_steps(config[ran[-1][0]], ran[-1][1], ran[-1][2]))
    return results


def next_steps(config, workdir: str, result) -> list:
    """(what, command line) to run after the stage `config` that ran in `workdir`, for the summary."""
    from mmcmae_jax.run.summary import rerun_command
    if result.preempted:
        return [("resume from its checkpoint", rerun_command("mmcmae_jax.pretrain"))]
    model = [f"--config.model.variant={config.model.variant}", f"--config.model.image_size={config.model.image_size}"]
    # The other encoder fields, where they differ from the defaults the next command starts with.
    model += [f"--config.model.{field}={config.model[field]}" for field, default in
              (("pos_embed", "sincos"), ("use_cls_token", True)) if config.model[field] != default]
    if config.objective.stage == 1:
        stage2_dir = os.path.join(os.path.dirname(os.path.abspath(workdir)), "stage2")
        return [("stage 2, starting from and distilling this stage 1",
                 shlex.join(["python", "-m", "mmcmae_jax.pretrain", "--config", "configs/m3_stage2.py",
                             "--workdir", stage2_dir, f"--config.init_from={workdir}", *model,
                             f"--config.data.path={config.data.path or 'RECORDS'}"]))]
    if config.data.path:  # real data: NYU Depth V2 as the example transfer task (docs/transfer.md)
        finetune = ["configs/finetune_nyu_depth.py", "--config.data.path=NYU_TRAIN_RECORDS",
                    "--config.eval_data.path=NYU_TEST_RECORDS"]
    else:  # the procedural rooms, as the demo
        finetune = ["configs/finetune_procedural_depth.py"]
    return [("fine-tune the RGB encoder for depth",
             shlex.join(["python", "-m", "mmcmae_jax.finetune", "--config", finetune[0],
                         "--workdir", f"{os.path.abspath(workdir)}_depth", f"--config.init_from={workdir}",
                         *model, *finetune[1:]])),
            ("export the RGB encoder to PyTorch (timm)",
             shlex.join(["python", "-m", "mmcmae_jax.port.export", "--checkpoint", workdir,
                         "--out", os.path.join(workdir, "rgb_encoder.safetensors")]))]


def run_stage(config, workdir: str, name: str):
    """Train one stage of a checked config in `workdir`; `name` labels its output and errors."""
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.pictures import stage2_picture_fn
    from mmcmae_jax.progress import say
    from mmcmae_jax.run.start import pretraining_start
    from mmcmae_jax.run.workdir import write_config
    from mmcmae_jax.train.trainer import make_train_iterator, train

    write_config(config, workdir)
    objective = make_objective(config)
    frozen, initial_params = pretraining_start(config, objective, name)  # weight files read before the data
    iterator = make_train_iterator(config, "config.data" if name == "train" else f"config.{name}.data")
    images_fn = stage2_picture_fn(objective, config, workdir) if config.objective.stage == 2 else None
    say(name, f"stage {config.objective.stage}, {config.model.variant} at {config.model.image_size}px, "
              f"global batch {config.batch_size}, {config.total_steps} steps -> {workdir}")
    return train(config, workdir, iterator, objective, name=name, images_fn=images_fn, frozen=frozen,
                 initial_params=initial_params)


def main(config, workdir: str) -> int:
    results = run(config, workdir)
    return cli.PREEMPTED if any(result.preempted for result in results.values()) else 0


if __name__ == "__main__":
    cli.run_command(main)
