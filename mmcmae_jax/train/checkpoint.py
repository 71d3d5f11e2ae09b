"""Orbax checkpoints of the train state together with the input iterator's position.

A checkpoint step holds two items: `state` (the plain-dict train state: step, params, opt_state) and
`data` (the grain iterator state, one JSON file per process), so a resumed run reads exactly the
batches an uninterrupted run would have read. Saves are asynchronous; the newest `keep` are kept.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import warnings

import grain
from absl import logging as absl_logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from mmcmae_jax.errors import CheckpointError, debug_requested, one_line

log = logging.getLogger(__name__)


class Checkpointer:
    """A CheckpointManager whose failures end the run at once, in one line: a save that fails in the
    background is found at the next step (not at the next save), and its temporary folder is removed;
    a checkpoint that does not read back is skipped for the newest one that does, saying which and why."""

    def __init__(self, directory: str, keep: int = 3, every_steps: int = 1000, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data"),
            # cleanup_tmp_directories: a save cut off by a kill leaves a temporary folder; a new start removes it.
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                                 enable_async_checkpointing=async_save, create=True,
                                                 cleanup_tmp_directories=True),
        )
        self._pending = None  # the step of a save still being written in the background
        self._failed = False
        self._failed_step = None
        _quiet_orbax_tracebacks()
        if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
            sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as err:  # noqa: BLE001 -- the previous save's background failure surfaces here too
            self._fail(self._pending if self._pending is not None else step, step, err)
        if saved:
            self._pending = step
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def check_saved(self, step: int) -> None:
        """Raise CheckpointError if the background save has ended in failure; `step` is the current one.
        Costs no wait: it reads a flag while the save is under way."""
        if self._pending is None or self.manager.is_saving_in_progress():
            return
        pending, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()  # returns at once: the save has ended; raises its error
        except Exception as err:  # noqa: BLE001 -- orbax and tensorstore raise many types
            self._fail(pending, step, err)

    def _fail(self, saved_step: int, step: int, err: Exception):
        self._failed = True
        _quiet_failed_save_teardown()
        try:  # let the save's other writes end before its folder is removed (they would recreate it)
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 -- the failure being reported
            pass
        self._failed_step = saved_step
        self._remove_temporary_folder()
        intact = [s for s in self.manager.all_steps() if s != saved_step]
        resume = f"it resumes from step {max(intact)}" if intact else "it starts again from step 0"
        raise CheckpointError(f"the checkpoint of step {saved_step} could not be written to {self.directory} "
                              f"({type(err).__name__}: {one_line(err)}); the run stopped at step {step}. "
                              f"Fix the cause (disk space, permissions) and run the same command again: "
                              f"{resume}") from err

    def restore(self, abstract_state, data_iterator, step=None):
        """Restore (state, step) into the shardings of `abstract_state`; the iterator in place. Without
        `step`, the newest checkpoint that reads back: each newer one that does not is renamed
        STEP.unreadable (kept for a look, out of the way of the next save) and named on stderr."""
        if step is not None:
            try:
                return self._restore(abstract_state, data_iterator, step), step
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"the checkpoint of step {step} in {self.directory} cannot be read "
                                      f"({type(err).__name__}: {one_line(err)})") from err
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for candidate in steps:
            try:
                state = self._restore(abstract_state, data_iterator, candidate)
            except Exception as err:  # noqa: BLE001 -- a corrupt checkpoint fails in many ways
                aside = os.path.join(self.directory, f"{candidate}.unreadable")
                print(f"warning: skipping the checkpoint of step {candidate} in {self.directory}: it cannot be "
                      f"read ({type(err).__name__}: {one_line(err)[:300]}); moved to {aside}",
                      file=sys.stderr, flush=True)
                if jax.process_index() == 0:
                    os.replace(os.path.join(self.directory, str(candidate)), aside)
                continue
            if candidate != steps[0]:
                self.manager.reload()
            return state, candidate
        raise CheckpointError(f"no checkpoint in {self.directory} can be read (steps {sorted(steps)} were "
                              f"tried and moved to STEP.unreadable); remove the folder to start again")

    def _restore(self, abstract_state, data_iterator, step):
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and "data" in self.manager.item_metadata(step):
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def wait(self):
        """Wait for the last save; a failure raises CheckpointError."""
        pending, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            self._fail(pending if pending is not None else -1, pending or 0, err)

    def _remove_temporary_folder(self):
        if jax.process_index() != 0:
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{self._failed_step}.") and "orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def close(self):
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 -- a failed save reported already raises again here
            if not self._failed:
                raise
        if self._failed:
            # Once the manager's threads have all ended: one still writing when the error was raised
            # can recreate the temporary folder after `_fail` removed it.
            self._remove_temporary_folder()


class _DropOrbaxTracebacks(logging.Filter):
    """Orbax logs a failed background save with its traceback, from its own thread; the trainer raises
    that failure as one CheckpointError line, so the traceback is shown only with MMCMAE_DEBUG=1."""

    def filter(self, record):
        return not (record.exc_info and "orbax" in record.pathname and not debug_requested())


class _DropFailedSaveEcho(logging.Filter):
    """After a failed save the unfinished writes of its other arrays end with the same error, and asyncio
    logs each one at exit ("exception was never retrieved"): hundreds of lines after the one line."""

    def filter(self, record):
        return debug_requested() or "exception was never retrieved" not in record.getMessage()


def _quiet_failed_save_teardown():
    """Keep the failure one line: drop asyncio's echoes of the failed save's other writes at exit, and
    the warning for a write the failed save had created but never started (collected at exit, a race)."""
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropFailedSaveEcho) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropFailedSaveEcho())
    if not debug_requested():
        warnings.filterwarnings("ignore", message=r"coroutine '.*serialize.*' was never awaited",
                                category=RuntimeWarning)


def _drop_closed_loop_callbacks(hook):
    """An unraisable-exception hook that drops what tensorstore's threads report when a failed save's
    other writes complete after orbax closed the save's event loop ("Event loop is closed"; a race, up
    to hundreds of lines beside the one error line), and passes everything else to `hook`."""
    def unraisablehook(unraisable):
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == (
            "Event loop is closed")
        if debug_requested() or not closed_loop:
            hook(unraisable)
    unraisablehook.drops_closed_loop_callbacks = True
    return unraisablehook


def _quiet_orbax_tracebacks():
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxTracebacks) for f in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxTracebacks())


def checkpoint_dir(workdir_or_checkpoints: str) -> str:
    """A trainer's work directory keeps its checkpoints in `checkpoints/`; accept either path."""
    nested = os.path.join(workdir_or_checkpoints, "checkpoints")
    return os.path.abspath(nested if os.path.isdir(nested) else workdir_or_checkpoints)


