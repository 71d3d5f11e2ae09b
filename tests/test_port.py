"""Weights in and out of PyTorch: names and layouts, export (CLI and orbax checkpoints), MAE import,
strict errors, and, where torch and timm are installed, numerical parity with timm's VisionTransformer."""
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from safetensors.numpy import load_file, save_file

from mmcmae_jax.models.m3 import CrossModalContrastive, MultiModalMAE
from mmcmae_jax.models.masking import multimodal_masks
from mmcmae_jax.models.vit import ViTEncoder, sincos_pos_embed_2d
from mmcmae_jax.port.timm_import import import_timm
from mmcmae_jax.port import (encoder_spec, flax_encoder_to_timm, init_encoders_from_mae, load_mae_into_encoder,
                             read_state_dict, resample_pos_embed, state_dict_to_tree, timm_constructor, timm_kwargs,
                             timm_name, tree_to_state_dict)
from mmcmae_jax.port.export import export, main as export_main
from mmcmae_jax.run.workdir import load_params

TINY = "64x2x2/16"


def random_like(shapes, seed=0):
    """Random values for a parameter tree (arrays or shape structs). Init values (zero biases, unit
    scales) are too regular to catch a mapping mistake, and filling beats running init for ViT-B."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = 0.05 * rng.standard_normal(np.shape(leaf), dtype=np.float32)
        return noise + 1 if jax.tree_util.keystr(path).endswith("['scale']") else noise

    return jax.tree_util.tree_map_with_path(fill, shapes)


def encoder_params(variant=TINY, size=(32, 32), chans=3, seed=0, **kw):
    enc = ViTEncoder(variant, **kw)
    shapes = jax.eval_shape(enc.init, jax.random.key(seed), jnp.zeros((1,) + tuple(size) + (chans,)))["params"]
    return enc, random_like(shapes, seed)


def mae_state_dict(width=64, depth=2, patch=16, grid=14, chans=3, seed=0):
    """A state_dict in MAE's pre-training layout: encoder, fixed sin-cos table, and its decoder."""
    rng = np.random.RandomState(seed)
    r = lambda *s: rng.randn(*s).astype(np.float32) * 0.05
    sd = {"cls_token": r(1, 1, width), "patch_embed.proj.weight": r(width, chans, patch, patch),
          "patch_embed.proj.bias": r(width), "norm.weight": 1 + r(width), "norm.bias": r(width),
          "pos_embed": np.concatenate([np.zeros((1, 1, width), np.float32),
                                       sincos_pos_embed_2d(width, grid, grid)[None]], axis=1),
          "mask_token": r(1, 1, 32), "decoder_embed.weight": r(32, width), "decoder_pred.bias": r(768),
          "decoder_blocks.0.attn.qkv.weight": r(96, 32), "decoder_pos_embed": r(1, 1 + grid * grid, 32)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
                   b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
                   b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
                   b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
                   b + "mlp.fc1.weight": r(4 * width, width), b + "mlp.fc1.bias": r(4 * width),
                   b + "mlp.fc2.weight": r(width, 4 * width), b + "mlp.fc2.bias": r(width)})
    return sd


def assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------------
# Names and layouts (NumPy only)


