"""Heads, the fine-tuning objective (layer decay, frozen encoder, encoder start), configs and splits."""
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcmae_jax.config import ConfigError
from mmcmae_jax.run.start import start_encoder
from mmcmae_jax.transfer import objective as tobj
from mmcmae_jax.transfer.config import (SCANNET20_CLASSES, SCANNET20_FROM_NYU40, finetune_config,
                                        validate_finetune)
from mmcmae_jax.transfer.heads import DenseModel, dpt_hooks, positive_depth
from conftest import drawn_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(task="segmentation", **changes):
    config = finetune_config(task, num_classes=5 if task == "segmentation" else 0)
    config.model.update(variant="64x2x2/8", image_size=32)
    config.head.features = 16
    config.update(batch_size=2, total_steps=3)
    for key, value in changes.items():
        config[key] = value
    return config


def test_dpt_hooks_are_the_quarter_ends():
    assert dpt_hooks(12) == (3, 6, 9, 12)
    assert dpt_hooks(24) == (6, 12, 18, 24)
    assert dpt_hooks(2) == (1, 1, 2, 2)


@pytest.fixture(scope="module")
def seg_model():
    """Parameters drawn with NumPy into the shapes `init` gives: compiling the initialisers of the whole
    model costs ~10 s of CPU, which these tests do not need."""
    config = tiny(model=dict(tiny().model, variant="64x4x2/8"))
    model = tobj.make_model(config)
    params = drawn_params(model.init, jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"]
    return config, model, params


def test_dpt_head_predicts_at_the_input_resolution(seg_model):
    _, model, params = seg_model
    assert set(params) == {"rgb_encoder", "head"}
    rgb = jax.random.normal(jax.random.key(0), (2, 32, 48, 3))  # not square: 4 x 6 patches
    logits = jax.jit(model.apply)({"params": params}, rgb)
    assert logits.shape == (2, 32, 48, 5) and logits.dtype == jnp.float32


def test_linear_depth_head_is_positive_in_float32_under_bfloat16():
    rgb = jax.random.normal(jax.random.key(0), (2, 32, 48, 3))
    depth = DenseModel("depth", 1, head="linear", variant="64x2x2/8", dtype=jnp.bfloat16)
    out = jax.jit(lambda r: depth.apply(depth.init(jax.random.key(1), r), r))(rgb)
    assert out.shape == (2, 32, 48, 1) and out.dtype == jnp.float32 and float(out.min()) > 0


def test_depth_output_never_loses_its_gradient():
    # softplus + floor did: a head pushed below the floor had d log(depth) / d raw ~ 0 and stayed there.
    raw = jnp.array([-40.0, -8.0, -3.0, 0.0, 3.0, 8.0, 40.0])
    depth = positive_depth(raw)
    grad = jax.vmap(jax.grad(lambda r: jnp.log(positive_depth(r))))(raw)
    assert np.all(np.isfinite(np.asarray(depth))) and float(depth.min()) > 0
    np.testing.assert_allclose(float(positive_depth(jnp.array(0.0))), 1.0)
    assert np.all(np.asarray(grad[1:-1]) > 0.4)           # raw within +-8 (depth 0.3 mm .. 3 km): learns
    assert np.all(np.asarray(grad[2:-2]) > 0.85)          # 5 cm .. 20 m: almost log-linear
    np.testing.assert_allclose(np.log(np.asarray(positive_depth(jnp.array([-1.0, 1.0])))),
                               8 * np.tanh(np.array([-1.0, 1.0]) / 8), rtol=1e-6)


def test_dpt_reads_the_configured_blocks(seg_model):
    """Changing a block DPT does not read leaves its output unchanged; the default hooks read it."""
    _, model, params = seg_model
    rgb = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    changed = jax.tree.map(lambda x: x, params)
    block = changed["rgb_encoder"]["blocks"]["blocks_3"]["mlp"]["fc2"]
    block["kernel"] = block["kernel"] + 1.0
    early = jax.jit(model.clone(hooks=(1, 1, 2, 2)).apply)
    np.testing.assert_allclose(early({"params": params}, rgb), early({"params": changed}, rgb))
    default = jax.jit(model.apply)  # dpt_hooks(4) = (1, 2, 3, 4)
    assert not np.allclose(default({"params": params}, rgb), default({"params": changed}, rgb))


def test_layer_decay_scales_follow_beit():
    config = tiny()
    params = jax.eval_shape(lambda: tobj.make_model(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    scales = tobj.layer_decay_scale(2, 0.5)(params)
    enc = scales["rgb_encoder"]
    assert float(enc["patch_embed"]["proj"]["kernel"]) == 0.125 and float(enc["cls_token"]) == 0.125
    assert float(enc["blocks"]["blocks_0"]["attn"]["qkv"]["kernel"]) == 0.25
    assert float(enc["blocks"]["blocks_1"]["mlp"]["fc1"]["bias"]) == 0.5
    assert float(enc["norm"]["scale"]) == 1.0
    assert all(float(s) == 1.0 for s in jax.tree.leaves(scales["head"]))
    assert tobj.update_scale_for(tiny(layer_decay=1.0)) is None
    assert tobj.update_scale_for(tiny(freeze_encoder=True)) is None


def test_frozen_encoder_trains_the_head_only(seg_model):
    config, _, full = seg_model
    config = config.copy_and_resolve_references()
    config.freeze_encoder = True
    objective = tobj.make_transfer_objective(config)
    batch = {"rgb": jax.random.normal(jax.random.key(0), (2, 32, 32, 3)),
             "label": jax.random.randint(jax.random.key(1), (2, 32, 32), 0, 5)}
    assert set(jax.eval_shape(objective.init, jax.random.key(2), batch)) == {"head"}
    params, frozen = {"head": full["head"]}, {"rgb_encoder": full["rgb_encoder"]}
    loss_fn = jax.jit(objective.loss)
    loss = float(loss_fn(params, frozen, batch, None)[0])
    assert np.isfinite(loss)
    # The frozen encoder is the one the loss reads: another encoder gives another loss.
    other = {"rgb_encoder": jax.tree.map(lambda x: x * 1.5, frozen["rgb_encoder"])}
    assert float(loss_fn(params, other, batch, None)[0]) != pytest.approx(loss)
    # The gradient is taken with respect to the head alone (the trainer differentiates `params`).
    grads = jax.eval_shape(jax.grad(lambda p: objective.loss(p, frozen, batch, None)[0]), params)
    assert set(grads) == {"head"}


def test_label_remap_scannet20():
    table = tobj.label_table(tiny(num_classes=20, label_remap=SCANNET20_FROM_NYU40))
    labels = jnp.asarray([0, 13, 14, 23, 38, 39, 255])  # wall, desk, shelves, refrigerator, otherfurn., otherprop
    np.testing.assert_array_equal(tobj.remap_labels(labels, table), [0, 12, 255, 14, 19, 255, 255])
    assert SCANNET20_CLASSES[14] == "refrigerator" and len(SCANNET20_CLASSES) == 20


def test_encoder_starts_from_a_pretraining_checkpoint_and_from_mae_weights(tmp_path):
    from safetensors.numpy import save_file
    from mmcmae_jax.models.vit import ViTEncoder
    from mmcmae_jax.port.timm_layout import flax_encoder_to_timm
    from mmcmae_jax.train.checkpoint import Checkpointer

    source = ViTEncoder("64x2x2/8").init(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))["params"]
    checkpointer = Checkpointer(str(tmp_path / "stage2" / "checkpoints"), async_save=False)
    checkpointer.save(5, {"step": 5, "params": {"rgb_encoder": source, "decoder": {"w": np.ones(3)}}}, None, force=True)
    checkpointer.close()
    got = start_encoder(tiny(init_from=str(tmp_path / "stage2")))
    np.testing.assert_array_equal(got["blocks"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                  source["blocks"]["blocks_1"]["attn"]["qkv"]["kernel"])

    save_file({k: np.ascontiguousarray(v) for k, v in flax_encoder_to_timm(source, image_size=32).items()},
              str(tmp_path / "mae.safetensors"))
    got = start_encoder(tiny(init_from_mae=str(tmp_path / "mae.safetensors")))
    np.testing.assert_allclose(got["patch_embed"]["proj"]["kernel"], source["patch_embed"]["proj"]["kernel"])
    assert start_encoder(tiny()) is None  # from scratch

    with pytest.raises(ConfigError, match=r"config\.init_from=.*other shapes"):
        start_encoder(tiny(init_from=str(tmp_path / "stage2"), model=dict(tiny().model, variant="64x2x2/16")))
    with pytest.raises(ConfigError, match=r"config\.init_from="):
        start_encoder(tiny(init_from=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"config\.init_from_mae="):
        start_encoder(tiny(init_from_mae=str(tmp_path / "missing.pth")))


@pytest.mark.parametrize("field,value", [
    ("task", "instance"), ("num_classes", 1), ("head.kind", "mlp"), ("head.hooks", (1, 2, 3)),
    ("loss.depth", "l1"), ("layer_decay", 0.0), ("label_fraction", 1.5), ("eval.average", "batch"),
    ("label_remap", (0, 9)), ("init_from_mae", "x.pth"),
])
def test_bad_fields_are_named(field, value):
    config = tiny(init_from="somewhere") if field == "init_from_mae" else tiny()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError, match=r"config\." + ("init_from" if field == "init_from_mae" else field.replace(".", r"\."))):
        validate_finetune(config)


def load_config(path, preset):
    spec = importlib.util.spec_from_file_location("finetune_config_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "finetune_*.py")))


def test_every_dataset_has_a_config():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"finetune_nyu_depth.py", "finetune_nyu_seg.py", "finetune_scannet_seg.py", "finetune_sunrgbd_seg.py",
            "finetune_procedural_depth.py", "finetune_procedural_seg.py"} <= names


@pytest.mark.parametrize("path", CONFIGS)
def test_every_finetune_config_and_preset_validates(path):
    for preset in ("", "vit_s16", "vit_l16,frac10", "linear", "frozen,frac40"):
        config = load_config(path, preset)
        validate_finetune(config)
    assert load_config(path, "frac20").label_fraction == 0.2
    assert load_config(path, "linear").head.kind == "linear" and load_config(path, "linear").freeze_encoder
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(path, "frac0")
    with open(path) as f:
        text = f.read()
    assert f"python -m mmcmae_jax.finetune --config configs/{os.path.basename(path)}" in text
    assert "Expected" in text


def test_label_fractions_are_deterministic_and_nested(tmp_path, monkeypatch):
    from mmcmae_jax.data import example_from_arrays, serialize_example, write_records
    from mmcmae_jax.transfer.splits import choose_frames, write_label_fraction

    keys = [("nyu", f"{i:04d}") for i in range(200)]
    chosen = {f: choose_frames(keys, f, seed=0) for f in (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)}
    assert [len(c) for c in chosen.values()] == [20, 40, 80, 120, 160, 200]
    assert chosen[0.1] < chosen[0.2] < chosen[0.4] < chosen[0.6] < chosen[0.8] < chosen[1.0]
    assert choose_frames(list(reversed(keys)), 0.1, seed=0) == chosen[0.1]  # order does not matter
    assert choose_frames(keys, 0.1, seed=1) != chosen[0.1]

    rng = np.random.default_rng(0)
    def frame(i, labelled):
        return serialize_example(example_from_arrays(
            rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), np.full((8, 8), 1000, np.uint16), 0.001,
            frame_id=f"{i:04d}", source="test", label=np.zeros((8, 8), np.uint8) if labelled else None))
    write_records(str(tmp_path / "in-00000-of-00001.array_record"), [frame(i, i % 2 == 0) for i in range(20)])
    manifest = write_label_fraction(str(tmp_path / "in-00000-of-00001.array_record"), str(tmp_path / "sub"), 0.5,
                                    labelled_only=True)
    assert manifest["candidates"] == 10 and manifest["chosen"] == 5
    assert all(int(f.split("/")[1]) % 2 == 0 for f in manifest["frames"])
    from mmcmae_jax.data import read_records
    assert sum(1 for _ in read_records(manifest["shards"][0])) == 5

    # Another choice into the same folder replaces the subset: no shard of the first choice is left.
    source = str(tmp_path / "in-00000-of-00001.array_record")
    again = write_label_fraction(source, str(tmp_path / "sub"), 1.0, labelled_only=True, num_shards=2)
    on_disk = sorted(p for p in os.listdir(tmp_path / "sub") if p.endswith(".array_record"))
    assert on_disk == sorted(os.path.basename(p) for p in again["shards"]) and len(on_disk) == 2
    assert sum(1 for p in again["shards"] for _ in read_records(p)) == 10

    # A failure part-way through writing leaves neither a readable partial subset nor a manifest.
    from mmcmae_jax.transfer import splits
    original, calls = splits.parsed_records, []

    def fails_while_writing(*args, **kwargs):  # the second pass writes; the disk fills at its 4th record
        calls.append(1)
        for k, item in enumerate(original(*args, **kwargs)):
            if len(calls) == 2 and k == 3:
                raise OSError("disk full")
            yield item
    monkeypatch.setattr(splits, "parsed_records", fails_while_writing)
    with pytest.raises(OSError, match="disk full"):
        write_label_fraction(source, str(tmp_path / "broken"), 0.5, labelled_only=True)
    assert len(calls) == 2 and os.listdir(tmp_path / "broken") == []


def write_frames(path, labelled):
    """Tiny records, one per entry of `labelled`: True with a label map, False without, bytes written as
    they are (a bad record)."""
    from mmcmae_jax.data import example_from_arrays, serialize_example, write_records
    rng = np.random.default_rng(0)

    def frame(i, entry):
        if isinstance(entry, bytes):
            return entry
        return serialize_example(example_from_arrays(
            rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), np.full((8, 8), 1000, np.uint16), 0.001,
            frame_id=f"{i:04d}", source="test", label=np.zeros((8, 8), np.uint8) if entry else None))
    write_records(str(path), [frame(i, entry) for i, entry in enumerate(labelled)])
    return str(path)


def test_segmentation_refuses_records_without_labels_at_start(tmp_path):
    from mmcmae_jax.finetune import run_finetune
    from mmcmae_jax.run.workdir import evaluate_workdir
    from mmcmae_jax.transfer.splits import has_labelled_frame, require_labelled_frames
    unlabelled = write_frames(tmp_path / "raw-00000-of-00001.array_record", [False] * 6)
    # A labelled frame after unlabelled ones counts, and the scan stops there: the bad record after it
    # is never read.
    mixed = write_frames(tmp_path / "mixed-00000-of-00001.array_record", [False, False, True, b"not a record"])
    assert has_labelled_frame(mixed) and not has_labelled_frame(unlabelled)

    config = tiny()
    config.data.path, config.eval_data.path = unlabelled, mixed
    with pytest.raises(ConfigError, match=r"config\.data\.path='.*raw-00000-of-00001\.array_record'.*label map"):
        run_finetune(config, str(tmp_path / "work"))
    assert not os.path.isdir(tmp_path / "work" / "checkpoints")  # stopped before the first step
    config.data.path, config.eval_data.path = mixed, unlabelled
    with pytest.raises(ConfigError, match=r"config\.eval_data\.path='.*raw-00000-of-00001\.array_record'"):
        run_finetune(config, str(tmp_path / "work"))
    with pytest.raises(ConfigError, match=r"config\.eval_data\.path="):  # the evaluation command too
        evaluate_workdir(config, str(tmp_path / "work"))
    config.eval_data.path = str(tmp_path / "missing-*.array_record")
    with pytest.raises(ConfigError, match=r"config\.eval_data\.path='.*missing-\*.*matches no files"):
        evaluate_workdir(config, str(tmp_path / "work"))
    depth = tiny("depth")  # depth needs no label map
    depth.data.path = unlabelled
    require_labelled_frames(depth, "data")


def test_encoder_of_another_model_is_named_with_the_overrides_to_use(tmp_path):
    import ml_collections
    from mmcmae_jax.config import model_config
    from mmcmae_jax.models.vit import ViTEncoder
    from mmcmae_jax.train.checkpoint import Checkpointer

    # A stage-2 work directory of a 4-block encoder pre-trained at 64 px, with the config.json it records.
    stage2 = tmp_path / "stage2"
    source = jax.eval_shape(ViTEncoder("64x4x2/8").init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    checkpointer = Checkpointer(str(stage2 / "checkpoints"), async_save=False)
    checkpointer.save(5, {"step": 5, "params": {"rgb_encoder": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                                                             source)}}, None, force=True)
    checkpointer.close()
    pretraining = ml_collections.ConfigDict({"model": model_config()})
    pretraining.model.update(variant="64x4x2/8", image_size=64)
    (stage2 / "config.json").write_text(pretraining.to_json_best_effort(indent=2))

    for init_from in (stage2, stage2 / "checkpoints"):  # the work directory or its checkpoints/
        with pytest.raises(ConfigError) as err:
            start_encoder(tiny(init_from=str(init_from)))
        message = str(err.value)
        assert f"config.init_from={str(init_from)!r}" in message
        assert "64x4x2/8 at 64 px" in message and "config.model is 64x2x2/8 at 32 px" in message
        assert "--config.model.variant=64x4x2/8 --config.model.image_size=64" in message
        assert "pytree" not in message

    # Without config.json the weights say what they can.
    (stage2 / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"width 64, 4 blocks, patch 8.*no config\.json.*config\.model\.variant"):
        start_encoder(tiny(init_from=str(stage2)))


def test_evaluation_refuses_the_config_of_another_task_or_model(tmp_path):
    from mmcmae_jax.run.mismatch import check_recorded_config
    from mmcmae_jax.run.workdir import evaluate_workdir, read_config
    work = tmp_path / "depth_run"
    work.mkdir()
    (work / "config.json").write_text(tiny("depth").to_json_best_effort(indent=2))  # as finetune.py writes it

    with pytest.raises(ConfigError) as err:
        evaluate_workdir(tiny("segmentation"), str(work))
    message = str(err.value)
    assert str(work) in message and "task='depth'" in message and "config.task='segmentation'" in message

    recorded = read_config(str(work / "checkpoints"))  # the checkpoints/ folder names its run too
    with pytest.raises(ConfigError, match=r"config\.head\.features=32.*--config\.head\.features=16"):
        check_recorded_config(tiny("depth", head=dict(tiny().head, features=32)), recorded, str(work))
    check_recorded_config(tiny("depth"), recorded, str(work))  # the run's own config
    check_recorded_config(tiny("depth", model=dict(tiny().model, image_size=64)), recorded, str(work))  # sin-cos
    assert read_config(str(tmp_path / "no_record")) is None  # older runs: not checked
    check_recorded_config(tiny("segmentation"), None, str(tmp_path / "no_record"))
    (work / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: cannot read the run's config"):
        read_config(str(work))


@pytest.mark.parametrize("name", ["finetune_nyu_depth.py", "finetune_nyu_seg.py", "finetune_sunrgbd_seg.py",
                                  "finetune_scannet_seg.py"])
def test_real_data_configs_refuse_an_empty_data_path_at_start(tmp_path, name):
    """Without data paths these configs would train and evaluate on procedural rooms, silently."""
    from mmcmae_jax.finetune import run_finetune
    config = load_config(os.path.join(ROOT, "configs", name), "vit_s16")
    with pytest.raises(ConfigError, match=r"config\.data\.path is empty"):
        run_finetune(config, str(tmp_path / "a"))
    config.data.path = str(tmp_path)  # given; the evaluation set still missing
    with pytest.raises(ConfigError, match=r"config\.eval_data\.path is empty"):
        run_finetune(config, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        run_finetune(config, str(tmp_path / "afile"))


def test_training_abs_rel_is_the_evaluations_clipped_abs_rel():
    """The training log's AbsRel clips the prediction to [eval.min_depth, eval.max_depth] and counts the
    pixels in that range, as the evaluation does (a raw prediction can be near 0, and AbsRel explode)."""
    config = tiny("depth")
    config.eval.update(min_depth=1.5, max_depth=3.0)
    objective = tobj.make_transfer_objective(config)
    rng = np.random.default_rng(0)
    batch = {"rgb": jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32),
             "depth_m": jnp.asarray(rng.uniform(0.5, 5.0, size=(2, 32, 32, 1)), jnp.float32)}
    params = drawn_params(objective.init, jax.random.key(0), batch)
    _, logged = jax.jit(objective.loss)(params, {}, batch, None)
    raw = np.asarray(jax.jit(objective.forward)(params, batch, None)["pred"])
    pred = np.clip(raw, 1.5, 3.0)
    target = np.asarray(batch["depth_m"])
    counted = (target > 1.5) & (target < 3.0)
    assert 0 < counted.mean() < 1 and (raw < 1.5).any()
    np.testing.assert_allclose(float(logged["abs_rel"]), np.mean(np.abs(pred - target)[counted] / target[counted]),
                               rtol=1e-5)
