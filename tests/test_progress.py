"""What a run tells its user (issue 20, item 6): time-stamped lines, a time left measured after the step
that compiles, an end-of-run summary with the next command, and fine-tuning's periodic evaluation in
metrics.jsonl and TensorBoard."""
import json
import os
import re
import time

import numpy as np
import pytest

from mmcmae_jax.objectives import make_objective
from mmcmae_jax.train import trainer
from mmcmae_jax.train.metrics import MetricWriter

from conftest import tiny_trainer_config
from test_failures import batches, event_steps

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def eta_seconds(line):
    minutes, seconds = re.search(r"eta (\d+)m(\d\d)s", line).groups()
    return int(minutes) * 60 + int(seconds)


def test_time_left_is_measured_from_the_end_of_the_first_step(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace
    from mmcmae_jax.train import metrics
    # The first step ends at 100 s (after compiling); then 1 s a step.
    clock = iter([100.0, 100.5, 101.0, 103.0, 107.0])
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    writer = MetricWriter(str(tmp_path), "train", total_steps=10)
    writer.start(0)
    writer.first_step_done(1)
    first = writer.write(1, {"loss": np.float32(1.0)}, images_per_step=8)
    second = writer.write(2, {"loss": np.float32(0.9)}, images_per_step=8)
    third = writer.write(4, {"loss": np.float32(0.8)}, images_per_step=8)
    writer.write_evaluation(4, {"abs_rel": 0.5})
    writer.set_aside(2.0)  # 2 s of the next 4 s went to that evaluation
    fourth = writer.write(6, {"loss": np.float32(0.7)}, images_per_step=8)
    writer.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if "step" in line]
    assert "images_per_s" not in first and "eta --" in lines[0]  # nothing measured yet: no guess
    assert second["images_per_s"] == 8.0 and eta_seconds(lines[1]) == 8  # 8 steps left at 1 s
    assert third["images_per_s"] == 8.0 and eta_seconds(lines[2]) == 6
    # The evaluation is not training (img/s) but recurs (time left: 4 steps at 7 s / 5 steps).
    assert fourth["images_per_s"] == 8.0 and eta_seconds(lines[3]) == 5
    assert all(re.match(STAMP + r"\[train\] step \d+/10 ", line) for line in lines)


def test_compilation_does_not_count_in_the_time_left(tmp_path, monkeypatch, capsys):
    """A first step that takes 10 s (as compiling a large model does) and fast steps after it: the time
    left at step 4 is that of 4 fast steps, not 4 x 10 s / 4 at least."""
    make_step = trainer.make_train_step

    def slow_first_step(*args, **kwargs):
        step, initial_watch = make_step(*args, **kwargs)
        calls = []

        def step_fn(*step_args):
            if not calls:
                calls.append(1)
                time.sleep(10.0)
            return step(*step_args)
        return step_fn, initial_watch
    monkeypatch.setattr(trainer, "make_train_step", slow_first_step)
    config = tiny_trainer_config(total_steps=8, log_every=4, checkpoint_every=8)
    result = trainer.train(config, str(tmp_path), batches(), make_objective(config))
    out = capsys.readouterr().out
    step4 = next(line for line in out.splitlines() if "step 4/8" in line)
    assert eta_seconds(step4) < 8, step4  # counting the first step: at least 10 s
    assert result.seconds_per_step < 2.0 and result.seconds > 10.0 and result.first_step == 0
    assert all(re.match(STAMP + r"\[train\] ", line) for line in out.splitlines()), out


def tiny_finetune(tmp_path, **changes):
    from mmcmae_jax.transfer.config import finetune_config
    config = finetune_config("depth")
    config.model.update(variant="64x2x2/8", image_size=32)
    config.head.features = 16
    config.update(batch_size=4, total_steps=4, log_every=1, checkpoint_every=4, async_checkpoint=False)
    config.optim.warmup_steps = 1
    config.data.update(procedural_dir=str(tmp_path / "train_rooms"), procedural_frames=8, procedural_size=32)
    config.eval_data.update(procedural_dir=str(tmp_path / "eval_rooms"), procedural_frames=4, procedural_size=32)
    config.eval.batch_size = 4
    config.update(**changes)
    return config


def jsonl(workdir, stage):
    return [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if r["stage"] == stage]


