"""Orbax checkpoints of the train state together with the input iterator's position.

A checkpoint step holds two items: `state` (the plain-dict train state: step, params, opt_state) and
`data` (the grain iterator state, one JSON file per process), so a resumed run reads exactly the
batches an uninterrupted run would have read. Saves are asynchronous; the newest `keep` are kept.
"""
from __future__ import annotations

import logging
import os
import signal

import grain
from absl import logging as absl_logging
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, every_steps: int = 1000, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                                 enable_async_checkpointing=async_save, create=True),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, abstract_state, data_iterator, step=None):
        """Restore (state, step) into the shardings of `abstract_state`; the iterator in place."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and "data" in self.manager.item_metadata(step):
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], step

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def checkpoint_dir(workdir_or_checkpoints: str) -> str:
    """A trainer's work directory keeps its checkpoints in `checkpoints/`; accept either path."""
    nested = os.path.join(workdir_or_checkpoints, "checkpoints")
    return os.path.abspath(nested if os.path.isdir(nested) else workdir_or_checkpoints)


def restore_params(directory: str, step=None) -> dict:
    """The `params` of a trainer checkpoint (the latest step by default) as NumPy arrays on the host,
    whatever mesh wrote them. `directory` is a work directory or its `checkpoints/` folder.

    Used to start stage 2 from stage 1, to fine-tune, and to export weights."""
    directory = checkpoint_dir(directory)
    if step is None:
        steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit()) if os.path.isdir(directory) else []
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {directory!r} (expected orbax step folders)")
        step = steps[-1]
    path = os.path.join(directory, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    # The item folder has no step-level metadata file of its own, which orbax warns about: quiet it.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        tree = checkpointer.metadata(path).item_metadata.tree
    finally:
        absl_logging.set_verbosity(verbosity)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, restore_args=restore_args)["params"]


class PreemptionFlag:
    """Set by SIGTERM (a preempted VM, `scancel`, `kill`): the loop saves a checkpoint and exits."""

    def __init__(self, install: bool = True):
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handler) if install else None

    def _handler(self, signum, frame):
        del signum, frame
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.raised = True

    def restore_handler(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
