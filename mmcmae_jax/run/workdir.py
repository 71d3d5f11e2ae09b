"""The work directory of a run, as the commands write and read it.

    W/config.json            the run's config (written at start, read by later runs and commands)
    W/checkpoints/STEP/      orbax checkpoints of the train state (train/checkpoint.py)
    W/frozen_encoder/        a frozen-encoder fine-tuning run's encoder, which its checkpoints leave out
    W/eval/step_N.json       evaluation results of fine-tuning runs
    W/stage1/, W/stage2/     a two-stage pre-training run: one work directory per stage

One reader of each: `read_config` for config.json, `load_params` for parameters.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Mapping

import numpy as np

from mmcmae_jax.errors import CheckpointError, ConfigError, unreadable_as

RUN_CONFIG = "config.json"
FROZEN_ENCODER_DIR = "frozen_encoder"


def check_workdir(workdir: str) -> None:
    """Refuse a --workdir that is a file or cannot be written to, before anything is built: found later,
    it would end the run at its first metrics line or checkpoint."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir}: is a file, not a directory")
    if "://" in workdir:  # a bucket: written through its own client, which reports its own errors
        return
    existing = os.path.abspath(workdir)  # the directory itself, or the ancestor it would be made in
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"--workdir={workdir}: cannot write there ({err.strerror or err}); "
                          "give a directory this process can write to") from None


def write_config(config, workdir: str) -> None:
    """Create the work directory and record the run's config in it."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RUN_CONFIG), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))


def run_workdir(path: str) -> str | None:
    """The work directory W that `path` names (W, W/checkpoints, W/checkpoints/STEP or
    W/checkpoints/STEP/ITEM), or None (a file, a standalone PyTree directory)."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    for _ in range(3):  # the checkpoints/ folder itself, a step folder, an item folder in it
        if os.path.basename(path) == "checkpoints":
            return os.path.dirname(path)
        path = os.path.dirname(path)
    return None


def config_path(path: str) -> str:
    """Where the run that `path` names (see `run_workdir`) keeps its config.json."""
    return os.path.join(run_workdir(path) or os.path.abspath(path), RUN_CONFIG)


def read_config(path: str) -> dict | None:
    """The config the run that `path` names recorded (see `run_workdir`), as a dict; None when there is
    none (older runs, standalone checkpoints). ValueError naming the file when it does not parse."""
    file = config_path(path)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{file}: cannot read the run's config ({err})") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{file}: holds a {type(recorded).__name__}, not a config")
    return recorded


def stage_workdirs(path: str) -> list:
    """The stage work directories in a two-stage work directory (W/stage1, W/stage2), or [] when `path`
    is no such directory."""
    path = os.path.abspath(path)
    if not os.path.isdir(path) or run_workdir(path) is not None:
        return []
    return [name for name in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, name, RUN_CONFIG))
            and os.path.isdir(os.path.join(path, name, "checkpoints"))]


def save_frozen_encoder(workdir: str, encoder: Mapping) -> None:
    """Write the encoder a frozen-encoder run reads, so that its checkpoints restore on their own."""
    import jax
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.path.join(workdir, FROZEN_ENCODER_DIR))
    if not os.path.exists(path):
        ocp.PyTreeCheckpointer().save(path, jax.tree.map(np.asarray, encoder))


def _load_frozen_encoder(workdir: str) -> dict:
    from mmcmae_jax.train.checkpoint import restore_params
    path = os.path.join(workdir, FROZEN_ENCODER_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{workdir!r} holds a frozen-encoder run's head but not its encoder "
                                f"({FROZEN_ENCODER_DIR}/ is missing)")
    return restore_params(path)


def _to_dict(tree) -> dict:
    return {str(k): (_to_dict(v) if isinstance(v, Mapping) else np.asarray(v)) for k, v in tree.items()}


def _take_params(tree, where: str) -> dict:
    if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
        tree = tree["params"]
    if not isinstance(tree, Mapping):
        raise ValueError(f"{where}: the restored item is a {type(tree).__name__}, not a params dict")
    return _to_dict(tree)


def _step_of(pytree_dir: str) -> int | None:
    """The step of a checkpoint's PyTree directory (W/checkpoints/STEP or W/checkpoints/STEP/ITEM)."""
    for name in (os.path.basename(pytree_dir), os.path.basename(os.path.dirname(pytree_dir))):
        if name.isdigit():
            return int(name)
    return None


