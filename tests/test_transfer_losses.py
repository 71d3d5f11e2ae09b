"""Fine-tuning losses against independent NumPy computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcmae_jax.transfer import losses


def depth_batch(seed=0, shape=(3, 8, 8, 1)):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.5, 6.0, shape).astype(np.float32)
    pred = (target * rng.uniform(0.6, 1.6, shape)).astype(np.float32)
    valid = rng.random(shape) > 0.3
    valid[2] = False  # an image without a measured pixel
    return pred, np.where(valid, target, 0).astype(np.float32), valid


def numpy_silog(pred, target, valid, lam, scale):
    values = []
    for p, t, v in zip(pred, target, valid):
        if not v.any():
            continue
        g = np.log(p[v].astype(np.float64)) - np.log(t[v].astype(np.float64))
        values.append(scale * np.sqrt(np.mean(g ** 2) - lam * np.mean(g) ** 2))
    return np.mean(values)


@pytest.mark.parametrize("lam,scale", [(0.85, 10.0), (0.5, 1.0), (0.0, 1.0)])
def test_silog_matches_numpy(lam, scale):
    pred, target, valid = depth_batch()
    got = losses.silog_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid), lam, scale)
    np.testing.assert_allclose(float(got), numpy_silog(pred, target, valid, lam, scale), rtol=1e-4)


def test_silog_is_scale_invariant_at_lambda_one_and_ignores_invalid_pixels():
    pred, target, valid = depth_batch(1)
    a = losses.silog_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid), 1.0, 1.0)
    b = losses.silog_loss(jnp.asarray(pred * 3.0), jnp.asarray(target), jnp.asarray(valid), 1.0, 1.0)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-3)
    wild = np.where(valid, pred, 1e4).astype(np.float32)  # invalid pixels may hold anything
    c = losses.silog_loss(jnp.asarray(wild), jnp.asarray(target), jnp.asarray(valid), 1.0, 1.0)
    np.testing.assert_allclose(float(a), float(c), rtol=1e-6)


def test_silog_gradient_is_finite_for_an_exact_prediction():
    _, target, valid = depth_batch(2)
    exact = np.where(valid, target, 1.0).astype(np.float32)
    grad = jax.grad(lambda p: losses.silog_loss(p, jnp.asarray(target), jnp.asarray(valid)))(jnp.asarray(exact))
    assert np.all(np.isfinite(np.asarray(grad)))


def numpy_berhu(pred, target, valid, threshold):
    x = np.abs(pred[valid].astype(np.float64) - target[valid])
    c = threshold * x.max()
    return np.mean(np.where(x <= c, x, (x ** 2 + c ** 2) / (2 * c)))


@pytest.mark.parametrize("threshold", [0.2, 0.5, 1.0])
def test_berhu_matches_numpy(threshold):
    pred, target, valid = depth_batch(3)
    got = losses.berhu_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(valid), threshold)
    np.testing.assert_allclose(float(got), numpy_berhu(pred, target, valid, threshold), rtol=1e-5)
    if threshold < 1:  # both branches occur, so the test covers the quadratic part too
        x = np.abs(pred[valid] - target[valid])
        assert (x > threshold * x.max()).any() and (x <= threshold * x.max()).any()


def test_cross_entropy_with_ignore_matches_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 5, 6, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, (2, 5, 6)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.3] = 255
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    keep = labels != 255
    expected = -np.mean(log_probs[keep, labels[keep]])
    got = losses.cross_entropy_ignore(jnp.asarray(logits), jnp.asarray(labels), 255)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # Out-of-range labels add nothing, and are reported.
    labels_bad = labels.copy()
    labels_bad[0, 0, 0] = 9
    assert float(losses.label_out_of_range(jnp.asarray(labels_bad), 7)) == pytest.approx(1 / labels.size)
    assert float(losses.label_out_of_range(jnp.asarray(labels), 7)) == 0.0


def test_cross_entropy_of_an_all_ignored_batch_is_zero_not_nan():
    logits = jnp.zeros((1, 4, 4, 3))
    assert float(losses.cross_entropy_ignore(logits, jnp.full((1, 4, 4), 255), 255)) == 0.0
