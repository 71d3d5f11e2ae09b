"""Where training reports go: the terminal (progress with time left), TensorBoard event files
(tensorboardX, no TensorFlow), and `metrics.jsonl` for scripts. Only process 0 writes."""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


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
        self._last_time, self._last_step = None, None
        self.tensorboard = self.jsonl = None

    def start(self, step: int):
        """Open the outputs for a run (re)starting at `step`: what an earlier, interrupted run logged
        after that step is dropped first (it is logged again), so that each step is held once."""
        self._last_time, self._last_step = time.perf_counter(), step
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        os.makedirs(self.workdir, exist_ok=True)
        tensorboard_dir = os.path.join(self.workdir, "tensorboard")
        forget_jsonl_after(os.path.join(self.workdir, "metrics.jsonl"), self.name, step)
        forget_events_after(tensorboard_dir, step)
        self.tensorboard = SummaryWriter(tensorboard_dir)
        self.jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, metrics: dict, images_per_step: int) -> dict:
        """Log scalars for `step`; adds images/s and time left measured since the previous call."""
        now = time.perf_counter()
        steps = step - self._last_step
        seconds_per_step = (now - self._last_time) / max(steps, 1)
        self._last_time, self._last_step = now, step
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        scalars["images_per_s"] = images_per_step / seconds_per_step if steps else 0.0
        if self.enabled:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"{self.name}/{key}", value, step)
            self.jsonl.write(json.dumps({"stage": self.name, "step": step, **scalars}) + "\n")
            self.jsonl.flush()
            losses = terminal_losses(scalars)
            eta = format_duration(seconds_per_step * (self.total_steps - step))
            print(f"[{self.name}] step {step}/{self.total_steps} | {losses} | grad_norm {scalars.get('grad_norm', 0):.3f}"
                  f" | lr {scalars.get('learning_rate', 0):.2e} | {scalars['images_per_s']:.1f} img/s | eta {eta}",
                  flush=True)
        return scalars

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


def forget_jsonl_after(path: str, name: str, step: int) -> None:
    """Drop the lines of stage `name` after `step` from metrics.jsonl, and a line cut off by a kill."""
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
        if not (record.get("stage") == name and record.get("step", 0) > step):
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        def write(temporary):
            with open(temporary, "w", encoding="utf-8") as f:
                f.writelines(kept)
        _replace_file(path, write)


def forget_events_after(directory: str, step: int) -> None:
    """Drop the events after `step` from the TensorBoard event files in `directory` (each run writes a new
    file; a resumed one would otherwise show the steps after its checkpoint twice)."""
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
        kept = [data for data in records if Event.FromString(data).step <= step]
        if len(kept) == len(records) and not torn:
            continue

        def write(temporary, kept=kept):
            with TFRecordWriter(temporary) as writer:
                for data in kept:
                    writer.write(data)
        _replace_file(path, write)