@pytest.mark.slow
def test_finetuning_evaluates_every_eval_every_steps_into_metrics_and_tensorboard(tmp_path, capsys):
    from mmcmae_jax.finetune import run_finetune
    work = str(tmp_path / "every2")
    _, final = run_finetune(tiny_finetune(tmp_path, eval_every=2), work)
    out = capsys.readouterr().out
    evaluations = jsonl(work, "finetune_eval")
    assert [r["step"] for r in evaluations] == [2, 4]  # step 2 while training, step 4 the final evaluation
    assert evaluations[-1]["abs_rel"] == pytest.approx(final["metrics"]["abs_rel"])
    assert evaluations[0]["frames"] == 4 and np.isfinite(evaluations[0]["delta1"])
    assert event_steps(work, "finetune_eval/abs_rel") == [2, 4]
    assert re.search(STAMP + r"\[finetune\] evaluation at step 2 on 4 frames: delta1 ", out)

    # The end-of-run summary: steps, wall time, what was written where, and what to run next.
    summary = out[out.index("[finetune] finished"):]
    assert "finetune: steps 1-4 of 4 in " in summary and "s a step after the first, which compiles" in summary
    assert re.search(rf"checkpoints  {work}/checkpoints \(steps [\d, ]*4\)", summary), summary
    for written in (f"{work}/metrics.jsonl", f"{work}/tensorboard (view: tensorboard --logdir {work})",
                    f"{work}/eval (1 file, the last step_4.json)"):
        assert written in summary, summary
    assert f"python -m mmcmae_jax.evaluate --config CONFIG.py --workdir {work}" in summary
    assert f"python -m mmcmae_jax.port.export --checkpoint {work} --out {work}/rgb_encoder.safetensors" in summary

    # Evaluating does not change training: the losses are those of a run that does not evaluate.
    plain = str(tmp_path / "no_evaluation")
    config = tiny_finetune(tmp_path)
    config.eval.at_end = False
    run_finetune(config, plain)
    assert jsonl(plain, "finetune_eval") == []
    assert [r["loss"] for r in jsonl(work, "finetune")] == [r["loss"] for r in jsonl(plain, "finetune")]

    # The command run again on the finished run evaluates step 4 again: it is held once.
    capsys.readouterr()
    run_finetune(tiny_finetune(tmp_path, eval_every=2), work)
    assert [r["step"] for r in jsonl(work, "finetune_eval")] == [2, 4]
    assert event_steps(work, "finetune_eval/abs_rel") == [2, 4]
    assert "finetune: had already finished all 4 steps" in capsys.readouterr().out


@pytest.mark.parametrize("value", [-1, True, None])
def test_eval_every_is_checked_with_the_other_fields(tmp_path, value):
    from mmcmae_jax.config import ConfigError
    from mmcmae_jax.transfer.config import validate_finetune
    config = tiny_finetune(tmp_path)
    config.eval_every = value
    with pytest.raises(ConfigError, match=r"config\.eval_every: must be a whole number of steps >= 0"):
        validate_finetune(config)


def test_pretraining_summary_names_the_next_command(tmp_path):
    from mmcmae_jax.config import training_config
    from mmcmae_jax.pretrain import next_steps
    config = training_config(2)
    config.model.update(variant="64x2x2/8", image_size=32)
    finished = trainer.TrainResult(step=4, metrics={}, history=[])
    (what, finetune), (_, export) = next_steps(config, "/w/stage2", finished)
    assert "fine-tune" in what
    assert finetune == ("python -m mmcmae_jax.finetune --config configs/finetune_procedural_depth.py --workdir "
                        "/w/stage2_depth --config.init_from=/w/stage2 --config.model.variant=64x2x2/8 "
                        "--config.model.image_size=32")
    assert export == "python -m mmcmae_jax.port.export --checkpoint /w/stage2 --out /w/stage2/rgb_encoder.safetensors"
    stage1 = training_config(1)
    stage1.data.path = "/data/scannet"
    (what, command), = next_steps(stage1, "/w/stage1", finished)
    assert "stage 2" in what and "--config.init_from=/w/stage1" in command and "--workdir /w/stage2" in command
    config.model.pos_embed = "learned"  # an encoder that kept a timm table: the next command must build it too
    (_, finetune), _ = next_steps(config, "/w/stage2", finished)
    assert finetune.endswith("--config.model.image_size=32 --config.model.pos_embed=learned")
    preempted = trainer.TrainResult(step=2, metrics={}, history=[], preempted=True)
    (what, command), = next_steps(config, "/w/stage2", preempted)
    assert what == "resume from its checkpoint"