def load_params(path: str, step: int | None = None) -> tuple[dict, int | None]:
    """(params as NumPy, step) of a checkpoint: a work directory, its checkpoints/ folder (the latest
    step, or `step`), a step folder, an orbax PyTree directory, or a `.msgpack` / `.safetensors` file
    (safetensors keys are Flax paths joined by '/'; the step is then None). A frozen-encoder fine-tuning
    run's checkpoints hold only the head: its frozen encoder is added.

    The one reader of parameters for the commands: fine-tuning's start, evaluation and export. A file or
    checkpoint that exists but does not read raises CheckpointError naming it."""
    if os.path.isfile(path):
        if path.endswith(".msgpack"):
            from flax import serialization
            with open(path, "rb") as f:
                data = f.read()
            with unreadable_as(CheckpointError, path, "a msgpack file of params"):
                tree = serialization.msgpack_restore(data)
            return _take_params(tree, path), None
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            from mmcmae_jax.port.timm_layout import unflatten
            with unreadable_as(CheckpointError, path, "a safetensors file"):
                tensors = load_file(path)
            tree = unflatten({tuple(k.split("/")): v for k, v in tensors.items()})
            return _take_params(tree, path), None
        raise ValueError(f"{path!r}: expected a checkpoint directory, a .msgpack or a .safetensors file")
    from mmcmae_jax.train.checkpoint import find_pytree_dir, restore_params
    from mmcmae_jax.transfer.objective import ENCODER
    pytree_dir = find_pytree_dir(path, step)
    with unreadable_as(CheckpointError, pytree_dir, "an orbax checkpoint"):
        params = _to_dict(restore_params(pytree_dir))
    workdir = run_workdir(path)
    if workdir is not None and "head" in params and ENCODER not in params:
        params[ENCODER] = _to_dict(_load_frozen_encoder(workdir))
    return params, _step_of(pytree_dir)


def checkpoint_location(path: str, step: int | None = None) -> tuple[str, int | None]:
    """(the PyTree directory or file, its step) that `load_params(path, step)` reads, found without
    restoring it; the step of a file of params is None."""
    if os.path.isfile(path):
        return os.path.abspath(path), None
    from mmcmae_jax.train.checkpoint import find_pytree_dir
    pytree_dir = find_pytree_dir(path, step)
    return pytree_dir, _step_of(pytree_dir)


def evaluate_workdir(config, workdir: str, step: int | None = None, out: str | None = None, *,
                     overwrite: bool = True, resolution=None) -> dict:
    """Evaluate a fine-tuning checkpoint (the latest by default) on config.eval_data, print the table,
    write the JSON (default W/eval/step_N.json). `config` must build the model the run recorded.

    An existing results file is replaced, and the line that names it says so; with overwrite=False it is
    a ConfigError before anything is evaluated. `resolution` (run/resolve.py): where the task, model
    and head came from, printed and recorded in the results."""
    from mmcmae_jax.run.mismatch import check_recorded_config
    from mmcmae_jax.transfer.evaluation import evaluate, format_results, write_results
    from mmcmae_jax.transfer.splits import require_labelled_frames
    try:
        recorded = read_config(workdir)
    except ValueError:  # an unreadable record, as of an older run: not checked
        recorded = None
    check_recorded_config(config, recorded, workdir)
    require_labelled_frames(config, "eval_data")
    step = checkpoint_location(workdir, step)[1]
    out = out or os.path.join(workdir, "eval", f"step_{step}.json")
    replaces = os.path.exists(out)
    if replaces and not overwrite:  # checked before anything is restored or evaluated
        raise ConfigError(f"{out} already holds results (written {_modified(out)}): add --overwrite to replace "
                          "it, or --out FILE to write elsewhere")
    params, step = load_params(workdir, step)
    model = config.model
    from mmcmae_jax.progress import say
    say("evaluate", f"evaluating step {step} of {os.path.abspath(workdir)}: {config.task}, {model.variant} at "
        f"{model.image_size} px ({model.pos_embed} positions), {config.head.kind} head"
        + (f"; {resolution.source()}" if resolution is not None else ""))
    results = evaluate(config, params)
    results.update(step=step, workdir=os.path.abspath(workdir), eval_data=config.eval_data.path or "procedural",
                   model=config.model.to_dict(), head=config.head.to_dict())
    if resolution is not None:
        results["resolution"] = resolution.as_json()
    write_results(results, out)
    print(format_results(results), flush=True)
    say("evaluate", f"results of step {step} written to {out}" + (" (it replaced the results there)" if replaces else ""))
    return results


def _modified(path: str) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