def test_names_and_layouts_follow_timm():
    _, params = encoder_params()
    sd = flax_encoder_to_timm(params, image_size=32)
    expected = {"cls_token": (1, 1, 64), "pos_embed": (1, 5, 64), "patch_embed.proj.weight": (64, 3, 16, 16),
                "patch_embed.proj.bias": (64,), "blocks.1.attn.qkv.weight": (192, 64),
                "blocks.1.attn.qkv.bias": (192,), "blocks.0.mlp.fc1.weight": (256, 64),
                "blocks.0.norm1.weight": (64,), "norm.weight": (64,), "norm.bias": (64,)}
    for name, shape in expected.items():
        assert sd[name].shape == shape, name
    assert len(sd) == 4 + 2 * 12 + 2
    kernel = params["blocks"]["blocks_1"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(sd["blocks.1.attn.qkv.weight"], kernel.T)
    np.testing.assert_array_equal(sd["patch_embed.proj.weight"][5, 2, 3, 7],
                                  params["patch_embed"]["proj"]["kernel"][3, 7, 2, 5])
    # Sin-cos encoders write MAE's table: a zero cls slot, then the grid's table.
    np.testing.assert_array_equal(sd["pos_embed"][0, 0], 0)
    np.testing.assert_array_equal(sd["pos_embed"][0, 1:], sincos_pos_embed_2d(64, 2, 2))


def test_full_model_names():
    model = MultiModalMAE(variant=TINY, decoder_depth=2, decoder_width=32, decoder_heads=2)
    images = {"rgb": jnp.zeros((1, 32, 32, 3)), "depth": jnp.zeros((1, 32, 32, 1))}
    masks = multimodal_masks(jax.random.key(0), 1, {"rgb": 4, "depth": 4}, {"rgb": 0.5, "depth": 0.5})
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, masks, jnp.zeros((1,))))["params"]
    sd = tree_to_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
    for name in ("decoder.blocks.1.attn.qkv.weight", "decoder.blocks.0.mlp.fc2.bias", "decoder_norm.weight",
                 "depth_head.weight", "sigma_embed.fc1.weight", "depth_mask_token", "rgb_modality_embed",
                 "rgb_decoder_embed.weight", "rgb_encoder.blocks.1.attn.qkv.weight",
                 "depth_encoder.patch_embed.proj.weight", "depth_encoder.cls_token"):
        assert name in sd, name
    assert sd["decoder.blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert sd["depth_encoder.patch_embed.proj.weight"].shape == (64, 1, 16, 16)
    assert sd["depth_head.weight"].shape == (256, 32)  # Linear (out, in)
    assert not any("blocks_" in name for name in sd)
    assert timm_name(("blocks", "blocks_11", "attn", "proj", "kernel")) == "blocks.11.attn.proj.weight"


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_round_trip_is_exact(pos_embed):
    _, params = encoder_params(pos_embed=pos_embed, image_size=32)
    back = state_dict_to_tree(flax_encoder_to_timm(params, image_size=32), params,
                              skip=("pos_embed",) if pos_embed == "sincos" else ())
    assert_trees_equal(back, params)


def test_strict_errors_list_the_names():
    _, params = encoder_params()
    sd = flax_encoder_to_timm(params, image_size=32)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.ls1.gamma"] = np.zeros(64, np.float32)
    sd["blocks.0.attn.qkv.weight"] = np.zeros((96, 64), np.float32)
    with pytest.raises(ValueError) as err:
        load_mae_into_encoder(sd, params)
    message = str(err.value)
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys (1): blocks.0.ls1.gamma" in message
    assert "blocks.0.attn.qkv.weight: (96, 64) in the checkpoint, (192, 64) expected" in message


def test_mae_import_drops_decoder_and_checks_sincos_table():
    _, template = encoder_params(size=(224, 224))
    sd = mae_state_dict()
    params = load_mae_into_encoder({"model": sd, "epoch": 799}, template, in_chans=3)
    np.testing.assert_array_equal(params["blocks"]["blocks_1"]["mlp"]["fc1"]["kernel"], sd["blocks.1.mlp.fc1.weight"].T)
    assert "pos_embed" not in params
    # A learned table would be lost in a sin-cos encoder: refused unless asked for.
    learned = dict(sd, pos_embed=sd["pos_embed"] + 0.01)
    with pytest.raises(ValueError, match="not MAE's fixed sin-cos table"):
        load_mae_into_encoder(learned, template)
    assert_trees_equal(load_mae_into_encoder(learned, template, check_sincos=False), params)
    # The encoder runs at a size other than the checkpoint's: its table is computed, not loaded.
    enc = ViTEncoder(TINY)
    tokens, _ = enc.apply({"params": params}, jnp.ones((1, 96, 160, 3)))
    assert tokens.shape == (1, 1 + 6 * 10, 64)


def test_depth_encoder_averages_the_patch_projection():
    _, template = encoder_params(chans=1)
    sd = mae_state_dict()
    params = load_mae_into_encoder(sd, template, in_chans=1)
    kernel = params["patch_embed"]["proj"]["kernel"]
    assert kernel.shape == (16, 16, 1, 64)
    np.testing.assert_allclose(kernel[..., 0, :], sd["patch_embed.proj.weight"].mean(1).transpose(1, 2, 0), rtol=1e-6)
    with pytest.raises(ValueError, match="in_chans=3"):
        load_mae_into_encoder(sd, template, in_chans=3)


def test_learned_table_is_resampled():
    _, template = encoder_params(size=(64, 64), pos_embed="learned", image_size=64)
    sd = mae_state_dict(grid=2)
    sd["pos_embed"] = np.random.RandomState(1).randn(1, 5, 64).astype(np.float32)
    params = load_mae_into_encoder(sd, template, image_size=64)
    table = params["pos_embed"]
    assert table.shape == (1, 17, 64)
    np.testing.assert_array_equal(table[0, 0], sd["pos_embed"][0, 0])  # the cls slot is kept
    # A constant grid stays constant under bicubic resampling; the same grid is left alone.
    const = np.concatenate([np.zeros((1, 1, 8)), np.ones((1, 9, 8))], 1).astype(np.float32)
    np.testing.assert_allclose(resample_pos_embed(const, (5, 5))[0, 1:], 1.0, atol=1e-5)
    np.testing.assert_array_equal(resample_pos_embed(sd["pos_embed"], (2, 2)), sd["pos_embed"])
    with pytest.raises(ValueError, match="image_size 32x32"):
        load_mae_into_encoder(sd, template, image_size=32)


def test_init_both_encoders_of_stage1(tmp_path):
    model = CrossModalContrastive(variant=TINY, proj_hidden=32, proj_dim=16)
    images = {"rgb": jnp.zeros((1, 32, 32, 3)), "depth": jnp.zeros((1, 32, 32, 1))}
    params = model.init(jax.random.key(0), images)["params"]
    sd = mae_state_dict()
    path = tmp_path / "mae.safetensors"
    save_file(sd, str(path))
    new = init_encoders_from_mae(params, str(path))
    np.testing.assert_array_equal(new["rgb_encoder"]["cls_token"], sd["cls_token"])
    np.testing.assert_array_equal(new["depth_encoder"]["cls_token"], sd["cls_token"])
    assert new["depth_encoder"]["patch_embed"]["proj"]["kernel"].shape == (16, 16, 1, 64)
    assert new["rgb_proj"] is params["rgb_proj"]
    assert params["rgb_encoder"]["cls_token"].shape == (1, 1, 64)  # the input is not changed
    assert not np.array_equal(params["rgb_encoder"]["cls_token"], sd["cls_token"])
    model.apply({"params": new}, images)  # the tree is complete
    with pytest.raises(ValueError, match="rgb_encoder from state_dict") as err:
        init_encoders_from_mae(params, {k: v for k, v in sd.items() if k != "norm.bias"})
    assert "missing keys (1): norm.bias" in str(err.value)


# ----------------------------------------------------------------------------------------------------
# Export from checkpoints (orbax as the trainer writes it, msgpack, safetensors) and the CLI


def stage1_params(variant=TINY):
    model = CrossModalContrastive(variant=variant, proj_hidden=32, proj_dim=16)
    images = {"rgb": jnp.zeros((1, 32, 32, 3)), "depth": jnp.zeros((1, 32, 32, 1))}
    return random_like(jax.eval_shape(model.init, jax.random.key(0), images)["params"])


def test_export_from_orbax_checkpoint_manager(tmp_path):
    import orbax.checkpoint as ocp

    params = stage1_params()
    state = {"step": np.int32(7), "params": params, "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}}
    workdir = tmp_path / "work"
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("state",),
                                    options=ocp.CheckpointManagerOptions(create=True))
    for step in (3, 7):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(state, step=np.int32(step)))))
    manager.wait_until_finished()
    manager.close()
    assert_trees_equal(load_params(str(workdir))[0], params)  # the latest step, from the work directory

    out = tmp_path / "vit.safetensors"
    assert export_main(["--checkpoint", str(workdir), "--out", str(out), "--modality", "all",
                        "--variant", TINY, "--image-size", "32"]) == 0
    for m in ("rgb", "depth"):
        written = load_file(str(tmp_path / f"vit-{m}.safetensors"))
        expected = flax_encoder_to_timm(params[f"{m}_encoder"], image_size=32)
        assert written.keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(written[k], expected[k], err_msg=k)

    assert export_main(["--checkpoint", str(workdir / "checkpoints"), "--out", str(tmp_path / "full.safetensors"),
                        "--full-model", "--step", "3"]) == 0
    full = load_file(str(tmp_path / "full.safetensors"))
    np.testing.assert_array_equal(full["rgb_proj.fc1.weight"], params["rgb_proj"]["fc1"]["kernel"].T)
    assert "depth_encoder.blocks.1.attn.qkv.weight" in full


