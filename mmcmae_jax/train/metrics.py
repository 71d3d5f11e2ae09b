"""Where training reports go: the terminal (time-stamped progress with time left), TensorBoard event files
(tensorboardX, no TensorFlow), and `metrics.jsonl` for scripts. Only process 0 writes.

Evaluation results of a run (fine-tuning's periodic and final evaluations) go to the same places under
the stage `<name>_eval` (`evaluation_stage`): lines {"stage": "finetune_eval", "step": N, "abs_rel": ...}
in metrics.jsonl, tags `finetune_eval/abs_rel` in TensorBoard."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import numpy as np

from mmcmae_jax.progress import format_duration, say

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def evaluation_stage(name: str) -> str:
    """The stage under which the evaluations of run stage `name` are logged."""
    return f"{name}_eval"


TRIVIAL_SUFFIX = "_trivial"  # `<term>_trivial`: what a trivial prediction scores on the batch (losses.py)
NOT_LOSSES = ("learning_rate", "images_per_s", "grad_norm")  # printed at the end of the line, formatted


def terminal_losses(scalars: dict) -> str:
    """`name value` pairs for the terminal, a term with a trivial value as `depth 0.3123/0.9871`."""
    pairs = []
    for key, value in scalars.items():
        if key in NOT_LOSSES or (key.endswith(TRIVIAL_SUFFIX) and key[:-len(TRIVIAL_SUFFIX)] in scalars):
            continue
        trivial = scalars.get(key + TRIVIAL_SUFFIX)
        pairs.append(f"{key} {value:.4f}" + ("" if trivial is None else f"/{trivial:.4f}"))
    return " ".join(pairs)


def _summary_writer():
    """tensorboardX's SummaryWriter class. tensorboardX imports PyTorch where it is installed (3 s at each
    start) only to accept torch tensors, which are never passed here: unless torch is loaded already,
    its import is refused while tensorboardX loads."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Writes each logged step to the terminal, metrics.jsonl and TensorBoard.

    The terminal line prints a loss term that has a trivial value as `depth 0.3123/0.9871`: the loss, then
    what a prediction that learned nothing scores on the same batch (`depth_trivial`: the image mean for a
    reconstruction, no noise for denoising, uniform similarities for the contrastive loss, the batch-mean
    teacher feature for distillation; see objectives.py). At or above its second number, a term does no
    better than that trivial prediction. metrics.jsonl and TensorBoard keep both as separate keys
    (`depth`, `depth_trivial`).
    """

    def __init__(self, workdir: str, name: str, total_steps: int):
        self.workdir, self.name, self.total_steps = workdir, name, total_steps
        self.enabled = jax.process_index() == 0
        # (perf_counter, step) at the end of this process's first step, which compiles the train step:
        # step times are measured from there, so compilation counts neither in img/s nor in the time left.
        self._timed_from = None
        self._last_time, self._last_step = None, None
        self._aside = 0.0  # seconds since the last logged step spent on pictures and evaluations
        self.tensorboard = self.jsonl = None

    def start(self, step: int):
        """Open the outputs for a run (re)starting at `step`: what an earlier, interrupted run logged
        after that step (training and evaluation lines) is dropped first (it is logged again), so that
        each step is held once."""
        self._timed_from, self._last_time, self._last_step, self._aside = None, None, step, 0.0
        if not self.enabled:
            return
        SummaryWriter = _summary_writer()
        os.makedirs(self.workdir, exist_ok=True)
        stages = (self.name, evaluation_stage(self.name))
        forget_jsonl(os.path.join(self.workdir, METRICS_FILE),
                     lambda record: record.get("stage") in stages and record.get("step", 0) > step)
        forget_events(os.path.join(self.workdir, TENSORBOARD_DIR), lambda event: event.step > step)
        self.tensorboard = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR))
        self.jsonl = open(os.path.join(self.workdir, METRICS_FILE), "a", encoding="utf-8")

    def first_step_done(self, step: int):
        """Called once the first step of this process (`step`) has finished on the device: the step
        time is measured from now on."""
        now = time.perf_counter()
        self._timed_from = (now, step)
        self._last_time, self._last_step = now, step

    def seconds_per_step(self) -> float | None:
        """The mean time of the steps since the first one (compilation excluded), or None before the
        second step has been logged."""
        if self._timed_from is None or self._last_step <= self._timed_from[1]:
            return None
        return (self._last_time - self._timed_from[0]) / (self._last_step - self._timed_from[1])

    def write(self, step: int, metrics: dict, images_per_step: int) -> dict:
        """Log scalars for `step`; adds images/s since the previous call (time `set_aside` left out), and
        the time left from the mean step time since the first step (that time in: it recurs). Both are
        left out until a step after the first is logged."""
        now = time.perf_counter()
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        if self._timed_from is not None and step > self._last_step:
            training = max(now - self._last_time - self._aside, 1e-9)
            scalars["images_per_s"] = images_per_step * (step - self._last_step) / training
            self._last_time, self._last_step, self._aside = now, step, 0.0
        if self.enabled:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"{self.name}/{key}", value, step)
            self.jsonl.write(json.dumps({"stage": self.name, "step": step, **scalars}) + "\n")
            self.jsonl.flush()
            seconds_per_step = self.seconds_per_step()
            speed = "img/s -- | eta -- (timed from the next logged step: the first one compiles)"
            if seconds_per_step is not None:
                speed = (f"{scalars['images_per_s']:.1f} img/s | "
                         f"eta {format_duration(seconds_per_step * (self.total_steps - step))}")
            say(self.name, f"step {step}/{self.total_steps} | {terminal_losses(scalars)} | grad_norm "
                           f"{scalars.get('grad_norm', 0):.3f} | lr {scalars.get('learning_rate', 0):.2e} | {speed}")
        return scalars

    def set_aside(self, seconds: float):
        """`seconds` of the current step went to other work than training (pictures, evaluations): the
        next images/s leaves them out."""
        self._aside += seconds

    def write_evaluation(self, step: int, scalars: dict):
        """Log evaluation results of `step` (a flat dict of numbers) under `evaluation_stage`."""
        if self.enabled:
            _write_evaluation(self.tensorboard, self.jsonl, evaluation_stage(self.name), step, scalars)

    def write_image(self, step: int, tag: str, image: np.ndarray, png_path: str | None = None):
        if not self.enabled:
            return
        self.tensorboard.add_image(f"{self.name}/{tag}", image, step, dataformats="HWC")
        if png_path:
            from PIL import Image
            os.makedirs(os.path.dirname(png_path), exist_ok=True)
            Image.fromarray(image).save(png_path)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.jsonl.close()


def _replace_file(path: str, write) -> None:
    """Rewrite `path` through a temporary file, so that a kill midway leaves the old one whole."""
    temporary = path + ".rewrite"
    write(temporary)
    os.replace(temporary, path)


def _write_evaluation(tensorboard, jsonl, stage: str, step: int, scalars: dict):
    scalars = {k: float(v) for k, v in scalars.items()}
    for key, value in scalars.items():
        tensorboard.add_scalar(f"{stage}/{key}", value, step)
    jsonl.write(json.dumps({"stage": stage, "step": step, **scalars}) + "\n")
    jsonl.flush()


def record_evaluation(workdir: str, name: str, step: int, scalars: dict) -> None:
    """Add the evaluation of `step` of run stage `name` to metrics.jsonl and TensorBoard after the run
    (its writer closed), once: an evaluation of the same step logged before (the finished run's command
    run again) is replaced. Process 0 only, as the writer."""
    if jax.process_index() != 0:
        return
    from tensorboardX import SummaryWriter
    stage = evaluation_stage(name)
    path = os.path.join(workdir, METRICS_FILE)
    tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
    forget_jsonl(path, lambda record: record.get("stage") == stage and record.get("step") == step)
    forget_events(tensorboard_dir, lambda event: event.step == step and any(
        value.tag.startswith(stage + "/") for value in event.summary.value))
    tensorboard = SummaryWriter(tensorboard_dir)
    try:
        with open(path, "a", encoding="utf-8") as jsonl:
            _write_evaluation(tensorboard, jsonl, stage, step, scalars)
    finally:
        tensorboard.close()


def forget_jsonl(path: str, drop) -> None:
    """Drop the lines of metrics.jsonl whose record `drop(record)` is true, and a line cut off by a kill."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the last line of a run killed while writing it
        if not drop(record):
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        def write(temporary):
            with open(temporary, "w", encoding="utf-8") as f:
                f.writelines(kept)
        _replace_file(path, write)


def forget_events(directory: str, drop) -> None:
    """Drop the events for which `drop(event)` is true from the TensorBoard event files in `directory`
    (each run writes a new file; a resumed one would otherwise show the steps after its checkpoint twice)."""
    if not os.path.isdir(directory):
        return
    from tensorboardX.proto.event_pb2 import Event
    from mmcmae_jax.data.errors import RecordError
    from mmcmae_jax.data.records import TFRecordWriter, read_tfrecord
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not name.startswith("events.out.tfevents.") or not os.path.isfile(path):
            continue
        records, torn = [], False
        try:
            for _, data in read_tfrecord(path):
                records.append(data)
        except RecordError:
            torn = True  # a record cut off by a kill: the ones before it are kept
        kept = [data for data in records if not drop(Event.FromString(data))]
        if len(kept) == len(records) and not torn:
            continue

        def write(temporary, kept=kept):
            with TFRecordWriter(temporary) as writer:
                for data in kept:
                    writer.write(data)
        _replace_file(path, write)
