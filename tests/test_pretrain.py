"""The pre-training command: the demo's smoke preset end to end, config files, and bad values."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mmcmae_jax.config import validate_training
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path, preset):
    spec = importlib.util.spec_from_file_location("config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                                        if not os.path.basename(p).startswith("finetune_")))  # tests/test_transfer_*
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


@pytest.mark.slow
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
    ("--config.stage1.model.variant=B/15x", "config.stage1.model.variant"),
    ("--config.stage1.data.hflip_prob=2.0", "hflip_prob"),
])
def test_bad_config_value_fails_at_start_naming_the_field(tmp_path, override, field):
    run = pretrain("--config", "configs/demo.py:smoke", "--workdir", str(tmp_path / "bad"), override)
    assert run.returncode == 2
    assert field in run.stderr and "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "bad" / "stage1" / "checkpoints")


@pytest.mark.parametrize("args,message", [
    (["--config.batch_size=8"], "no such config field: 'batch_size'"),  # a two-stage config's field
    (["--config.stage1.batch_siz=8"], 'Did you mean "batch_size"'),
    (["--config.stage1.data.path=/no/such/records"], "config.stage1.data.path='/no/such/records'"),
    # the batch size, image size and seed are the run's, not data options
    (["--config.stage1.data.batch_size=8"], "--config.stage1.data.batch_size is the run's: set config.batch_size"),
])
def test_bad_override_or_path_is_one_line_not_a_traceback(tmp_path, args, message):
    run = pretrain("--config", "configs/demo.py:smoke", "--workdir", str(tmp_path / "bad"), *args)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    run = pretrain("--config", "configs/demo.py:smoke", "--workdir", str(tmp_path / "afile"))
    assert run.returncode == 2 and "is a file, not a directory" in run.stderr


def test_paper_scale_config_needs_a_data_path():
    """Paper scale means real data: an empty path stops the run instead of training on procedural rooms."""
    from mmcmae_jax.config import ConfigError, paper_scale_config
    from mmcmae_jax.train.trainer import make_train_iterator
    with pytest.raises(ConfigError, match=r"config\.data\.path is empty"):
        make_train_iterator(paper_scale_config(1, "vit_s16"))


def test_encoders_start_from_imagenet_mae_weights(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file
    from mmcmae_jax.models.vit import ViTEncoder
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.port.timm_layout import flax_encoder_to_timm
    from mmcmae_jax.run.start import pretraining_start

    source = ViTEncoder("64x2x2/8").init(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))["params"]
    save_file({k: np.ascontiguousarray(v) for k, v in flax_encoder_to_timm(source, image_size=32).items()},
              str(tmp_path / "mae.safetensors"))
    config = tiny_config(1)
    config.init_from_mae = str(tmp_path / "mae.safetensors")
    objective = make_objective(config)
    batch = {"rgb": jnp.zeros((2, 32, 32, 3)), "depth": jnp.zeros((2, 32, 32, 1)), "depth_valid": jnp.ones((2, 32, 32, 1))}
    frozen, initial_params = pretraining_start(config, objective)
    assert frozen is None
    params = initial_params(objective.init(jax.random.key(0), batch))
    np.testing.assert_array_equal(params["rgb_encoder"]["blocks"]["blocks_1"]["mlp"]["fc2"]["kernel"],
                                  source["blocks"]["blocks_1"]["mlp"]["fc2"]["kernel"])
    rgb_kernel = np.asarray(source["patch_embed"]["proj"]["kernel"])
    np.testing.assert_allclose(params["depth_encoder"]["patch_embed"]["proj"]["kernel"][..., 0, :],
                               rgb_kernel.mean(axis=2), rtol=1e-6)  # depth: the colour channels averaged
    config.init_from_mae = str(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"config\.init_from_mae="):
        pretraining_start(config, objective)[1](objective.init(jax.random.key(0), batch))


def test_stage2_with_distillation_needs_init_from():
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.run.start import pretraining_start
    config = tiny_config(2)
    with pytest.raises(ValueError, match=r"config\.init_from"):
        pretraining_start(config, make_objective(config))


def test_stage2_from_random_weights_says_so(capsys):
    """m3_no_distill without config.init_from has no teacher to demand stage 1, so the start is announced."""
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.run.start import pretraining_start
    config = tiny_config(2)
    config.objective.weights.distill = 0.0
    frozen, initial_params = pretraining_start(config, make_objective(config), "m3_no_distill")
    assert frozen is None and initial_params is None
    assert "[m3_no_distill] the encoders start from random weights" in capsys.readouterr().out


def test_two_stage_run_checks_every_stage_first_chains_them_and_stops_when_preempted(tmp_path, monkeypatch):
    """The launch scripts' `--stage both` relies on it: stage 2 starts from stage 1, and a preempted
    stage 1 ends the command with 143 before stage 2 starts."""
    from mmcmae_jax import pretrain
    from mmcmae_jax.config import ConfigError, two_stage_config
    from mmcmae_jax.train.trainer import TrainResult
    ran, preempt = [], []

    def fake_stage(config, workdir, name):
        ran.append((name, workdir, config.init_from))
        return TrainResult(step=1, metrics={}, history=[], preempted=name in preempt)
    monkeypatch.setattr(pretrain, "run_stage", fake_stage)

    bad = two_stage_config(tiny_config(1), tiny_config(2))
    bad.stage2.batch_size = 0
    with pytest.raises(ConfigError, match=r"config\.stage2\.batch_size"):
        pretrain.run(bad, str(tmp_path))
    assert ran == []  # stage 1 did not start with a bad stage 2

    assert pretrain.main(two_stage_config(tiny_config(1), tiny_config(2)), str(tmp_path)) == 0
    assert ran == [("stage1", str(tmp_path / "stage1"), ""), ("stage2", str(tmp_path / "stage2"), str(tmp_path / "stage1"))]
    ran.clear()
    preempt.append("stage1")
    assert pretrain.main(two_stage_config(tiny_config(1), tiny_config(2)), str(tmp_path)) == 143
    assert [name for name, _, _ in ran] == ["stage1"]
