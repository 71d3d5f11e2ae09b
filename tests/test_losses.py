"""The four losses against independent NumPy computations, and their properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcmae_jax import losses


def rel_err(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


def l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_info_nce(z_a, z_b, tau):
    """Loop-based: for each anchor, -log softmax at its positive, both directions, averaged."""
    total, n_terms = 0.0, 0
    for a, b in ((z_a, z_b), (z_b, z_a)):
        for i in range(a.shape[0]):
            sims = np.array([a[i] @ b[k] for k in range(b.shape[0])], np.float64) / tau
            total += -(sims[i] - np.log(np.sum(np.exp(sims))))
            n_terms += 1
    return total / n_terms


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_info_nce_per_image_matches_numpy(tau):
    rng = np.random.default_rng(0)
    z_rgb, z_depth = l2n(rng.normal(size=(3, 10, 8))), l2n(rng.normal(size=(3, 10, 8)))
    ours = losses.patch_info_nce(jnp.asarray(z_rgb, jnp.float32), jnp.asarray(z_depth, jnp.float32), tau)
    expected = np.mean([np_info_nce(z_rgb[b], z_depth[b], tau) for b in range(3)])
    assert rel_err(ours, expected) < 1e-5


def test_info_nce_whole_batch_matches_numpy():
    rng = np.random.default_rng(1)
    z_rgb, z_depth = l2n(rng.normal(size=(2, 6, 8))), l2n(rng.normal(size=(2, 6, 8)))
    ours = losses.patch_info_nce(jnp.asarray(z_rgb, jnp.float32), jnp.asarray(z_depth, jnp.float32), 0.1, "batch")
    expected = np_info_nce(z_rgb.reshape(12, 8), z_depth.reshape(12, 8), 0.1)
    assert rel_err(ours, expected) < 1e-5


@pytest.mark.parametrize("negatives", ["image", "batch", "position"])
def test_info_nce_without_invalid_patches_matches_numpy(negatives):
    """Invalid patches drop out of both directions, as anchors and as candidates; a frame with none valid
    adds nothing, and with no valid patch at all the loss is 0."""
    rng = np.random.default_rng(3)
    z_rgb, z_depth = l2n(rng.normal(size=(3, 6, 8))), l2n(rng.normal(size=(3, 6, 8)))
    valid = rng.random((3, 6)) > 0.3
    valid[2] = False
    ours = losses.patch_info_nce(jnp.asarray(z_rgb, jnp.float32), jnp.asarray(z_depth, jnp.float32), 0.1,
                                 negatives, jnp.asarray(valid))
    if negatives == "batch":
        expected = np_info_nce(z_rgb[valid], z_depth[valid], 0.1)
    elif negatives == "image":  # per image, then weighted by each image's valid patches
        expected = sum(np_info_nce(z_rgb[b][valid[b]], z_depth[b][valid[b]], 0.1) * valid[b].sum()
                       for b in range(2)) / valid.sum()
    else:  # per position, over the frames valid there, weighted by their number
        expected = sum(np_info_nce(z_rgb[:, i][valid[:, i]], z_depth[:, i][valid[:, i]], 0.1) * valid[:, i].sum()
                       for i in range(6) if valid[:, i].any()) / valid.sum()
    assert rel_err(ours, expected) < 1e-5
    none_valid = losses.patch_info_nce(jnp.asarray(z_rgb), jnp.asarray(z_depth), 0.1, negatives,
                                       jnp.zeros((3, 6), bool))
    grad = jax.grad(lambda z: losses.patch_info_nce(z, jnp.asarray(z_depth), 0.1, negatives,
                                                    jnp.asarray(valid)))(jnp.asarray(z_rgb, jnp.float32))
    assert float(none_valid) == 0.0
    assert np.all(np.isfinite(grad)) and not np.any(grad[2])


def test_info_nce_equal_similarities_is_log_n():
    z = jnp.ones((2, 16, 4)) / 2.0  # every pair has the same similarity
    assert abs(float(losses.patch_info_nce(z, z, 0.1)) - np.log(16)) < 1e-5
    assert abs(float(losses.patch_info_nce(z, z, 0.1, "batch")) - np.log(32)) < 1e-5


def test_info_nce_falls_when_positives_align():
    rng = np.random.default_rng(2)
    z = l2n(rng.normal(size=(1, 16, 32)))
    aligned = losses.patch_info_nce(jnp.asarray(z), jnp.asarray(z), 0.1)
    shuffled = losses.patch_info_nce(jnp.asarray(z), jnp.asarray(z[:, ::-1]), 0.1)
    assert float(aligned) < float(shuffled)


def test_position_alone_solves_per_image_negatives_but_not_batch_negatives():
    """Why the default negatives are the whole batch: embeddings that encode only the patch position
    (the same in every frame and both modalities) drive the per-image loss to ~0, while with batch
    negatives they cannot do better than log(B) (the same position in B frames is indistinguishable)."""
    batch, patches = 4, 16
    position_only = jnp.broadcast_to(jnp.eye(patches)[None], (batch, patches, patches))
    per_image = losses.patch_info_nce(position_only, position_only, 0.05, "image")
    whole_batch = losses.patch_info_nce(position_only, position_only, 0.05, "batch")
    same_position = losses.patch_info_nce(position_only, position_only, 0.05, "position")
    assert float(per_image) < 1e-6
    assert abs(float(whole_batch) - np.log(batch)) < 1e-4
    # With only the same position of the other frames as negatives, position is no help at all: the
    # loss is that of equal similarities, log(B), as for a model that learned nothing.
    assert abs(float(same_position) - np.log(batch)) < 1e-4
    assert abs(float(losses.uniform_info_nce(jnp.ones((batch, patches), bool), "position")) - np.log(batch)) < 1e-6


def np_masked_mse(pred, target, weight, valid):
    num = den = 0.0
    for b, i, q in np.ndindex(pred.shape):
        w = weight[b, i] * valid[b, i, q]
        num += w * (float(pred[b, i, q]) - float(target[b, i, q])) ** 2
        den += w
    return num / den


def random_patches(seed, shape=(2, 6, 16)):
    rng = np.random.default_rng(seed)
    pred, target = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    mask = (rng.random(shape[:2]) < 0.6).astype(np.float32)
    valid = (rng.random(shape) < 0.8).astype(np.float32)
    return pred, target, mask, valid


def test_depth_reconstruction_matches_numpy_on_masked_patches():
    pred, target, mask, valid = random_patches(3)
    ours = losses.depth_reconstruction_loss(*map(jnp.asarray, (pred, target, mask, valid)))
    assert rel_err(ours, np_masked_mse(pred, target, mask, valid)) < 1e-5


def test_denoising_matches_numpy_on_visible_patches():
    pred, noise, mask, valid = random_patches(4)
    ours = losses.denoising_loss(*map(jnp.asarray, (pred, noise, mask, valid)))
    assert rel_err(ours, np_masked_mse(pred, noise, 1.0 - mask, valid)) < 1e-5


@pytest.mark.parametrize("loss_fn", [losses.depth_reconstruction_loss, losses.denoising_loss])
def test_invalid_pixels_change_neither_loss_nor_gradient(loss_fn):
    pred, target, mask, valid = map(jnp.asarray, random_patches(5))
    value_and_grad = jax.value_and_grad(loss_fn)
    loss, grad = value_and_grad(pred, target, mask, valid)
    # Arbitrary values, even NaN, where the pixel is invalid: same loss, same gradient.
    garbage_target = jnp.where(valid > 0, target, jnp.nan)
    garbage_pred = jnp.where(valid > 0, pred, 1e6)
    loss2, grad2 = value_and_grad(garbage_pred, garbage_target, mask, valid)
    assert float(loss) == float(loss2)
    np.testing.assert_array_equal(grad, grad2)
    assert np.all(np.asarray(grad)[np.asarray(valid) == 0] == 0)


def test_masked_mse_with_nothing_selected_is_zero():
    pred, target, mask, valid = map(jnp.asarray, random_patches(6))
    assert float(losses.masked_patch_mse(pred, target, jnp.zeros_like(mask), valid)) == 0.0


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_smooth_l1_matches_numpy(beta):
    rng = np.random.default_rng(7)
    student, teacher = rng.normal(size=(4, 32)).astype(np.float32), rng.normal(size=(4, 32)).astype(np.float32)
    d = (student.astype(np.float64) - teacher)
    expected = np.mean([0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta for x in d.ravel()])
    assert rel_err(losses.smooth_l1_distill(jnp.asarray(student), jnp.asarray(teacher), beta), expected) < 1e-5


def test_smooth_l1_no_gradient_to_teacher_and_bad_beta():
    student, teacher = jnp.ones((2, 3)), jnp.zeros((2, 3))
    g_teacher = jax.grad(lambda t: losses.smooth_l1_distill(student, t))(teacher)
    assert float(jnp.abs(g_teacher).max()) == 0.0
    with pytest.raises(ValueError, match="beta"):
        losses.smooth_l1_distill(student, teacher, 0.0)


def test_losses_are_float32_under_bfloat16_inputs():
    pred, target, mask, valid = map(jnp.asarray, random_patches(8))
    loss = losses.masked_patch_mse(pred.astype(jnp.bfloat16), target.astype(jnp.bfloat16), mask, valid)
    assert loss.dtype == jnp.float32


def np_normalize_patches(patches, valid):
    out = np.zeros(patches.shape, np.float64)
    for b, i in np.ndindex(patches.shape[:2]):
        values = patches[b, i][valid[b, i] > 0].astype(np.float64)
        if len(values) > 1:
            out[b, i][valid[b, i] > 0] = (values - values.mean()) / np.sqrt(values.var(ddof=1) + 1e-6)
    return out


def test_normalize_patches_matches_numpy_over_valid_values():
    """MAE's norm_pix target; for depth over the measured pixels only (NaN where unmeasured stays out)."""
    _, target, _, valid = random_patches(9)
    target = 3.0 + 2.0 * target
    valid[0, 0] = 0          # a patch without depth
    valid[0, 1] = 0
    valid[0, 1, 5] = 1       # a patch with one measured pixel
    garbage = np.where(valid > 0, target, np.nan)
    ours = np.asarray(losses.normalize_patches(jnp.asarray(garbage), jnp.asarray(valid)))
    np.testing.assert_allclose(ours, np_normalize_patches(target, valid), atol=1e-5)
    rgb = random_patches(10)[1]
    np.testing.assert_allclose(losses.normalize_patches(jnp.asarray(rgb)),
                               np_normalize_patches(rgb, np.ones_like(rgb)), atol=1e-5)


