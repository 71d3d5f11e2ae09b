"""evaluate and export take the task, model and head from the run's config.json: a flag given wins and,
when it differs from the record, is named; the results record where each came from and the checkpoint
step; an existing results file is not replaced without --overwrite (issue 20, item 5)."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from mmcmae_jax.errors import ConfigError
from mmcmae_jax.port.export import main as export_main
from mmcmae_jax.run.workdir import write_config
from mmcmae_jax.transfer.config import finetune_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/finetune_procedural_depth.py builds 128x4x4/8 at 64 px with a 64-wide head; the run below is
# a smaller model at another size, as a run with overrides would be.
RUN_MODEL = dict(variant="64x2x2/8", image_size=32)
RUN_HEAD_FEATURES = 16


def run_config():
    config = finetune_config("depth")
    config.model.update(**RUN_MODEL)
    config.head.features = RUN_HEAD_FEATURES
    return config


def finetuned_workdir(path, step=3):
    """A fine-tuning work directory as finetune.py leaves it: config.json and a checkpoint of `step`."""
    from mmcmae_jax.train.checkpoint import Checkpointer
    from mmcmae_jax.transfer.objective import make_model
    config = run_config()
    shapes = jax.eval_shape(make_model(config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    checkpointer = Checkpointer(str(path / "checkpoints"), async_save=False)
    checkpointer.save(step, {"step": step, "params": params}, None, force=True)
    checkpointer.close()
    write_config(config, str(path))
    return str(path)


def evaluate(workdir, tmp_path, *flags):
    procedural = [f"--config.eval_data.procedural_dir={tmp_path / 'eval_rooms'}",
                  "--config.eval_data.procedural_frames=4", "--config.eval_data.procedural_size=32",
                  "--config.eval.batch_size=4"]
    return subprocess.run([sys.executable, "-m", "mmcmae_jax.evaluate", "--config",
                           "configs/finetune_procedural_depth.py", "--workdir", workdir, *procedural, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_evaluate_takes_the_run_model_and_keeps_an_earlier_result(tmp_path):
    workdir = finetuned_workdir(tmp_path / "run")
    config_json = os.path.join(workdir, "config.json")
    result_file = os.path.join(workdir, "eval", "step_3.json")

    # The config file's model (128x4x4/8 at 64 px) is not the run's: the run's config.json decides.
    run = evaluate(workdir, tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (f"evaluating step 3 of {workdir}: depth, 64x2x2/8 at 32 px (sincos positions), dpt head; "
            f"task, model and head from {config_json}") in run.stdout
    started = next(line for line in run.stdout.splitlines() if "evaluating step 3 of" in line)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[evaluate\] evaluating step 3 of ", started), started
    notice = next(line for line in run.stdout.splitlines() if line.startswith("notice:"))
    assert notice.startswith(f"notice: {config_json}, not the config file, gives ")
    for replaced in ("model.variant='64x2x2/8' (file: '128x4x4/8')", "model.image_size=32 (file: 64)",
                     "head.features=16 (file: 64)"):
        assert replaced in notice
    results = json.load(open(result_file))
    assert results["step"] == 3 and results["model"]["image_size"] == 32 and results["head"]["features"] == 16
    assert results["resolution"]["config_json"] == config_json
    assert "model.image_size" in results["resolution"]["from_config_json"]
    written = os.path.getmtime(result_file)

    # Again: the result there is kept, and the command says how to replace it, before evaluating.
    run = evaluate(workdir, tmp_path)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-2000:]
    assert f"{result_file} already holds results" in lines[0] and "--overwrite" in lines[0]
    assert "evaluating step" not in run.stdout and os.path.getmtime(result_file) == written

    # A flag wins over the record, and is named; the results say so.
    run = evaluate(workdir, tmp_path, "--config.model.image_size=48", "--overwrite")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (f"notice: the command line overrules {config_json}: --config.model.image_size=48 (the run's: 32)"
            in run.stdout)
    assert "depth, 64x2x2/8 at 48 px" in run.stdout and "except --config.model.image_size=48" in run.stdout
    assert f"results of step 3 written to {result_file} (it replaced the results there)" in run.stdout
    results = json.load(open(result_file))
    assert results["model"]["image_size"] == 48
    assert results["resolution"]["overruled"] == {"model.image_size": {"given": 48, "recorded": 32}}


def test_a_flag_the_checkpoint_cannot_take_is_refused_naming_it(tmp_path):
    from mmcmae_jax.run.resolve import take_run_fields
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(run_config(), str(workdir))
    config = run_config()
    config.head.features = 32
    with pytest.raises(ConfigError) as err:
        take_run_fields(config, str(workdir), {"head.features"})
    message = str(err.value)
    assert message.startswith("--config.head.features=32: ") and "head.features=16" in message
    assert "drop the flag" in message
    config = run_config()
    config.task = "segmentation"
    with pytest.raises(ConfigError, match=r"--config\.task='segmentation'.*task='depth'"):
        take_run_fields(config, str(workdir), {"task"})
    # Without a record (an older run) the config file's fields are used, and that is what the line says.
    resolution = take_run_fields(finetune_config("depth"), str(tmp_path / "no_record"), set())
    assert resolution.config_json is None and "from the config file" in resolution.source()


def pretraining_workdir(path, variant="64x2x2/8", image_size=32, step=2):
    from mmcmae_jax.config import training_config
    from mmcmae_jax.models.m3 import CrossModalContrastive
    from mmcmae_jax.train.checkpoint import Checkpointer
    model = CrossModalContrastive(variant=variant, proj_hidden=32, proj_dim=16)
    images = {"rgb": jnp.zeros((1, 32, 32, 3)), "depth": jnp.zeros((1, 32, 32, 1))}
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), shapes)
    checkpointer = Checkpointer(str(path / "checkpoints"), async_save=False)
    checkpointer.save(step, {"step": step, "params": params}, None, force=True)
    checkpointer.close()
    config = training_config(1)
    config.model.update(variant=variant, image_size=image_size)
    write_config(config, str(path))
    return str(path)


def test_export_names_a_flag_that_overrules_the_record_and_records_the_step(tmp_path, capsys):
    workdir = pretraining_workdir(tmp_path / "run")
    config_json = os.path.join(workdir, "config.json")
    out = str(tmp_path / "rgb.safetensors")
    assert export_main(["--checkpoint", workdir, "--out", out, "--image-size", "48"]) == 0
    printed = capsys.readouterr().out
    assert f"notice: the command line overrules {config_json}: --image-size 48 (the run's model.image_size: 32)" \
        in printed
    assert f"wrote {out} (step 2 of {workdir}/checkpoints/2/state)" in printed
    with safe_open(out, "np") as f:
        metadata = f.metadata()
    assert metadata["step"] == "2" and metadata["image_size"] == "48" and metadata["image_size_from"] == "--image-size"
    assert metadata["variant"] == "64x2x2/8" and metadata["variant_from"] == f"model.variant in {config_json}"
    # A flag equal to the record is no conflict.
    assert export_main(["--checkpoint", workdir, "--out", out, "--image-size", "32"]) == 0
    assert "notice" not in capsys.readouterr().out
