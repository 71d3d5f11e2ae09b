"""Evaluation command: a fine-tuning checkpoint on its evaluation set; prints a table, writes JSON.

    python -m mmcmae_jax.evaluate --config configs/finetune_nyu_depth.py --workdir W/nyu_depth \
        [--step N] [--out results.json] [--config.eval_data.path=NYU_TEST] [--config.eval.nyu_crop=True]

The config is the one the run was fine-tuned with (it fixes the model and head; one whose task, model
or head differs from the work directory's config.json is refused before restoring); evaluation options
(`eval_data`, `eval.*`) can be changed here. --workdir may also name the run's checkpoints/ folder.
Depth: δ1-3, AbsRel, SqRel, RMSE, RMSE-log, log10 in metres; segmentation: mIoU, pixel accuracy, mean
class accuracy, per-class IoU (docs/transfer.md). Default output: WORKDIR/eval/step_N.json.
"""
from __future__ import annotations

from absl import flags

from mmcmae_jax.errors import ConfigError
from mmcmae_jax.run import cli

_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_OUT = flags.DEFINE_string("out", None, "Results JSON; default WORKDIR/eval/step_N.json.")


def main(config, workdir: str) -> int:
    import os
    from mmcmae_jax.run.workdir import evaluate_workdir
    from mmcmae_jax.transfer.config import validate_finetune
    validate_finetune(config)
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir}: no such directory (the fine-tuning run's work directory)")
    try:
        evaluate_workdir(config, workdir, _STEP.value, _OUT.value)
    except FileNotFoundError as err:  # no checkpoint (or no such --step) in the given work directory
        raise ConfigError(f"--workdir={workdir}: {err}") from None
    return 0


if __name__ == "__main__":
    cli.run_command(main, distributed=False)
