"""Fine-tuning losses: depth (SILog, berHu) with a validity mask, segmentation cross-entropy with an
ignore label. Plain functions of arrays; each has a NumPy reference test (tests/test_transfer_losses.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def silog_loss(pred: jax.Array, target: jax.Array, valid: jax.Array, lam: float = 0.85,
               scale: float = 10.0) -> jax.Array:
    """Scale-invariant log loss of Eigen, Puhrsch and Fergus (NIPS 2014), per image, averaged over images.

    With g_i = log(pred_i) - log(target_i) over the n valid pixels of an image:
        L_img = scale * sqrt( mean(g^2) - lam * mean(g)^2 )
    lam = 1 is fully scale-invariant, lam = 0 the log RMSE; 0.85 and scale 10 are the values BTS and
    AdaBins use. Images without a valid pixel are left out of the average.

    pred, target: (B, H, W[, 1]) metres, pred > 0; valid: same shape, nonzero where target is measured.
    """
    valid = valid.astype(jnp.float32).reshape(pred.shape[0], -1)
    safe_target = jnp.where(valid > 0, target.reshape(valid.shape), 1.0)
    g = (jnp.log(pred.reshape(valid.shape).astype(jnp.float32)) - jnp.log(safe_target)) * valid
    n = jnp.sum(valid, axis=1)
    mean_g = jnp.sum(g, axis=1) / jnp.maximum(n, 1.0)
    mean_g2 = jnp.sum(g * g, axis=1) / jnp.maximum(n, 1.0)
    # The variance-like term is >= 0 for lam <= 1 but can round below 0; the epsilon keeps the gradient
    # of sqrt finite when a prediction is exactly right.
    per_image = scale * jnp.sqrt(jnp.maximum(mean_g2 - lam * mean_g ** 2, 0.0) + 1e-8)
    has_pixels = (n > 0).astype(jnp.float32)
    return jnp.sum(per_image * has_pixels) / jnp.maximum(jnp.sum(has_pixels), 1.0)


def berhu_loss(pred: jax.Array, target: jax.Array, valid: jax.Array, threshold: float = 0.2) -> jax.Array:
    """Reverse Huber (berHu) loss of Laina et al. (3DV 2016), mean over the valid pixels of the batch.

    x = pred - target, c = threshold * max|x| over the valid pixels of the batch (held constant):
        B(x) = |x|                 if |x| <= c
               (x^2 + c^2) / (2c)  otherwise
    """
    valid = valid.astype(jnp.float32).reshape(pred.shape)
    diff = jnp.abs(pred.astype(jnp.float32) - target.reshape(pred.shape)) * valid
    c = jax.lax.stop_gradient(threshold * jnp.max(diff))
    c = jnp.maximum(c, 1e-6)  # all-exact predictions: no division by zero
    per_pixel = jnp.where(diff <= c, diff, (diff ** 2 + c ** 2) / (2 * c)) * valid
    return jnp.sum(per_pixel) / jnp.maximum(jnp.sum(valid), 1.0)


def cross_entropy_ignore(logits: jax.Array, labels: jax.Array, ignore_label: int = 255) -> jax.Array:
    """Mean softmax cross-entropy over the pixels whose label is a class (0..C-1).

    logits (B, H, W, C); labels (B, H, W) int. Pixels labelled `ignore_label`, and any label outside
    0..C-1, add nothing (the training loop reports the out-of-range fraction, see
    `label_out_of_range`; evaluation refuses such labels)."""
    num_classes = logits.shape[-1]
    counted = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    safe = jnp.where(counted, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    counted = counted.astype(jnp.float32)
    return jnp.sum(nll * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def label_out_of_range(labels: jax.Array, num_classes: int, ignore_label: int = 255) -> jax.Array:
    """Fraction of pixels whose label is neither a class nor the ignore label: nonzero means the
    config's num_classes does not fit the data."""
    bad = (labels != ignore_label) & ((labels < 0) | (labels >= num_classes))
    return jnp.mean(bad.astype(jnp.float32))
