"""The command line of the training and evaluation commands: --config and --workdir, the multi-process
flags and jax.distributed start-up, and every bad input reported as one line (exit status 2).

    if __name__ == "__main__":
        cli.run_command(body)   # body(config, workdir) -> exit status

Importing this module defines the flags, once for every command.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mmcmae_jax.errors import ConfigError

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally FILE.py:PRESET.", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: config.json, checkpoints, metrics, pictures.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("MMCMAE_COORDINATOR_ADDRESS"),
                                   "host:port of process 0, for multi-process runs off TPU/SLURM.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("MMCMAE_NUM_PROCESSES", 0)) or None,
                                      "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("MMCMAE_PROCESS_ID", -1)),
                                   "This process's index in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: initialise jax.distributed on TPU pods, under SLURM, or when a "
                                 "coordinator is given.")

PREEMPTED = 143  # the exit status of a run stopped by SIGTERM after saving: not finished, so `&&` stops


def parse_config_flags(argv):
    """absl's flag parsing (app.run's flags_parser), with an override of a field the config does not have
    reported in one line instead of a traceback from inside ml_collections."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:
        inner = err.args[0] if err.args else err  # ml_collections wraps the KeyError in an AttributeError
        if isinstance(inner, KeyError) and inner.args:
            inner = inner.args[0]
        message = " ".join(str(inner).split())
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        hint = ("; two-stage configs (configs/demo.py, configs/m3.py) keep each stage's fields under stage1. "
                "and stage2., e.g. --config.stage1.batch_size=64"
                if any(not o.startswith(("--config.stage1.", "--config.stage2.")) for o in overrides) else "")
        print(f"error: no such config field: {message} (overrides given: {' '.join(overrides)}){hint}",
              file=sys.stderr)
        sys.exit(2)


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


def run_command(body: Callable, *, distributed: bool = True, reported: tuple = (ConfigError,)):
    """Parse the command line and run body(config, workdir) -> exit status (None: 0). `distributed`:
    start jax.distributed first (training); `reported`: the errors printed as one line, exit status 2."""
    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if CONFIG.value is None or WORKDIR.value is None:
            raise app.UsageError("--config and --workdir are required")
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
        if distributed:
            initialize_distributed()
        try:
            status = body(CONFIG.value, WORKDIR.value)
        except reported as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        sys.exit(status or 0)

    app.run(main, flags_parser=parse_config_flags)