def test_zero_noise_denoising_matches_numpy_and_is_mean_sigma_squared():
    _, noise, mask, valid = random_patches(11)
    expected = np_masked_mse(np.zeros_like(noise), noise, 1.0 - mask, valid)
    assert rel_err(losses.zero_noise_denoising_loss(*map(jnp.asarray, (noise, mask, valid))), expected) < 1e-5
    # sigma ~ U[0, 1], e ~ N(0, 1): E[(sigma e)^2] = E[sigma^2] = 1/3.
    rng = np.random.default_rng(12)
    sigma = rng.uniform(size=(4096, 1, 1))
    noise = sigma * rng.normal(size=(4096, 4, 16))
    mask = np.zeros((4096, 4))
    trivial = losses.zero_noise_denoising_loss(jnp.asarray(noise, jnp.float32), jnp.asarray(mask),
                                               jnp.ones(noise.shape))
    assert abs(float(trivial) - 1 / 3) < 0.02


def np_image_mean_loss(target, mask, valid, channels):
    num = den = 0.0
    for b in range(target.shape[0]):
        t = target[b].reshape(-1, channels).astype(np.float64)
        v = valid[b].reshape(-1, channels)
        means = [t[v[:, c] > 0, c].mean() for c in range(channels)]
        prediction = np.tile(means, target.shape[1] * target.shape[2] // channels).reshape(target.shape[1:])
        w = mask[b][:, None] * valid[b]
        num += np.sum(w * (prediction - target[b]) ** 2)
        den += np.sum(w)
    return num / den


@pytest.mark.parametrize("channels", [1, 3])
def test_image_mean_reconstruction_matches_numpy(channels):
    """The trivial L_depth (one channel, valid pixels) and L_rgb (per channel): each image's mean target."""
    _, target, mask, valid = random_patches(13, (2, 6, 4 * channels))
    target = target + np.tile(np.arange(channels, dtype=np.float32) * 5.0, 4)  # each channel its own mean
    if channels == 3:
        valid = np.ones_like(valid)
    ours = losses.image_mean_reconstruction_loss(jnp.asarray(target), jnp.asarray(mask),
                                                 None if channels == 3 else jnp.asarray(valid), channels)
    assert rel_err(ours, np_image_mean_loss(target, mask, valid, channels)) < 1e-5


@pytest.mark.parametrize("negatives", ["image", "batch", "position"])
def test_uniform_info_nce_is_the_loss_of_equal_similarities(negatives):
    """log(candidates), averaged as patch_info_nce averages: per image log n_b weighted by n_b, log n, or
    per position log m_i weighted by m_i."""
    valid = np.random.default_rng(14).random((3, 16)) > 0.4
    valid[2] = False
    counts = valid.sum(axis=1) if negatives == "image" else valid.sum(axis=0)
    expected = (np.log(counts.sum()) if negatives == "batch"
                else sum(n * np.log(n) for n in counts if n) / counts.sum())
    ours = losses.uniform_info_nce(jnp.asarray(valid), negatives)
    assert rel_err(ours, expected) < 1e-6
    z = jnp.ones((3, 16, 4)) / 2.0  # every pair has the same similarity
    assert rel_err(losses.patch_info_nce(z, z, 0.1, negatives, jnp.asarray(valid)), expected) < 1e-5
    assert float(losses.uniform_info_nce(jnp.zeros((3, 16), bool), negatives)) == 0.0


def test_batch_mean_distill_matches_numpy():
    teacher = np.random.default_rng(15).normal(size=(5, 32)).astype(np.float32) * 2.0
    d = teacher.mean(axis=0, keepdims=True).astype(np.float64) - teacher
    expected = np.mean([0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5 for x in d.ravel()])
    assert rel_err(losses.batch_mean_distill_loss(jnp.asarray(teacher)), expected) < 1e-5
