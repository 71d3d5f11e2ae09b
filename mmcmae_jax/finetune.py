"""Fine-tuning command: the RGB encoder alone, with a dense head, for depth or semantic segmentation.

    python -m mmcmae_jax.finetune --config configs/finetune_nyu_depth.py --workdir W/nyu_depth \
        --config.init_from=W/m3/stage2 --config.data.path=NYU_TRAIN --config.eval_data.path=NYU_TEST

The encoder starts from a pre-training work directory (`init_from`, stage 1 or stage 2: its
`rgb_encoder`), from ImageNet MAE weights (`init_from_mae`), or from scratch. The run goes through the
pre-training trainer (mesh, orbax checkpoints with the input position, resume, metrics.jsonl and
TensorBoard), then evaluates its final parameters on `eval_data` and writes WORKDIR/eval/step_N.json.
Re-running the same command resumes. Flags: mmcmae_jax/run/cli.py.
"""
from __future__ import annotations

import os

from mmcmae_jax.run import cli


def train_data_path(config, workdir: str) -> str:
    """The training records: config.data.path, or the label-fraction subset of them (written once)."""
    from mmcmae_jax.data.config import records_path
    from mmcmae_jax.transfer.splits import write_label_fraction
    if config.label_fraction >= 1.0:
        return config.data.path
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.seed = config.seed  # the procedural set, made as the pipeline would make it
    path = records_path(data)
    out_dir = config.subset_dir or os.path.join(workdir, "train_subset")
    import jax
    if jax.process_index() == 0:
        manifest = write_label_fraction(path, out_dir, config.label_fraction, config.label_fraction_seed,
                                        labelled_only=config.task == "segmentation")
        print(f"[finetune] label fraction {config.label_fraction:g}: {manifest['chosen']} of "
              f"{manifest['candidates']} {'labelled ' if config.task == 'segmentation' else ''}frames -> {out_dir}",
              flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("label fraction subset written")
    return out_dir


def run_finetune(config, workdir: str, name: str = "finetune"):
    """Check the config, fine-tune, then evaluate the final parameters. Returns (TrainResult, eval
    results or None)."""
    import jax
    from mmcmae_jax.run.start import check_input_paths, start_encoder
    from mmcmae_jax.run.workdir import check_workdir, evaluate_workdir, save_frozen_encoder, write_config
    from mmcmae_jax.train.trainer import make_train_iterator, train
    from mmcmae_jax.transfer.config import validate_finetune
    from mmcmae_jax.transfer.objective import ENCODER, make_transfer_objective, random_encoder, update_scale_for
    from mmcmae_jax.transfer.splits import require_labelled_frames

    validate_finetune(config)
    check_workdir(workdir)
    check_input_paths(config)
    write_config(config, workdir)
    encoder = start_encoder(config)  # checked before any data is read
    # Segmentation on records without label maps would train on nothing (loss 0) for every step and
    # evaluate nothing at the end: refuse such a set now, not after the run.
    require_labelled_frames(config, "data")
    if config.eval.at_end:
        require_labelled_frames(config, "eval_data")
    objective = make_transfer_objective(config)

    train_config = config.copy_and_resolve_references()
    with train_config.unlocked():
        train_config.data.path = train_data_path(config, workdir)
    iterator = make_train_iterator(train_config)

    frozen, initial_params = None, None
    if config.freeze_encoder:
        frozen = {ENCODER: encoder if encoder is not None else random_encoder(config)}
        if jax.process_index() == 0:
            save_frozen_encoder(workdir, frozen[ENCODER])
    elif encoder is not None:
        def initial_params(params):
            return {**params, ENCODER: encoder}
    start = config.init_from or config.init_from_mae or "scratch"
    print(f"[{name}] {config.task}, {config.model.variant} at {config.model.image_size}px, {config.head.kind} head, "
          f"encoder from {start}{' (frozen)' if config.freeze_encoder else ''}, global batch {config.batch_size}, "
          f"{config.total_steps} steps -> {workdir}", flush=True)
    result = train(config, workdir, iterator, objective, name=name, frozen=frozen, initial_params=initial_params,
                   update_scale=update_scale_for(config))
    if result.preempted or not config.eval.at_end or jax.process_index() != 0:
        return result, None
    return result, evaluate_workdir(config, workdir)


def main(config, workdir: str) -> int:
    result, _ = run_finetune(config, workdir)
    return cli.PREEMPTED if result.preempted else 0


if __name__ == "__main__":
    cli.run_command(main)
