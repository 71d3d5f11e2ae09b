"""Starting from ImageNet weights whose position table was learned (a supervised timm ViT), from the
command line: refused for a sin-cos encoder with advice that names config fields, then done with the
field the advice names (issue 20, item 9)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from mmcmae_jax.config import ConfigError, training_config, validate_training
from mmcmae_jax.models.vit import ViTEncoder
from mmcmae_jax.port.timm_layout import flax_encoder_to_timm
from mmcmae_jax.run.start import start_encoder
from mmcmae_jax.transfer.config import finetune_config, validate_finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANT, SIZE = "64x2x2/8", 32


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A tiny timm ViT state_dict (.safetensors) whose position table is learned, i.e. not sin-cos."""
    encoder = ViTEncoder(VARIANT, pos_embed="learned", image_size=SIZE)
    shapes = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    state_dict = flax_encoder_to_timm(params, image_size=SIZE)
    path = str(tmp_path_factory.mktemp("timm") / "vit_learned_positions.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
    return path, state_dict


def tiny_finetune(weights, **changes):
    config = finetune_config("depth")
    config.model.update(variant=VARIANT, image_size=SIZE)
    config.init_from_mae = weights
    config.update(changes)
    return config


def test_two_stage_advice_keeps_the_table_in_both_stages(timm_weights):
    """In a two-stage config stage 2 starts from stage 1, so a kept table must be learned in both."""
    from mmcmae_jax.run.start import _check_position_table
    path, state_dict = timm_weights
    with pytest.raises(ConfigError) as err:
        _check_position_table(tiny_finetune(path), state_dict, "stage1.", "stage1")
    assert "--config.stage1.model.pos_embed=learned --config.stage2.model.pos_embed=learned" in str(err.value)
    assert "--config.stage1.init_from_mae_drop_learned_pos_embed=True" in str(err.value)


def test_fine_tuning_starts_from_a_learned_table_by_dropping_or_keeping_it(timm_weights):
    path, state_dict = timm_weights
    with pytest.raises(ConfigError) as err:
        start_encoder(tiny_finetune(path))
    message = str(err.value)
    assert "not MAE's fixed sin-cos table" in message and "check_sincos" not in message
    assert "--config.model.pos_embed=learned" in message
    assert "--config.init_from_mae_drop_learned_pos_embed=True" in message
    # The field the advice names: the blocks are the checkpoint's, the table is dropped.
    config = tiny_finetune(path, init_from_mae_drop_learned_pos_embed=True)
    validate_finetune(config)
    encoder = start_encoder(config)
    assert "pos_embed" not in encoder
    np.testing.assert_array_equal(encoder["cls_token"], state_dict["cls_token"])
    # Or kept, in a learned-table encoder.
    config = tiny_finetune(path)
    config.model.pos_embed = "learned"
    np.testing.assert_array_equal(start_encoder(config)["pos_embed"], state_dict["pos_embed"])


def test_the_field_is_validated_with_the_others(timm_weights):
    config = tiny_finetune("", init_from_mae_drop_learned_pos_embed=True)
    with pytest.raises(ConfigError, match=r"config\.init_from_mae_drop_learned_pos_embed: .*init_from_mae is empty"):
        validate_finetune(config)
    config = tiny_finetune(timm_weights[0], init_from_mae_drop_learned_pos_embed=True)
    config.model.pos_embed = "learned"
    with pytest.raises(ConfigError, match=r"config\.init_from_mae_drop_learned_pos_embed: .*keeps the table"):
        validate_finetune(config)
    config = training_config(1)
    config.init_from_mae_drop_learned_pos_embed = True
    with pytest.raises(ConfigError, match=r"config\.init_from_mae_drop_learned_pos_embed: .*init_from_mae is empty"):
        validate_training(config)


# Both stages of the demo's smoke run at the tiny size, one step each.
TINY_DEMO = [f"--config.stage{s}.{field}" for s in (1, 2) for field in
             (f"model.variant={VARIANT}", f"model.image_size={SIZE}", "total_steps=1")] + [
    "--config.stage1.model.proj_hidden=64", "--config.stage1.model.proj_dim=32",
    "--config.stage2.model.decoder_depth=1", "--config.stage2.model.decoder_width=64",
    "--config.stage2.model.decoder_heads=2"]


def pretrain(workdir, *flags):
    return subprocess.run([sys.executable, "-m", "mmcmae_jax.pretrain", "--config", "configs/demo.py:smoke",
                           "--workdir", str(workdir), *TINY_DEMO, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_pretraining_starts_from_a_learned_table_on_the_command_line(timm_weights, tmp_path):
    path, _ = timm_weights
    start = f"--config.stage1.init_from_mae={path}"
    run = pretrain(tmp_path / "refused", start)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
    advice = "--config.stage1.init_from_mae_drop_learned_pos_embed=True"
    assert "not MAE's fixed sin-cos table" in lines[0] and advice in lines[0]
    assert "--config.stage1.model.pos_embed=learned --config.stage2.model.pos_embed=learned" in lines[0]
    assert not os.path.isdir(tmp_path / "refused" / "stage1" / "checkpoints")  # refused before training

    run = pretrain(tmp_path / "run", start, advice)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"the position table of {path} is not used" in run.stdout
    assert os.path.isdir(tmp_path / "run" / "stage2" / "checkpoints" / "1")
