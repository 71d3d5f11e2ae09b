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
        self.name, self.total_steps = name, total_steps
        self.enabled = jax.process_index() == 0
        self._last_time, self._last_step = None, None
        if self.enabled:
            from tensorboardX import SummaryWriter
            os.makedirs(workdir, exist_ok=True)
            self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def start(self, step: int):
        self._last_time, self._last_step = time.perf_counter(), step

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
        if self.enabled:
            self.tensorboard.close()
            self.jsonl.close()
