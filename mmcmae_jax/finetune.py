"""Fine-tuning command: the RGB encoder alone, with a dense head, for depth or semantic segmentation.

    python -m mmcmae_jax.finetune --config configs/finetune_nyu_depth.py --workdir W/nyu_depth \
        --config.init_from=W/m3/stage2 --config.data.path=NYU_TRAIN --config.eval_data.path=NYU_TEST

The encoder starts from a pre-training work directory (`init_from`, stage 1 or stage 2: its
`rgb_encoder`), from ImageNet MAE weights (`init_from_mae`), or from scratch. The run goes through the
pre-training trainer (mesh, orbax checkpoints with the input position, resume, metrics.jsonl and
TensorBoard), evaluates on `eval_data` every `eval_every` steps if set, then evaluates its final
parameters and writes WORKDIR/eval/step_N.json. Every evaluation also goes to metrics.jsonl and
TensorBoard (stage `finetune_eval`). Re-running the same command resumes. Flags: mmcmae_jax/run/cli.py.
"""
from __future__ import annotations

import os
import shlex

from mmcmae_jax.progress import say
from mmcmae_jax.run import cli


def train_data_path(config, workdir: str) -> str:
    """The training records: config.data.path, or the label-fraction subset of them (written once)."""
    from mmcmae_jax.data.config import records_path
    from mmcmae_jax.transfer.splits import write_label_fraction
    if config.label_fraction >= 1.0:
        return config.data.path
    path = records_path(config.data)
    out_dir = config.subset_dir or os.path.join(workdir, "train_subset")
    import jax
    if jax.process_index() == 0:
        manifest = write_label_fraction(path, out_dir, config.label_fraction, config.label_fraction_seed,
                                        labelled_only=config.task == "segmentation")
        say("finetune", f"label fraction {config.label_fraction:g}: {manifest['chosen']} of {manifest['candidates']} "
                        f"{'labelled ' if config.task == 'segmentation' else ''}frames -> {out_dir}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("label fraction subset written")
    return out_dir


def evaluation_scalars(results: dict) -> dict:
    """The numbers of evaluation results (transfer/evaluation.py) that go to metrics.jsonl and TensorBoard."""
    return {"frames": results["frames"], **{k: v for k, v in results["metrics"].items()
                                             if isinstance(v, (int, float))}}


def periodic_evaluation(config, frozen_encoder, name: str):
    """evaluate_fn(step, params) for the trainer: the parameters of `step` (with the frozen encoder, which
    the train state does not hold) on config.eval_data; the scalars on process 0, None elsewhere."""
    import jax
    from mmcmae_jax.transfer.evaluation import evaluate, make_eval_step
    from mmcmae_jax.transfer.objective import ENCODER
    eval_step = make_eval_step(config)  # compiled at the first evaluation, reused by the next ones

    def evaluate_params(step, params):
        if jax.process_count() > 1:  # every process holds a part: all of them take part in gathering
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
        else:
            params = jax.device_get(params)
        if jax.process_index() != 0:
            return None
        if frozen_encoder is not None:
            params = {**params, ENCODER: frozen_encoder}
        scalars = evaluation_scalars(evaluate(config, params, eval_step=eval_step))
        say(name, f"evaluation at step {step} on {scalars['frames']} frames: "
                  + " ".join(f"{k} {v:.4f}" for k, v in scalars.items() if k != "frames"))
        return scalars
    return evaluate_params


def evaluates_during_or_after(config) -> bool:
    """Whether the run reads config.eval_data: periodically (eval_every) or at its end (eval.at_end)."""
    return bool(config.eval.at_end or config.eval_every)


def run_finetune(config, workdir: str, name: str = "finetune"):
    """Check the config, fine-tune (evaluating every config.eval_every steps), then evaluate the final
    parameters. Returns (TrainResult, eval results of the final step or None)."""
    import jax
    from mmcmae_jax.run.start import check_input_paths, start_encoder
    from mmcmae_jax.run.summary import print_summary
    from mmcmae_jax.run.workdir import check_workdir, evaluate_workdir, save_frozen_encoder, write_config
    from mmcmae_jax.train.metrics import record_evaluation
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
    if evaluates_during_or_after(config):
        require_labelled_frames(config, "eval_data")
    objective = make_transfer_objective(config)

    train_config = config.copy_and_resolve_references()
    with train_config.unlocked():
        train_config.data.path = train_data_path(config, workdir)
    iterator = make_train_iterator(train_config, labels="label" in objective.batch_keys)

    frozen, initial_params = None, None
    if config.freeze_encoder:
        frozen = {ENCODER: encoder if encoder is not None else random_encoder(config)}
        if jax.process_index() == 0:
            save_frozen_encoder(workdir, frozen[ENCODER])
    elif encoder is not None:
        def with_encoder(params):
            return {**params, ENCODER: encoder}
        initial_params = with_encoder
    start = config.init_from or config.init_from_mae or "scratch"
    say(name, f"{config.task}, {config.model.variant} at {config.model.image_size}px, {config.head.kind} head, "
              f"encoder from {start}{' (frozen)' if config.freeze_encoder else ''}, global batch {config.batch_size}, "
              f"{config.total_steps} steps -> {workdir}")
    evaluate_fn = None
    if config.eval_every:
        evaluate_fn = periodic_evaluation(config, frozen[ENCODER] if frozen else None, name)
    result = train(config, workdir, iterator, objective, name=name, frozen=frozen, initial_params=initial_params,
                   update_scale=update_scale_for(config), evaluate_fn=evaluate_fn)
    results = None
    if not result.preempted and config.eval.at_end and jax.process_index() == 0:
        results = evaluate_workdir(config, workdir)
        record_evaluation(workdir, name, result.step, evaluation_scalars(results))
    print_summary(name, [(name, workdir, result, config.total_steps)], next_steps(config, workdir, result))
    return result, results


def next_steps(config, workdir: str, result) -> list:
    """(what, command line) to run after fine-tuning in `workdir`, for the summary."""
    from mmcmae_jax.run.summary import command_line_config, command_line_overrides, rerun_command
    if result.preempted:
        return [("resume from its checkpoint", rerun_command("mmcmae_jax.finetune"))]
    # The overrides that fix the model and the evaluation, as this command was given them.
    overrides = command_line_overrides("task", "num_classes", "class_names", "label_remap", "ignore_label",
                                       "model", "head", "eval_data", "eval")
    evaluate = ["python", "-m", "mmcmae_jax.evaluate", "--config", command_line_config() or "CONFIG.py",
                "--workdir", workdir, *overrides]
    return [("evaluate a checkpoint again, or on other data (--step N, --config.eval_data.path=...)",
             shlex.join(evaluate)),
            ("export the fine-tuned RGB encoder to PyTorch (timm)",
             shlex.join(["python", "-m", "mmcmae_jax.port.export", "--checkpoint", workdir,
                         "--out", os.path.join(workdir, "rgb_encoder.safetensors")]))]


def main(config, workdir: str) -> int:
    result, _ = run_finetune(config, workdir)
    return cli.PREEMPTED if result.preempted else 0


if __name__ == "__main__":
    cli.run_command(main)
