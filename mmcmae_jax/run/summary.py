"""The summary a training command prints at its end: for each stage the steps it ran and the wall time,
what is in its work directory and where, and what to run next.

    2025-06-01 14:09:40 [pretrain] finished
      stage1: steps 1-300 of 300 in 2m10s (0.41 s a step after the first, which compiles)
        checkpoints  /w/stage1/checkpoints (steps 200, 300)
        metrics      /w/stage1/metrics.jsonl
        ...
      next:
        fine-tune the RGB encoder for depth:
          python -m mmcmae_jax.finetune --config configs/finetune_procedural_depth.py ...
"""
from __future__ import annotations

import os
import shlex
import sys

from mmcmae_jax.progress import format_duration, say


def written(workdir: str) -> list:
    """(what, where) for each output of a run that its work directory holds now."""
    items = []
    checkpoints = os.path.join(workdir, "checkpoints")
    if os.path.isdir(checkpoints):
        steps = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
        items.append(("checkpoints", f"{checkpoints} (steps {', '.join(map(str, steps)) or 'none'})"))
    for what, name, note in (("metrics", "metrics.jsonl", ""),
                             ("TensorBoard", "tensorboard", f" (view: tensorboard --logdir {workdir})"),
                             ("config", "config.json", ""),
                             ("frozen encoder", "frozen_encoder", ""),
                             ("training subset", "train_subset", "")):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            items.append((what, path + note))
    for what, name in (("pictures", "images"), ("evaluations", "eval")):
        folder = os.path.join(workdir, name)
        files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        if files:
            items.append((what, f"{folder} ({len(files)} file{'s' * (len(files) > 1)}, the last {files[-1]})"))
    return items


def stage_lines(name: str, workdir: str, result, total_steps: int) -> list:
    """The summary of one stage: steps and time, then what its work directory holds."""
    if result.preempted:
        head = f"{name}: stopped at step {result.step} of {total_steps} (preempted), checkpoint written"
    elif result.first_step >= total_steps:
        head = f"{name}: had already finished all {total_steps} steps; nothing was trained"
    else:
        rate = ("" if result.seconds_per_step is None
                else f" ({result.seconds_per_step:.3g} s a step after the first, which compiles)")
        head = (f"{name}: steps {result.first_step + 1}-{result.step} of {total_steps} in "
                f"{format_duration(result.seconds)}{rate}")
    width = max([len(what) for what, _ in written(workdir)] + [0])
    return [head] + [f"  {what:<{width}}  {where}" for what, where in written(workdir)]


def rerun_command(module: str) -> str:
    """This process's own command line when it was started as `python -m module`, else a description."""
    if sys.argv and sys.argv[0].endswith(os.path.join(*module.split(".")) + ".py"):
        return shlex.join(["python", "-m", module, *sys.argv[1:]])
    return f"the same {module} call again"


def command_line_config() -> str | None:
    """The --config value of this process's command line (None when there is none, as in a notebook)."""
    for i, arg in enumerate(sys.argv[1:], 1):
        if arg == "--config" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--config="):
            return arg[len("--config="):]
    return None


def command_line_overrides(*fields: str) -> list:
    """The --config.FIELD=VALUE overrides of this process's command line for the given top-level fields
    (`model` also gives --config.model.variant=...)."""
    return [arg for arg in sys.argv[1:] if arg.startswith("--config.")
            and arg[len("--config."):].split("=")[0].split(".")[0] in fields]


def print_summary(command: str, stages: list, next_steps: list) -> None:
    """Print the summary of a finished (or preempted) command. stages: (name, workdir, TrainResult,
    total_steps) for each stage run; next_steps: (what, command line) pairs. Process 0 only."""
    import jax
    if jax.process_index() != 0:
        return
    lines = []
    for name, workdir, result, total_steps in stages:
        lines += ["  " + line for line in stage_lines(name, workdir, result, total_steps)]
    if next_steps:
        lines.append("  next:")
        for what, command_line in next_steps:
            lines += [f"    {what}:", f"      {command_line}"]
    stopped = any(result.preempted for _, _, result, _ in stages)
    say(command, ("stopped before the end (preempted)" if stopped else "finished") + "\n" + "\n".join(lines))
