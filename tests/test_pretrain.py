"""The pre-training command: the demo's smoke preset end to end, config files, and bad values."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mmcmae_jax.config import validate_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path, preset):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_and_preset_validates(path):
    presets = ["smoke", ""] if path.endswith("demo.py") else ["vit_s16", "vit_b16", "vit_l16"]
    for preset in presets:
        config = load_config(path, preset)
        stages = [config[name] for name in config.stages] if "stages" in config else [config]
        for stage in stages:
            validate_training(stage)
    with open(path) as f:
        assert "python -m mmcmae_jax.pretrain --config configs/" in f.read()  # the run command is documented


def pretrain(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mmcmae_jax.pretrain", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_demo_smoke_runs_both_stages(tmp_path):
    data = str(tmp_path / "data")
    run = pretrain("--config", "configs/demo.py:smoke", "--workdir", str(tmp_path / "demo"),
                   f"--config.stage1.data.procedural_dir={data}", f"--config.stage2.data.procedural_dir={data}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[stage1] step 4/4" in run.stdout and "[stage2] step 4/4" in run.stdout
    assert "eta" in run.stdout and "img/s" in run.stdout
    for stage in ("stage1", "stage2"):
        assert os.path.isdir(tmp_path / "demo" / stage / "checkpoints" / "4")
        logged = [json.loads(line) for line in open(tmp_path / "demo" / stage / "metrics.jsonl")]
        assert [m["step"] for m in logged] == [1, 2, 3, 4]
        assert os.listdir(tmp_path / "demo" / stage / "tensorboard")
    assert {"depth", "denoise", "distill", "grad_norm", "learning_rate", "images_per_s"} <= set(logged[-1])
    assert sorted(os.listdir(tmp_path / "demo" / "stage2" / "images")) == ["step_000002.png", "step_000004.png"]
    # Running again finds both stages finished and resumes at their last step.
    again = pretrain("--config", "configs/demo.py:smoke", "--workdir", str(tmp_path / "demo"),
                     f"--config.stage1.data.procedural_dir={data}", f"--config.stage2.data.procedural_dir={data}")
    assert again.returncode == 0 and "resuming from the checkpoint of step 4" in again.stdout


@pytest.mark.parametrize("override,field", [
    ("--config.stage1.batch_size=0", "config.stage1.batch_size"),
    ("--config.stage2.objective.mask_ratio.depth=1.5", "config.stage2.objective.mask_ratio.depth"),
    ("--config.stage1.model.variant=B/15x", "config.model.variant"),
    ("--config.stage1.data.hflip_prob=2.0", "hflip_prob"),
])
def test_bad_config_value_fails_at_start_naming_the_field(tmp_path, override, field):
    run = pretrain("--config", "configs/demo.py:smoke", "--workdir", str(tmp_path / "bad"), override)
    assert run.returncode != 0
    assert field in run.stderr
    assert not os.path.exists(tmp_path / "bad" / "stage1" / "checkpoints")