def test_export_from_standard_checkpointer_msgpack_and_safetensors(tmp_path, capsys):
    import orbax.checkpoint as ocp

    params = stage1_params()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "std"), {"params": params})
    checkpointer.wait_until_finished()
    (tmp_path / "p.msgpack").write_bytes(serialization.msgpack_serialize({"params": params}))
    from mmcmae_jax.port.timm_layout import flatten
    save_file({"/".join(p): v for p, v in flatten(params).items()}, str(tmp_path / "p.safetensors"))
    for source in ("std", "p.msgpack", "p.safetensors"):
        assert_trees_equal(load_params(str(tmp_path / source))[0], params)

    assert export_main(["--checkpoint", str(tmp_path / "p.msgpack"), "--out", str(tmp_path / "d.safetensors"),
                        "--modality", "depth", "--variant", TINY]) == 0
    printed = capsys.readouterr().out
    assert "image size 224, unless a learned position table fixes it (no --image-size, no run config.json)" in printed
    assert "VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2" in printed
    assert "strict=True" in printed
    assert load_file(str(tmp_path / "d.safetensors"))["patch_embed.proj.weight"].shape == (64, 1, 16, 16)


def test_export_errors_are_clear(tmp_path, capsys):
    params = stage1_params()
    (tmp_path / "p.msgpack").write_bytes(serialization.msgpack_serialize({"params": params}))
    assert export_main(["--checkpoint", str(tmp_path / "p.msgpack"), "--out", str(tmp_path / "x.safetensors"),
                        "--variant", "B/16"]) == 2
    assert "--variant B/16 is width 768" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give the head count"):
        export(str(tmp_path / "p.msgpack"), str(tmp_path / "x.safetensors"))
    assert export_main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no thermal_encoder"):
        export(str(tmp_path / "p.msgpack"), str(tmp_path / "x.safetensors"), modality="thermal", variant=TINY)


