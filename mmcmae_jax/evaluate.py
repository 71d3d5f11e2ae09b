"""Evaluation command: a fine-tuning checkpoint on its evaluation set; prints a table, writes JSON.

    python -m mmcmae_jax.evaluate --config configs/finetune_nyu_depth.py --workdir W/nyu_depth \
        [--step N] [--out results.json] [--overwrite] [--config.eval_data.path=NYU_TEST] [--config.eval.nyu_crop=True]

The task, model (variant, image size, positions) and head are the run's: taken from the config.json
the fine-tuning run wrote into its work directory, not from the config file, whose model is only its
default. A --config.FIELD=VALUE given on the command line wins, and one that differs from the run's
config.json is named in a notice (one whose shape the checkpoint does not have is refused). The config
file gives the evaluation options (`eval_data`, `eval.*`), which can be changed here too. --workdir may
also name the run's checkpoints/ folder. The first line says which step of which run is evaluated, as
what model and from where; the JSON records the same (`step`, `model`, `head`, `resolution`).

Depth: δ1-3, AbsRel, SqRel, RMSE, RMSE-log, log10 in metres; segmentation: mIoU, pixel accuracy, mean
class accuracy, per-class IoU (docs/transfer.md). Default output: WORKDIR/eval/step_N.json. An existing
results file is not replaced unless --overwrite is given: the command stops before evaluating and says
so (use --out to keep both).
"""
from __future__ import annotations

from absl import flags

from mmcmae_jax.errors import ConfigError
from mmcmae_jax.run import cli

_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_OUT = flags.DEFINE_string("out", None, "Results JSON; default WORKDIR/eval/step_N.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing results file (by default the command "
                               "stops before evaluating when the file exists).")


def main(config, workdir: str) -> int:
    import os
    from mmcmae_jax.run.resolve import take_run_fields
    from mmcmae_jax.run.workdir import evaluate_workdir
    from mmcmae_jax.transfer.config import validate_finetune
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir}: no such directory (the fine-tuning run's work directory)")
    resolution = take_run_fields(config, workdir, cli.config_overrides())
    for line in resolution.notices():
        print(line, flush=True)
    validate_finetune(config)  # as resolved: the run's fields with the flags that win
    try:
        evaluate_workdir(config, workdir, _STEP.value, _OUT.value, overwrite=_OVERWRITE.value,
                         resolution=resolution)
    except FileNotFoundError as err:  # no checkpoint (or no such --step) in the given work directory
        raise ConfigError(f"--workdir={workdir}: {err}") from None
    return 0


if __name__ == "__main__":
    cli.run_command(main, distributed=False)
