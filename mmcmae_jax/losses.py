"""The four M3 losses, as plain functions of arrays. Every loss is computed in float32.

Shapes: B examples, N patches, E embedding channels, Q = P*P*C values per patch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def patch_info_nce(z_rgb: jax.Array, z_depth: jax.Array, temperature: float = 0.1,
                   negatives: str = "image", patch_valid: jax.Array | None = None) -> jax.Array:
    """Bidirectional patch-level InfoNCE between RGB and depth patch embeddings.

    z_rgb, z_depth: (B, N, E), L2-normalised; patch i of one modality is the positive of patch i of the
    other (same location), every other patch a negative. patch_valid: (B, N) or None; a patch with
    patch_valid = 0 (no depth measured there) is neither an anchor nor a candidate, in both directions.

        s_ik = z_rgb_i . z_depth_k / tau,  i, k over the valid patches V
        L_rgb->depth = -1/|V| sum_i log( exp(s_ii) / sum_k exp(s_ik) )
        L_depth->rgb = -1/|V| sum_k log( exp(s_kk) / sum_i exp(s_ik) )
        L_c = (L_rgb->depth + L_depth->rgb) / 2

    negatives="image": k runs over the patches of the same image, i over all anchors of the batch.
    negatives="batch": k runs over every patch of the batch (B*N candidates).
    With no valid patch the loss is 0.
    """
    z_rgb, z_depth = z_rgb.astype(jnp.float32), z_depth.astype(jnp.float32)
    valid = jnp.ones(z_rgb.shape[:2], bool) if patch_valid is None else patch_valid.astype(bool)
    if negatives == "batch":
        z_rgb, z_depth = z_rgb.reshape(1, -1, z_rgb.shape[-1]), z_depth.reshape(1, -1, z_depth.shape[-1])
        valid = valid.reshape(1, -1)
    elif negatives != "image":
        raise ValueError(f"negatives must be 'image' or 'batch', got {negatives!r}")
    logits = jnp.einsum("bie,bke->bik", z_rgb, z_depth) / temperature
    # A finite floor, not -inf: an image with no valid patch keeps a finite logsumexp (its rows are
    # weighted 0 below), so neither the loss nor the gradient sees inf - inf.
    logits = jnp.where(valid[:, :, None] & valid[:, None, :], logits, -1e9)
    positives = jnp.diagonal(logits, axis1=1, axis2=2)  # (B, N): s_ii
    rgb_to_depth = jax.nn.logsumexp(logits, axis=2) - positives
    depth_to_rgb = jax.nn.logsumexp(logits, axis=1) - positives
    weight = valid.astype(jnp.float32)
    per_patch = jnp.where(valid, 0.5 * (rgb_to_depth + depth_to_rgb), 0.0)
    return jnp.sum(per_patch * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def masked_patch_mse(pred: jax.Array, target: jax.Array, patch_weight: jax.Array,
                     pixel_valid: jax.Array | None = None) -> jax.Array:
    """Mean squared error over the selected patches and valid pixels.

    pred, target: (B, N, Q); patch_weight: (B, N), 1 for the patches that count (e.g. the masked ones);
    pixel_valid: (B, N, Q) or None, 1 where the target value is valid (depth > 0), broadcast over Q.

        L = sum_{b,i,q} w_bi v_biq (pred_biq - target_biq)^2 / sum_{b,i,q} w_bi v_biq

    Invalid pixels get weight 0, so they change neither the loss nor its gradient. With nothing
    selected the loss is 0.
    """
    weight = patch_weight.astype(jnp.float32)[..., None]
    weight = weight * (jnp.ones(pred.shape, jnp.float32) if pixel_valid is None else pixel_valid.astype(jnp.float32))
    # where() before squaring, not a product after: a non-finite value at an excluded pixel then reaches
    # neither the loss nor, through 0 * inf, the gradient.
    diff = jnp.where(weight > 0, pred.astype(jnp.float32) - target.astype(jnp.float32), 0.0)
    total = jnp.sum(jnp.square(diff) * weight)
    return total / jnp.maximum(jnp.sum(weight), 1.0)


def depth_reconstruction_loss(pred: jax.Array, clean_depth: jax.Array, mask: jax.Array,
                              pixel_valid: jax.Array) -> jax.Array:
    """L_depth: MSE between predicted and clean depth patches on the *masked* patches (mask = 1),
    valid pixels only."""
    return masked_patch_mse(pred, clean_depth, mask, pixel_valid)


def denoising_loss(pred: jax.Array, added_noise: jax.Array, mask: jax.Array,
                   pixel_valid: jax.Array) -> jax.Array:
    """L_denoise: MSE between the prediction and the added noise sigma*e on the *visible* patches
    (mask = 0), valid pixels only."""
    return masked_patch_mse(pred, added_noise, 1.0 - mask, pixel_valid)


def smooth_l1_distill(student: jax.Array, teacher: jax.Array, beta: float = 1.0) -> jax.Array:
    """L_distill: smooth-L1 between student and (frozen) teacher features, averaged over elements.

        d = student - teacher;  l(d) = 0.5 d^2 / beta  if |d| < beta,  |d| - 0.5 beta  otherwise

    No gradient flows into the teacher.
    """
    if beta <= 0:
        raise ValueError(f"smooth-L1 threshold beta must be positive, got {beta}")
    diff = student.astype(jnp.float32) - jax.lax.stop_gradient(teacher).astype(jnp.float32)
    absdiff = jnp.abs(diff)
    return jnp.mean(jnp.where(absdiff < beta, 0.5 * jnp.square(diff) / beta, absdiff - 0.5 * beta))