# A pre-training work directory as `pretrain.run_stage` and the trainer leave it: config.json, checkpoints/.
RUN_VARIANT, RUN_SIZE = "64x2x2/8", 32


def pretrain_workdir(path, params, variant=RUN_VARIANT, image_size=RUN_SIZE, step=2):
    from mmcmae_jax.config import training_config
    from mmcmae_jax.train.checkpoint import Checkpointer
    config = training_config(1)
    config.model.update(variant=variant, image_size=image_size)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(os.path.join(path, "checkpoints"), every_steps=1, async_save=False)
    checkpointer.save(step, {"step": np.int32(step), "params": params}, None, force=True)
    checkpointer.close()
    return str(path)


def test_checkpoint_forms_find_the_train_state_not_another_item(tmp_path):
    """A work directory, its checkpoints/, a step folder and the item itself all lead to the train state,
    also when the work directory holds another PyTree (a linear probe's frozen_encoder/)."""
    from mmcmae_jax.train.checkpoint import find_pytree_dir
    from mmcmae_jax.run.workdir import save_frozen_encoder
    workdir = pretrain_workdir(tmp_path / "run", stage1_params(RUN_VARIANT))
    save_frozen_encoder(workdir, {"x": np.zeros(2)})
    state = os.path.join(workdir, "checkpoints", "2", "state")
    for inside in ("", "checkpoints", "checkpoints/2", "checkpoints/2/state"):
        assert find_pytree_dir(os.path.join(workdir, inside)) == state, inside


def assert_state_dicts_equal(written, expected):
    assert written.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(written[k], expected[k], err_msg=k)


def test_export_takes_variant_and_image_size_from_config_json(tmp_path, capsys):
    params = stage1_params(RUN_VARIANT)
    workdir = pretrain_workdir(tmp_path / "run", params)
    out = str(tmp_path / "rgb.safetensors")
    assert export_main(["--checkpoint", workdir, "--out", out]) == 0
    printed = capsys.readouterr().out
    config_json = os.path.join(workdir, "config.json")
    assert f"variant {RUN_VARIANT} (model.variant in {config_json})" in printed
    assert f"image size {RUN_SIZE} (model.image_size in {config_json})" in printed
    assert "VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2" in printed
    expected = flax_encoder_to_timm(params["rgb_encoder"], image_size=RUN_SIZE)
    assert_state_dicts_equal(load_file(out), expected)
    assert expected["pos_embed"].shape == (1, 1 + 16, 64)
    # Every form of --checkpoint inside the work directory finds the same config.json.
    for inside in ("checkpoints", "checkpoints/2", "checkpoints/2/state"):  # work dir, step folder, item
        (path, _), = export(os.path.join(workdir, inside), str(tmp_path / "again.safetensors"))
        assert_state_dicts_equal(load_file(path), expected)


