"""The command line of the training and evaluation commands: --config and --workdir, the multi-process
flags and jax.distributed start-up, and every expected failure reported as one line (exit status 2 for
bad input, 1 at run time; mmcmae_jax/errors.py).

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

from mmcmae_jax.errors import DEBUG_VARIABLE, USAGE_STATUS, ConfigError, debug_requested, one_line, run_reporting

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

_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of an expected failure (also MMCMAE_DEBUG=1) "
                           "instead of its one line.")

PREEMPTED = 143  # the exit status of a run stopped by SIGTERM after saving: not finished, so `&&` stops


# Fields a data config (data, eval_data) once had, now the run's.
RUN_FIELDS = {"batch_size": "the run's: set config.batch_size (global, over all processes)",
              "image_size": "the run's: set config.model.image_size",
              "seed": "the run's: set config.seed (shuffle and augmentation) or {data}.procedural_seed (the "
                      "procedural rooms)"}


def parse_config_flags(argv):
    """absl's flag parsing (app.run's flags_parser), with a bad flag, a --config file that does not exist
    and an override of a field the config does not have each reported in one line (exit status 2)
    instead of a traceback from inside ml_collections."""
    _check_config_file(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:  # an unknown flag, a value of the wrong type, a get_config that raised
        text = str(err)
        if "Traceback (most recent call last)" in text:  # keep what was raised, not where
            text = f"{text.split('Traceback')[0].strip()} {text.strip().splitlines()[-1].strip()}"
        _usage_error(f"{one_line(text)} (--helpfull lists the flags)")
    except (AttributeError, KeyError) as err:
        inner = err.args[0] if err.args else err  # ml_collections wraps the KeyError in an AttributeError
        if isinstance(inner, KeyError) and inner.args:
            inner = inner.args[0]
        message = " ".join(str(inner).split())
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        hint = ("; two-stage configs (configs/demo.py, configs/m3.py) keep each stage's fields under stage1. "
                "and stage2., e.g. --config.stage1.batch_size=64"
                if any(not o.startswith(("--config.stage1.", "--config.stage2.")) for o in overrides) else "")
        moved = [f"{o} is " + RUN_FIELDS[o.rsplit(".", 1)[1]].format(data=o[len("--config."):].rsplit(".", 1)[0])
                 for o in overrides if o.rsplit(".", 1)[1] in RUN_FIELDS and o.rsplit(".", 2)[-2].endswith("data")]
        if moved:  # fields the data config once had: the run owns them (the stage hint would mislead)
            hint = f"; {'; '.join(moved)}"
        _usage_error(f"no such config field: {message} (overrides given: {' '.join(overrides)}){hint}")
    except Exception as err:  # noqa: BLE001 -- the config file itself failed: a syntax error, a bad preset
        if debug_requested():
            raise
        _usage_error(f"--config: the config file does not load: {type(err).__name__}: {one_line(err)}")


def _usage_error(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_STATUS)


def _check_config_file(argv):
    """A --config FILE[.py:PRESET] that is not a file ends the command here, before ml_collections
    loads it (whose failure surfaces later as two chained tracebacks)."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg[len("--config="):]
        else:
            continue
        path = value.split(":")[0]
        if not os.path.isfile(path):
            _usage_error(f"--config={value}: no such file {os.path.abspath(path)!r}")


def loaded_config():
    """CONFIG.value, with a config file that fails to load (a syntax error, a preset it does not have)
    reported as a ConfigError naming --config: ml_collections stores the failure and raises it here."""
    try:
        return CONFIG.value
    except OSError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConfigError(f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}: "
                          f"{lines[-1] if lines else err}") from None


def config_overrides() -> dict:
    """The config fields set on the command line (--config.FIELD=VALUE), dotted, with their values: a
    command that takes fields from a run's config.json lets these win."""
    return dict(config_flags.get_override_values(flags.FLAGS["config"]))


def initialize_distributed():
    """jax.distributed.initialize, with the coordinator from flags/environment or auto-detected."""
    import jax
    explicit = _COORDINATOR.value is not None
    cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    if _DISTRIBUTED.value == "off" or (_DISTRIBUTED.value == "auto" and not (explicit or cluster)):
        return
    if explicit:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value < 0:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id "
                              "(or MMCMAE_NUM_PROCESSES / MMCMAE_PROCESS_ID)")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    else:
        jax.distributed.initialize()  # TPU pod slices and SLURM are detected by JAX itself
    logging.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count())


def run_command(body: Callable, *, distributed: bool = True):
    """Parse the command line and run body(config, workdir) -> exit status (None: 0). `distributed`:
    start jax.distributed first (training). The project's expected failures (mmcmae_jax/errors.py) end
    the command in one line on stderr: exit status 2 for a bad flag, config or input, 1 for a failure
    while running; --debug or MMCMAE_DEBUG=1 shows the traceback instead."""
    def main(argv):
        def command():
            if len(argv) > 1:
                raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)")
            if not CONFIG.present or WORKDIR.value is None:
                raise ConfigError("--config and --workdir are required")
            config = loaded_config()
            if not flags.FLAGS["verbosity"].present:
                absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
            if distributed:
                initialize_distributed()
            return body(config, WORKDIR.value)
        if _DEBUG.value:  # seen by every layer that quiets a traceback it reports itself (train/checkpoint.py)
            os.environ[DEBUG_VARIABLE] = "1"
        sys.exit(run_reporting(command))

    app.run(main, flags_parser=parse_config_flags)