_PYTREE_MARKERS = ("_METADATA", "manifest.ocdbt")


def _is_pytree_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _PYTREE_MARKERS)


def find_pytree_dir(path: str, step=None) -> str:
    """The orbax PyTree directory under `path`: a work directory, its `checkpoints/` folder (the latest
    step, or `step`), a step folder, or a PyTree directory itself (e.g. a StandardCheckpointer's)."""
    path = os.path.abspath(path)
    if _is_pytree_dir(path):
        return path
    # A step folder (named by its step: a work directory can hold PyTree items too, e.g. frozen_encoder/).
    if os.path.basename(path).isdigit() and os.path.isdir(path) and _step_item(path):
        return _step_item(path)
    nested = os.path.join(path, "checkpoints")  # a trainer work directory
    if os.path.isdir(nested) and not any(n.isdigit() for n in os.listdir(path)):
        path = nested
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    steps = sorted(int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n)))
    if not steps:
        raise FileNotFoundError(f"{path!r} holds no orbax checkpoint (no step folders, no {_PYTREE_MARKERS[0]})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no step {step} in {path!r}; steps there: {steps}")
    step_dir = os.path.join(path, str(step))
    if _is_pytree_dir(step_dir):
        return step_dir
    if _step_item(step_dir):
        return _step_item(step_dir)
    raise FileNotFoundError(f"step folder {step_dir!r} holds no PyTree item")


def _step_item(step_dir: str) -> str | None:
    """The PyTree item of a CheckpointManager step folder: the trainer's train state is `state`, a single
    unnamed item `default`; else the first other item. None when it holds none."""
    items = [n for n in ("state", "default") if _is_pytree_dir(os.path.join(step_dir, n))]
    items += sorted(n for n in os.listdir(step_dir) if n not in items and _is_pytree_dir(os.path.join(step_dir, n)))
    return os.path.join(step_dir, items[0]) if items else None


def restore_params(directory: str, step=None) -> dict:
    """The `params` of a checkpoint (the latest step by default) as NumPy arrays on the host, whatever
    mesh wrote them. `directory`: anything `find_pytree_dir` accepts; the saved item is the trainer's
    state (params under "params") or a params tree itself.

    The commands read parameters through `mmcmae_jax.run.workdir.load_params`, which calls this."""
    path = find_pytree_dir(directory, step)
    checkpointer = ocp.PyTreeCheckpointer()
    # An item folder has no step-level metadata file of its own, which orbax warns about: quiet it.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        metadata = checkpointer.metadata(path)
    finally:
        absl_logging.set_verbosity(verbosity)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = checkpointer.restore(path, restore_args=restore_args)
    if isinstance(restored, dict) and isinstance(restored.get("params"), dict):
        restored = restored["params"]
    if not isinstance(restored, dict):
        raise ValueError(f"{path}: the restored item is a {type(restored).__name__}, not a params dict")
    return restored


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