def test_export_of_a_two_stage_workdir_names_the_stages(tmp_path, capsys):
    params = stage1_params(RUN_VARIANT)
    for stage in ("stage1", "stage2"):
        pretrain_workdir(tmp_path / "demo" / stage, params)
    demo = str(tmp_path / "demo")
    assert export_main(["--checkpoint", demo, "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "multi-stage work directory (stages: stage1, stage2)" in err
    assert f"--checkpoint {os.path.join(demo, 'stage2')}" in err
    with pytest.raises(ValueError, match="multi-stage"):
        export(demo, str(tmp_path / "x.safetensors"), full_model=True)


def test_export_flags_override_config_json(tmp_path, capsys):
    params = stage1_params(RUN_VARIANT)
    workdir = pretrain_workdir(tmp_path / "run", params)
    out = str(tmp_path / "rgb.safetensors")
    assert export_main(["--checkpoint", workdir, "--out", out, "--variant", "64x2x4/8", "--image-size", "48"]) == 0
    printed = capsys.readouterr().out
    assert "variant 64x2x4/8 (--variant)" in printed and "image size 48 (--image-size)" in printed
    assert "img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=4" in printed
    assert_state_dicts_equal(load_file(out), flax_encoder_to_timm(params["rgb_encoder"], image_size=48))
    # One flag: the other value still comes from config.json.
    assert export_main(["--checkpoint", workdir, "--out", out, "--image-size", "16,40"]) == 0
    printed = capsys.readouterr().out
    assert f"variant {RUN_VARIANT} (model.variant in " in printed and "image size 16x40 (--image-size)" in printed
    assert "img_size=(16, 40), patch_size=8, embed_dim=64, depth=2, num_heads=2" in printed
    # A config.json whose variant the weights do not have says where that variant came from.
    other = pretrain_workdir(tmp_path / "other", params, variant="64x4x2/8")
    assert export_main(["--checkpoint", other, "--out", out]) == 2
    config_json = os.path.join(other, "config.json")
    assert f"variant 64x4x2/8 (model.variant in {config_json}) is width 64, depth 4" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("{not json", "cannot read the run's config"),
    ('{"model": {"variant": "64x2x2/8"}}', "no model.variant and model.image_size in it"),
    ('{"model": {"variant": "64x2/8", "image_size": 32}}', "model.variant: ViT variant '64x2/8'"),
    ('{"model": {"variant": "64x2x2/8", "image_size": "32"}}', "model.image_size='32' is not a positive int"),
])
def test_broken_config_json_is_named(tmp_path, capsys, text, message):
    workdir = pretrain_workdir(tmp_path / "run", stage1_params(RUN_VARIANT))
    config_json = os.path.join(workdir, "config.json")
    with open(config_json, "w", encoding="utf-8") as f:
        f.write(text)
    out = str(tmp_path / "rgb.safetensors")
    assert export_main(["--checkpoint", workdir, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"{config_json}: " in err and message in err and "Traceback" not in err
    # Both flags given: config.json is not needed, so not read.
    assert export_main(["--checkpoint", workdir, "--out", out, "--variant", RUN_VARIANT, "--image-size", "32"]) == 0


def test_named_sizes_print_timm_model_names():
    from mmcmae_jax.models.vit import parse_variant
    assert timm_constructor(parse_variant("B/16"), 224) == (
        'timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="")')
    assert 'img_size=(256, 320)' in timm_constructor(parse_variant("L/16"), (256, 320))
    assert "vit_large_patch16_224" in timm_constructor(parse_variant("L/16"), (256, 320))


# ----------------------------------------------------------------------------------------------------
# With PyTorch and timm (the `torch` extra)

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("timm") is None,
                                 reason="the torch extra (torch, timm) is not installed")


def timm_tokens(model, images_nhwc):
    import torch
    model.eval()
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(np.asarray(images_nhwc)).permute(0, 3, 1, 2)).numpy()


def load_strict(model, state_dict):
    import torch
    result = model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@needs_torch
def test_parity_vit_base_224_through_exported_file(tmp_path):
    timm, _ = import_timm()
    from safetensors.torch import load_file as torch_load_file
    enc, params = encoder_params("B/16", size=(224, 224))
    (tmp_path / "p.msgpack").write_bytes(serialization.msgpack_serialize({"rgb_encoder": params}))
    (path, constructor), = export(str(tmp_path / "p.msgpack"), str(tmp_path / "b16.safetensors"), variant="B/16")
    model = eval(constructor, {"timm": timm})  # the printed constructor is the one that works
    model.load_state_dict(torch_load_file(path), strict=True)
    images = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
    ours, _ = jax.jit(enc.apply)({"params": params}, images)
    theirs = timm_tokens(model, images)
    assert theirs.shape == (2, 197, 768)
    assert np.max(np.abs(theirs - np.asarray(ours))) < 1e-4


