"""Frozen-feature probes and the image-blind predictor (transfer/probe.py), against NumPy."""
import jax.numpy as jnp
import numpy as np

from mmcmae_jax.config import model_config
from mmcmae_jax.transfer import probe
from mmcmae_jax.transfer.heads import resize_bilinear


def test_upsampling_matrix_is_the_heads_bilinear_resize():
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    up = probe._upsampling_matrix(4, 32)
    np.testing.assert_allclose(np.einsum("ih,nhwc,jw->nijc", up, x, up),
                               np.asarray(resize_bilinear(jnp.asarray(x), 32, 32)), atol=1e-5)


def _design(tokens, grid, size, stride):
    """NumPy: the probe's design matrix at the strided pixels (standardised tokens, upsampled, + bias)."""
    n, t, d = tokens.shape
    x = (tokens - tokens.reshape(-1, d).mean(0)) / (tokens.reshape(-1, d).std(0) + 1e-6)
    up = probe._upsampling_matrix(grid, size)[stride // 2::stride]
    pixels = np.einsum("ih,nhwd,jw->nijd", up, x.reshape(n, grid, grid, d), up).reshape(-1, d)
    return np.concatenate([pixels, np.ones((len(pixels), 1))], 1)


def test_depth_probe_reaches_the_least_squares_fit():
    rng = np.random.default_rng(1)
    n, grid, d, size, stride = 40, 4, 6, 16, 4
    tokens = rng.normal(size=(n, grid * grid, d)).astype(np.float32)
    design = _design(tokens, grid, size, stride)
    log_depth = design @ rng.normal(0, 0.3, d + 1) + 1.0 + rng.normal(0, 0.05, len(design))
    # Full-resolution targets whose strided pixels carry log_depth (the others are never read).
    depth = np.ones((n, size, size, 1), np.float32)
    depth[:, stride // 2::stride, stride // 2::stride, 0] = np.exp(log_depth).reshape(n, size // stride, -1)
    fitted = probe.fit_probe(tokens, depth, "depth", steps=400, lr=0.05, weight_decay=0.0, pixel_stride=stride)
    coef, *_ = np.linalg.lstsq(design, log_depth, rcond=None)
    optimum = np.mean((design @ coef - log_depth) ** 2)
    assert fitted["train_loss"][-1] <= optimum * 1.02 + 1e-5, (fitted["train_loss"][-1], optimum)
    # Its predictions at those pixels are the least-squares predictions.
    pred = probe.probe_predictions(fitted, tokens, (size, size), "depth")
    np.testing.assert_allclose(np.log(pred[:, stride // 2::stride, stride // 2::stride, 0]).ravel(),
                               design @ coef, atol=0.03)


def test_segmentation_probe_separates_classes_the_tokens_encode():
    rng = np.random.default_rng(2)
    n, grid, d, size, classes = 30, 4, 5, 16, 3
    token_class = rng.integers(0, classes, size=(n, grid * grid))
    centres = rng.normal(0, 3, size=(classes, d))
    tokens = (centres[token_class] + rng.normal(0, 0.3, size=(n, grid * grid, d))).astype(np.float32)
    # Each token's class fills its patch; some pixels are unlabelled (255) and must not count.
    labels = np.repeat(np.repeat(token_class.reshape(n, grid, grid), size // grid, 1), size // grid, 2)
    labels = np.where(rng.random(labels.shape) < 0.1, 255, labels).astype(np.uint8)
    fitted = probe.fit_probe(tokens, labels, "segmentation", classes, steps=200)
    pred = probe.probe_predictions(fitted, tokens, (size, size), "segmentation")
    centre = size // grid // 2  # a patch centre is that patch's class, away from bilinear blending
    np.testing.assert_array_equal(pred[:, centre::size // grid, centre::size // grid].reshape(n, -1), token_class)
    frames = probe.Frames(np.zeros((n, size, size, 3)), np.zeros((n, size, size, 1)), labels)
    scores = probe.score(pred, frames, "segmentation", classes)
    assert scores["pixel_acc"] > 0.8


def test_image_blind_predictor_is_the_per_pixel_median_and_mode():
    rng = np.random.default_rng(3)
    depth = rng.uniform(0.5, 5, size=(7, 4, 4, 1)).astype(np.float32)
    depth[0, 0, 0, 0] = 0.0  # a hole is not part of the median
    depth[:, 1, 1, 0] = 0.0  # a pixel never measured: the median over every valid pixel
    labels = rng.integers(0, 3, size=(7, 4, 4)).astype(np.uint8)
    labels[:, 2, 2] = [1, 1, 255, 255, 255, 0, 2]  # unlabelled does not vote
    frames = probe.Frames(np.zeros((7, 4, 4, 3)), depth, labels)
    blind_depth = probe.image_blind_predictions(frames, 2, "depth")
    assert blind_depth.shape == (2, 4, 4, 1)
    for r in range(4):
        for c in range(4):
            valid = depth[:, r, c, 0][depth[:, r, c, 0] > 0]
            expected = np.median(valid) if len(valid) else np.median(depth[depth > 0])
            assert np.isclose(blind_depth[1, r, c, 0], expected)
            votes = [int(v) for v in labels[:, r, c] if v != 255]
            assert probe.image_blind_predictions(frames, 1, "segmentation")[0, r, c] == \
                max(set(votes), key=lambda v: (votes.count(v), -v))


def test_encoder_tokens_do_not_depend_on_the_batching():
    model = model_config()
    model.update(variant="32x1x2/8", image_size=16)
    params = probe.random_encoder_params(model, 0, 16)
    rgb = np.random.default_rng(4).normal(size=(5, 16, 16, 3)).astype(np.float32)
    a, b = probe.encoder_tokens(params, model, rgb, batch_size=2), probe.encoder_tokens(params, model, rgb, 8)
    assert a.shape == (5, 4, 32)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # Another seed is another encoder.
    other = probe.encoder_tokens(probe.random_encoder_params(model, 1, 16), model, rgb)
    assert not np.allclose(a, other)
