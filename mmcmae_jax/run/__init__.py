"""What every command shares (pretrain, finetune, evaluate, port.export), so that no command imports another:

  cli       --config, --workdir, the multi-process flags, jax.distributed start-up, bad input as one line
  workdir   the work directory: its config.json, its checkpoints, their parameters, evaluation results
  start     where a run's parameters start: an earlier run's work directory or ImageNet MAE weights
  mismatch  why a checkpoint does not fit a config, in words, with the overrides that make it fit
  resolve   a run's task, model and head from its config.json, flags given winning, for evaluation
"""