@needs_torch
def test_export_with_config_json_sizes_loads_into_timm(tmp_path):
    timm, _ = import_timm()
    from safetensors.torch import load_file as torch_load_file
    params = stage1_params(RUN_VARIANT)
    workdir = pretrain_workdir(tmp_path / "run", params)
    (path, constructor), = export(workdir, str(tmp_path / "rgb.safetensors"))  # no variant, no image size
    model = eval(constructor, {"timm": timm})
    model.load_state_dict(torch_load_file(path), strict=True)
    images = np.random.RandomState(4).randn(2, RUN_SIZE, RUN_SIZE, 3).astype(np.float32)
    ours, _ = ViTEncoder(RUN_VARIANT).apply({"params": params["rgb_encoder"]}, images)
    theirs = timm_tokens(model, images)
    assert theirs.shape == (2, 1 + 16, 64)
    assert np.max(np.abs(theirs - np.asarray(ours))) < 1e-4


@needs_torch
@pytest.mark.parametrize("pos_embed,use_cls,size", [("sincos", True, (160, 96)), ("learned", True, (128, 128)),
                                                    ("sincos", False, (48, 80))])
def test_parity_other_sizes(pos_embed, use_cls, size):
    timm, _ = import_timm()
    from timm.models.vision_transformer import VisionTransformer
    enc, params = encoder_params(size=size, pos_embed=pos_embed, use_cls_token=use_cls, image_size=size[0])
    spec = encoder_spec(params, num_heads=2)
    model = VisionTransformer(**timm_kwargs(spec, size, class_token=use_cls))
    load_strict(model, flax_encoder_to_timm(params, image_size=size))
    images = np.random.RandomState(1).randn(2, *size, 3).astype(np.float32)
    ours, _ = enc.apply({"params": params}, images)
    theirs = timm_tokens(model, images)
    assert theirs.shape == ours.shape
    assert np.max(np.abs(theirs - np.asarray(ours))) < 1e-4


@needs_torch
def test_depth_encoder_loads_into_one_channel_timm():
    timm, _ = import_timm()
    from timm.models.vision_transformer import VisionTransformer
    enc, params = encoder_params(chans=1)
    model = VisionTransformer(in_chans=1, **timm_kwargs(encoder_spec(params, 2), 32))
    load_strict(model, flax_encoder_to_timm(params, image_size=32))
    images = np.random.RandomState(2).randn(1, 32, 32, 1).astype(np.float32)
    assert np.max(np.abs(timm_tokens(model, images) - np.asarray(enc.apply({"params": params}, images)[0]))) < 1e-4


@needs_torch
def test_timm_round_trip_is_exact():
    """timm random weights -> Flax (learned table) -> timm: bit for bit, and the same outputs."""
    timm, torch = import_timm()
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                              global_pool="")
    for p in model.parameters():  # timm's init has zero biases and unit norms too
        p.data.add_(0.05 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    enc, template = encoder_params(size=(64, 64), pos_embed="learned", image_size=64)
    params = load_mae_into_encoder(sd, template, image_size=64)
    back = flax_encoder_to_timm(params)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    images = np.random.RandomState(3).randn(2, 64, 64, 3).astype(np.float32)
    assert np.max(np.abs(timm_tokens(model, images) - np.asarray(enc.apply({"params": params}, images)[0]))) < 1e-4


@needs_torch
def test_official_mae_pth_layout_and_weights_only(tmp_path):
    import torch
    sd = mae_state_dict()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v).to(torch.bfloat16 if k == "norm.bias" else torch.float32)
                          for k, v in sd.items()}, "epoch": 1599}, str(path))
    _, template = encoder_params()
    params = load_mae_into_encoder(str(path), template)
    np.testing.assert_array_equal(params["cls_token"], sd["cls_token"])
    assert params["norm"]["bias"].dtype == np.float32
    assert read_state_dict(str(path)).keys() == sd.keys()

    class Payload:  # a pickle that would run code on load
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"model": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pth: cannot be read .*UnpicklingError") as err:
        read_state_dict(str(evil))
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
