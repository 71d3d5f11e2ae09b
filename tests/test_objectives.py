"""Both stages and the baseline objectives: jit forward + backward, gradients, teachers, configs."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcmae_jax.config import OBJECTIVES, validate
from mmcmae_jax.models.m3 import MultiModalMAE
from mmcmae_jax.models.masking import multimodal_masks
from mmcmae_jax.models.vit import patchify
from mmcmae_jax.objectives import init_stage2_from_stage1, make_objective, teacher_params_from_stage1
from conftest import drawn_params, tiny_batch, tiny_config
from test_losses import np_info_nce, np_masked_mse, np_normalize_patches


@pytest.fixture(scope="module")
def stage1_params():
    objective = make_objective(tiny_config(1))
    return objective.init(jax.random.key(0), tiny_batch())


def zero_leaves(grads):
    return [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
            if not np.any(np.asarray(g) != 0)]


def check_step(config, frozen):
    objective = make_objective(config)
    batch = tiny_batch()
    params = objective.init(jax.random.key(1), batch)
    grad_fn = jax.jit(jax.value_and_grad(objective.loss, argnums=(0, 1), has_aux=True))
    (loss, metrics), (grads, frozen_grads) = grad_fn(params, frozen, batch, jax.random.key(2))
    assert np.isfinite(float(loss)), metrics
    assert not zero_leaves(grads), f"parameters without gradient: {zero_leaves(grads)}"
    for g in jax.tree.leaves(frozen_grads):
        assert float(jnp.abs(g).max()) == 0.0  # the stage-1 teacher never learns
    return loss, metrics, params


@pytest.mark.parametrize("negatives,mask_ratio", [("image", 0.0), ("batch", 0.5), ("position", 0.0)])
def test_stage1_jits_and_every_parameter_learns(negatives, mask_ratio):
    loss, metrics, _ = check_step(tiny_config(1, negatives=negatives, stage1_mask_ratio=mask_ratio), {})
    assert set(metrics) == {"contrastive", "contrastive_other_frame", "contrastive_valid_patches",
                            "contrastive_trivial"}
    assert float(loss) > 0
    # tiny_batch: 2 frames of 16 patches; "position" compares each patch with that position in 2 frames
    candidates = 2 if negatives == "position" else int(16 * (1 - mask_ratio)) * (1 if negatives == "image" else 2)
    assert abs(float(metrics["contrastive_trivial"]) - np.log(candidates)) < 1e-5


def test_stage1_leaves_out_patches_without_depth():
    """A patch without depth is neither an anchor nor a negative: the loss equals the loss over the other
    patches alone, and a frame with no depth sends no gradient to the depth encoder."""
    config = tiny_config(1, negatives="batch")
    objective = make_objective(config)
    batch = tiny_batch()
    params = drawn_params(objective.init, jax.random.key(1), batch, scale=0.05)  # jitted below: eager is slow
    valid = np.ones((2, 32, 32, 1), np.float32)
    valid[0, :8, :8] = 0           # patch 0 of frame 0: no depth
    valid[0, 8:13, :8] = 0         # patch 4 of frame 0: 5/8 of its pixels missing
    valid[1, :3, 8:16] = 0         # patch 1 of frame 1: 3/8 missing
    out = jax.jit(objective.forward)(params, batch, jax.random.key(2))
    z_rgb, z_depth = np.asarray(out["z_rgb"], np.float64), np.asarray(out["z_depth"], np.float64)
    for min_valid, dropped in ((0.0, [(0, 0)]), (0.5, [(0, 0), (0, 4)])):
        config.objective.contrastive_min_valid_fraction = min_valid
        keep = np.ones((2, 16), bool)
        keep[tuple(zip(*dropped))] = False
        expected = np_info_nce(z_rgb[keep], z_depth[keep], config.objective.temperature)
        _, metrics = jax.jit(make_objective(config).loss)(params, {}, dict(batch, depth_valid=jnp.asarray(valid)),
                                                          jax.random.key(2))
        assert abs(float(metrics["contrastive"]) - expected) < 1e-4 * expected, min_valid
        assert abs(float(metrics["contrastive_valid_patches"]) - keep.mean()) < 1e-6

    objective = make_objective(tiny_config(1, negatives="batch"))
    no_depth = valid.copy()
    no_depth[0] = 0
    grad = jax.jit(jax.grad(lambda p, b: objective.loss(p, {}, b, jax.random.key(2))[0]))
    grads = grad(params, dict(batch, depth_valid=jnp.asarray(no_depth)))
    only_frame_1 = grad(params, {k: v[1:] for k, v in dict(batch, depth_valid=jnp.asarray(no_depth)).items()})
    chex.assert_trees_all_close(grads["depth_encoder"], only_frame_1["depth_encoder"], atol=1e-5, rtol=1e-4)


def test_m3_stage2_jits_every_parameter_learns_teacher_frozen(stage1_params):
    frozen = teacher_params_from_stage1(stage1_params)
    loss, metrics, _ = check_step(tiny_config(2), frozen)
    assert set(metrics) == {"depth", "denoise", "distill", "sigma_mean",
                            "depth_trivial", "denoise_trivial", "distill_trivial"}
    total = metrics["depth"] + metrics["denoise"] + metrics["distill"]
    np.testing.assert_allclose(loss, total, rtol=1e-6)  # alpha = w_denoise = gamma = 1


def test_default_m3_is_unchanged_by_the_noise_switches(stage1_params):
    """The default M3 stage 2 (noise, sigma embedding and denoising loss all on) has the parameters and,
    at the same randomness, the losses it had before the three were separate switches (recorded then)."""
    config = tiny_config(2)
    assert config.objective.depth_noise and config.objective.sigma_embedding and config.objective.weights.denoise == 1
    objective = make_objective(config)
    params = objective.init(jax.random.key(1), tiny_batch())
    assert sorted(params) == ["decoder", "decoder_norm", "depth_decoder_embed", "depth_encoder", "depth_head",
                              "depth_mask_token", "depth_modality_embed", "rgb_decoder_embed", "rgb_encoder",
                              "rgb_modality_embed", "sigma_embed"]
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 256576
    loss, metrics = jax.jit(objective.loss)(params, teacher_params_from_stage1(stage1_params), tiny_batch(),
                                            jax.random.key(2))
    recorded = dict(loss=5.372761249542236, depth=2.3325436115264893, denoise=1.7947620153427124,
                    distill=1.2454558610916138, sigma_mean=0.7521963715553284)
    got = dict(metrics, loss=loss)
    for name, value in recorded.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_named_objective_trains_and_logs_each_term_beside_its_trivial_value(name, stage1_params):
    config = tiny_config(2, name)
    frozen = teacher_params_from_stage1(stage1_params, config.objective.inputs) if config.objective.weights.distill else {}
    _, metrics, _ = check_step(config, frozen)
    terms = set(config.objective.targets) | {k for k in ("denoise", "distill") if config.objective.weights[k] > 0}
    assert {k for k in metrics if not k.endswith("_trivial") and k != "sigma_mean"} == terms
    assert {k for k in metrics if k.endswith("_trivial")} == {f"{t}_trivial" for t in terms}
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert ("sigma_mean" in metrics) == config.objective.depth_noise


BASELINES = {  # objectives beyond config.OBJECTIVES
    "depth_from_rgb": dict(inputs=("rgb",), targets=("depth",), depth_noise=False, sigma_embedding=False,
                           weights=dict(denoise=0.0, distill=0.0)),
    "m3_dirichlet_lognormal": dict(mask_mode="dirichlet", sigma_distribution="lognormal"),
    "m3_noise_without_sigma_embedding": dict(sigma_embedding=False),
    "m3_teacher_sees_visible_dirichlet": dict(distill_teacher_input="visible", mask_mode="dirichlet"),
    "multimae_noised_depth": dict(inputs=("rgb", "depth"), targets=("rgb",), weights=dict(denoise=0.0, distill=0.0)),
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_objectives_are_configurations(name, stage1_params):
    config = tiny_config(2, **BASELINES[name])
    frozen = teacher_params_from_stage1(stage1_params, config.objective.inputs) if config.objective.weights.distill else {}
    _, metrics, _ = check_step(config, frozen)
    expected = {t for t in config.objective.targets}
    expected |= {k for k in ("denoise", "distill") if config.objective.weights[k] > 0}
    assert expected | {f"{t}_trivial" for t in expected} <= set(metrics)


def test_noise_sigma_embedding_and_denoising_loss_are_separate_switches(stage1_params):
    """m3_noise_only is m3 without the denoising loss: same parameters, noise, masks and depth loss.
    Without the embedding there is no sigma_embed, yet the input is noised; without noise, none."""
    frozen = teacher_params_from_stage1(stage1_params)
    batch, rng = tiny_batch(), jax.random.key(2)
    results = {}
    for name in ("m3", "m3_noise_only", "m3_no_denoise"):
        objective = make_objective(tiny_config(2, name))
        params = objective.init(jax.random.key(1), batch)
        results[name] = params, objective.loss(params, frozen, batch, rng)[1], objective.forward(params, batch, rng)
    (m3_params, m3, _), (noise_params, noise_only, noised), (clean_params, _, clean) = (
        results["m3"], results["m3_noise_only"], results["m3_no_denoise"])
    chex.assert_trees_all_equal(noise_params, m3_params)
    assert "denoise" not in noise_only and "sigma_mean" in noise_only
    for name in ("depth", "distill", "sigma_mean"):
        np.testing.assert_allclose(noise_only[name], m3[name], rtol=1e-6)
    assert noised["added_noise"] is not None and float(jnp.abs(noised["added_noise"]).max()) > 0
    assert "sigma_embed" not in clean_params and clean["added_noise"] is None

    no_embedding = make_objective(tiny_config(2, sigma_embedding=False))
    params = no_embedding.init(jax.random.key(1), batch)
    assert "sigma_embed" not in params and no_embedding.forward(params, batch, rng)["added_noise"] is not None


def test_teacher_sees_the_full_frame_or_the_students_visible_patches(stage1_params):
    """"visible": the teacher encodes the student's visible patches only, so the content of the hidden RGB
    patches (which reaches nothing else in M3) no longer changes the loss; with nothing masked both agree."""
    frozen = teacher_params_from_stage1(stage1_params)
    batch, rng = tiny_batch(), jax.random.key(2)

    def distill(teacher_input, batch=batch, **objective):
        objective = make_objective(tiny_config(2, distill_teacher_input=teacher_input, **objective))
        params = init_stage2_from_stage1(objective.init(jax.random.key(1), batch), stage1_params)
        return float(objective.loss(params, frozen, batch, rng)[1]["distill"]), objective, params

    unmasked = dict(mask_ratio=dict(rgb=0.0, depth=0.0))
    assert abs(distill("full", **unmasked)[0] - distill("visible", **unmasked)[0]) < 1e-5
    full, objective, params = distill("full")
    visible, _, _ = distill("visible")
    assert abs(full - visible) > 1e-4
    hidden = np.asarray(objective.forward(params, batch, rng)["mask"]["rgb"]).reshape(2, 4, 4)
    hidden = hidden.repeat(8, 1).repeat(8, 2)[..., None] > 0
    tampered = dict(batch, rgb=jnp.where(hidden, 5.0, batch["rgb"]))
    assert abs(distill("visible", tampered)[0] - visible) < 1e-6
    assert abs(distill("full", tampered)[0] - full) > 1e-4


@pytest.mark.parametrize("name", ["mae_norm_pix", "multimae_norm_pix"])
def test_norm_pix_targets_match_numpy(name):
    """Each reconstruction loss reads its patches normalised per patch (depth over its valid pixels)."""
    config = tiny_config(2, name)
    objective = make_objective(config)
    batch, rng = tiny_batch(), jax.random.key(2)
    params = objective.init(jax.random.key(1), batch)
    _, metrics = objective.loss(params, {}, batch, rng)
    out = objective.forward(params, batch, rng)
    for target in config.objective.targets:
        pred, mask = np.asarray(out["pred"][target], np.float64), np.asarray(out["mask"][target])
        patches = np.asarray(patchify(batch[target], 8))
        valid = (np.asarray(patchify(batch["depth_valid"], 8)) if target == "depth" else np.ones_like(patches))
        expected = np_masked_mse(pred, np_normalize_patches(patches, valid), mask, valid)
        np.testing.assert_allclose(float(metrics[target]), expected, rtol=1e-4, err_msg=target)


def test_stage2_starts_from_stage1(stage1_params):
    objective = make_objective(tiny_config(2))
    params = init_stage2_from_stage1(objective.init(jax.random.key(3), tiny_batch()), stage1_params)
    chex.assert_trees_all_equal(params["rgb_encoder"], stage1_params["rgb_encoder"])
    chex.assert_trees_all_equal(params["depth_encoder"], stage1_params["depth_encoder"])
    assert "decoder" in params and "rgb_proj" not in params


def test_masked_depth_does_not_leak_into_prediction():
    """Changing hidden depth patches changes no prediction: the model sees visible patches only."""
    model = MultiModalMAE(variant="64x2x2/8", decoder_depth=1, decoder_width=32, decoder_heads=2,
                          use_sigma_embedding=False)
    batch = tiny_batch()
    masks = multimodal_masks(jax.random.key(4), 2, {"rgb": 16, "depth": 16}, {"rgb": 0.75, "depth": 0.75})
    images = {"rgb": batch["rgb"], "depth": batch["depth"]}
    params = model.init(jax.random.key(5), images, masks)
    out = model.apply(params, images, masks)
    chex.assert_shape(out["pred"]["depth"], (2, 16, 64))
    chex.assert_shape(out["pooled"]["rgb"], (2, 64))
    hidden = np.asarray(masks["depth"].mask).reshape(2, 4, 4).repeat(8, 1).repeat(8, 2)[..., None]
    tampered = dict(images, depth=jnp.where(hidden > 0, 100.0, images["depth"]))
    np.testing.assert_allclose(model.apply(params, tampered, masks)["pred"]["depth"], out["pred"]["depth"], atol=1e-5)
    visible_changed = dict(images, depth=jnp.where(hidden > 0, images["depth"], 100.0))
    assert not np.allclose(model.apply(params, visible_changed, masks)["pred"]["depth"], out["pred"]["depth"])


@pytest.mark.parametrize("field,value,message", [
    ("model.variant", "Q/16", "config.model.variant"),
    ("model.image_size", 30, "config.model.image_size"),
    ("objective.temperature", 0.0, "config.objective.temperature"),
    ("objective.weights.contrastive", 0.0, "config.objective.weights.contrastive"),
    ("objective.contrastive_min_valid_fraction", 1.0, "config.objective.contrastive_min_valid_fraction"),
])
def test_stage1_bad_config_names_field(field, value, message):
    config = tiny_config(1)
    section, *rest = field.split(".")
    target = config[section]
    for key in rest[:-1]:
        target = target[key]
    target[rest[-1]] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate(config)


def test_position_negatives_refuse_a_stage1_mask():
    config = tiny_config(1, negatives="position", stage1_mask_ratio=0.5)
    with pytest.raises(ValueError, match=r"config\.objective\.negatives: .*stage1_mask_ratio=0"):
        validate(config)
    config = tiny_config(1, negatives="pairs")
    with pytest.raises(ValueError, match=r"config\.objective\.negatives: 'pairs' is not one of"):
        validate(config)


@pytest.mark.parametrize("overrides,message", [
    (dict(inputs=("rgb",), targets=("depth",)), r"config\.objective\.depth_noise: .*depth is not among the inputs"),
    (dict(depth_noise=False), r"config\.objective\.sigma_embedding"),
    (dict(depth_noise=False, sigma_embedding=False), r"config\.objective\.weights\.denoise: .*depth_noise=True"),
    (dict(targets=("rgb",), weights=dict(rgb=1.0)), r"config\.objective\.weights\.denoise: .*not among the targets"),
    (dict(distill_teacher_input="masked"), r"config\.objective\.distill_teacher_input"),
    (dict(sigma_distribution="gamma"), r"config\.objective\.sigma_distribution"),
    (dict(mask_mode="blocks"), r"config\.objective\.mask_mode"),
    (dict(targets=("normals",)), r"config\.objective\.targets"),
])
def test_stage2_bad_config_names_field(overrides, message):
    config = tiny_config(2, **overrides)
    with pytest.raises(ValueError, match=message):
        validate(config)
    config = tiny_config(2)
    config.objective.mask_ratio.rgb = 1.5
    with pytest.raises(ValueError, match=r"config\.objective\.mask_ratio\.rgb"):
        validate(config)


@pytest.mark.parametrize("stage", [1, 2])
def test_bfloat16_compute_keeps_float32_parameters_and_losses(stage, stage1_params):
    config = tiny_config(stage)
    config.model.dtype = "bfloat16"
    objective = make_objective(config)
    batch = tiny_batch()
    params = objective.init(jax.random.key(1), batch)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    frozen = teacher_params_from_stage1(stage1_params) if stage == 2 else {}
    (loss, metrics), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(params, frozen, batch,
                                                                                        jax.random.key(2))
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    # bf16 compute stays close to float32 compute on the same parameters and randomness.
    config.model.dtype = "float32"
    loss32, _ = make_objective(config).loss(params, frozen, batch, jax.random.key(2))
    assert abs(float(loss) - float(loss32)) < 0.05 * abs(float(loss32))


def test_a_new_modality_is_one_entry_of_the_modality_table(monkeypatch):
    """Surface normals as a reconstruction target: one table entry, no other code; the model grows its
    head and the loss its term, checked against NumPy (normals are no input: every patch is hidden)."""
    from mmcmae_jax import modalities
    monkeypatch.setitem(modalities.MODALITIES, "normals", modalities.Modality(channels=3))
    config = tiny_config(2, "mask3d", targets=("depth", "normals"))
    with config.objective.weights.unlocked():
        config.objective.weights.normals = 1.0
    batch = dict(tiny_batch(seed=3))
    batch["normals"] = jnp.asarray(np.random.default_rng(4).normal(size=batch["rgb"].shape), jnp.float32)
    objective = make_objective(config)
    rng = jax.random.PRNGKey(0)
    params = objective.init(rng, batch)
    assert params["normals_head"]["kernel"].shape[-1] == 8 * 8 * 3
    loss, metrics = objective.loss(params, {}, batch, rng)
    pred = np.asarray(objective.forward(params, batch, rng)["pred"]["normals"])
    b, s = batch["normals"].shape[0], 32 // 8
    patches = np.asarray(batch["normals"]).reshape(b, s, 8, s, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, s * s, -1)
    np.testing.assert_allclose(float(metrics["normals"]), np.mean((pred - patches) ** 2), rtol=1e-5)
    image_means = np.asarray(batch["normals"]).reshape(b, 1, 1, -1, 3).mean(axis=3)  # per image and channel
    trivial = np.mean((patches.reshape(b, s * s, 64, 3) - image_means) ** 2)
    np.testing.assert_allclose(float(metrics["normals_trivial"]), trivial, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(metrics["depth"]) + float(metrics["normals"]), rtol=1e-6)
