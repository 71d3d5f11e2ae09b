"""Evaluation command: a fine-tuning checkpoint on its evaluation set; prints a table, writes JSON.

    python -m mmcmae_jax.evaluate --config configs/finetune_nyu_depth.py --workdir W/nyu_depth \
        [--step N] [--out results.json] [--config.eval_data.path=NYU_TEST] [--config.eval.nyu_crop=True]

The config is the one the run was fine-tuned with (it fixes the model and head; one whose task, model
or head differs from the work directory's config.json is refused before restoring); evaluation options
(`eval_data`, `eval.*`) can be changed here. Depth: δ1-3, AbsRel, SqRel, RMSE, RMSE-log, log10 in
metres; segmentation: mIoU, pixel accuracy, mean class accuracy, per-class IoU (docs/transfer.md).
Default output: WORKDIR/eval/step_N.json.
"""
from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file, optionally FILE.py:PRESETS.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The fine-tuning work directory (or its checkpoints/ folder).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_OUT = flags.DEFINE_string("out", None, "Results JSON; default WORKDIR/eval/step_N.json.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    from mmcmae_jax.config import ConfigError
    from mmcmae_jax.transfer.evaluation import evaluate_workdir
    from mmcmae_jax.transfer.config import validate_finetune
    try:
        validate_finetune(_CONFIG.value)
        evaluate_workdir(_CONFIG.value, _WORKDIR.value, _STEP.value, _OUT.value)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from mmcmae_jax.config import parse_config_flags
    app.run(main, flags_parser=parse_config_flags)
