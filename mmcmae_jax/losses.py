"""The four M3 losses, as plain functions of arrays. Every loss is computed in float32.

Shapes: B examples, N patches, E embedding channels, Q = P*P*C values per patch.

Beside each loss, what a trivial prediction scores on the same batch (the last section): the trainer
logs it next to the loss, so a logged loss reads against what a model that learned nothing would get.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


NEGATIVES = ("image", "batch", "position")


def _candidate_groups(z_rgb, z_depth, valid, negatives: str):
    """Regroup (B, N, ...) so that axis 0 indexes the groups within which patches are each other's
    candidates, and axis 1 the patches of a group."""
    if negatives == "image":
        return z_rgb, z_depth, valid
    if negatives == "batch":
        return (z_rgb.reshape(1, -1, z_rgb.shape[-1]), z_depth.reshape(1, -1, z_depth.shape[-1]),
                valid.reshape(1, -1))
    if negatives == "position":
        return z_rgb.swapaxes(0, 1), z_depth.swapaxes(0, 1), valid.T
    raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")


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
    negatives="position": k runs over the patches at the same position in every image of the batch
    (B candidates), so the position embedding cannot tell the positive from a negative.
    With no valid patch the loss is 0.
    """
    z_rgb, z_depth = z_rgb.astype(jnp.float32), z_depth.astype(jnp.float32)
    valid = jnp.ones(z_rgb.shape[:2], bool) if patch_valid is None else patch_valid.astype(bool)
    z_rgb, z_depth, valid = _candidate_groups(z_rgb, z_depth, valid, negatives)
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


def normalize_patches(patches: jax.Array, pixel_valid: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
    """Each patch to zero mean and unit variance over its valid values: the reconstruction target of
    MAE's norm_pix_loss (and MultiMAE's), for depth over the measured pixels only.

    patches: (B, N, Q); pixel_valid: (B, N, Q) or None (every value valid). With n_bi = sum_q v_biq,

        mu_bi  = sum_q v_biq x_biq / n_bi
        var_bi = sum_q v_biq (x_biq - mu_bi)^2 / (n_bi - 1)       (unbiased, as torch.var in MAE)
        x'_biq = (x_biq - mu_bi) / sqrt(var_bi + eps)              where v_biq = 1, else 0

    A patch with one valid value becomes 0 there; one with none stays 0 (no loss reads it).
    """
    x = patches.astype(jnp.float32)
    valid = jnp.ones(x.shape, bool) if pixel_valid is None else pixel_valid.astype(bool)
    x = jnp.where(valid, x, 0.0)  # an invalid value (even NaN) enters neither the mean nor the variance
    count = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
    mean = jnp.sum(x, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
    centred = jnp.where(valid, x - mean, 0.0)
    var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / jnp.maximum(count - 1.0, 1.0)
    return centred / jnp.sqrt(var + eps)


# What a trivial prediction scores. Each takes the loss's own targets, masks and options, so it is the
# value of that loss for a model that learned nothing from the input; none depends on parameters.

def zero_noise_denoising_loss(added_noise: jax.Array, mask: jax.Array, pixel_valid: jax.Array) -> jax.Array:
    """L_denoise of predicting no noise: the mean of (sigma*e)^2 over the visible valid depth pixels,
    about E[sigma^2] (1/3 for sigma ~ U[0, 1])."""
    return denoising_loss(jnp.zeros(added_noise.shape, jnp.float32), added_noise, mask, pixel_valid)


def image_mean_reconstruction_loss(target: jax.Array, mask: jax.Array, pixel_valid: jax.Array | None = None,
                                   channels: int = 1) -> jax.Array:
    """L_depth or L_rgb of predicting, everywhere, each image's mean target per channel.

    target: (B, N, Q) with Q = P*P*channels, channels last within a patch (`patchify`); mask: (B, N), 1 on
    the patches the loss reads; pixel_valid: (B, N, Q) or None. The mean runs over every valid value of
    the image (masked and visible patches alike), per channel c:

        m_bc = sum_{i,p} v_bipc t_bipc / sum_{i,p} v_bipc
        L = masked_patch_mse(m_bc broadcast to (B, N, Q), target, mask, pixel_valid)
    """
    batch, num_patches, values = target.shape
    by_channel = (batch, num_patches * values // channels, channels)
    t = target.astype(jnp.float32).reshape(by_channel)
    v = (jnp.ones(by_channel, jnp.float32) if pixel_valid is None
         else pixel_valid.astype(jnp.float32).reshape(by_channel))
    t = jnp.where(v > 0, t, 0.0)
    image_mean = jnp.sum(t, axis=1, keepdims=True) / jnp.maximum(jnp.sum(v, axis=1, keepdims=True), 1.0)
    prediction = jnp.broadcast_to(image_mean, by_channel).reshape(target.shape)
    return masked_patch_mse(prediction, target, mask, pixel_valid)


def uniform_info_nce(patch_valid: jax.Array, negatives: str = "image") -> jax.Array:
    """`patch_info_nce` of equal similarities everywhere: the log of each anchor's number of candidates,
    averaged over the valid anchors as the loss averages.

    patch_valid: (B, N). With n_g the valid patches of candidate group g and n = sum_g n_g,
        L = sum_g n_g log n_g / n
    where the groups are the images (negatives="image"), the whole batch ("batch": L = log n), or the
    positions ("position": n_g is the number of images valid at position g). With no valid patch it
    is 0, as the loss.
    """
    valid = patch_valid.astype(jnp.float32)
    _, _, valid = _candidate_groups(valid[..., None], valid[..., None], valid, negatives)
    per_group = jnp.sum(valid, axis=1)
    total = jnp.sum(per_group)
    return jnp.sum(per_group * jnp.log(jnp.maximum(per_group, 1.0))) / jnp.maximum(total, 1.0)


def batch_mean_distill_loss(teacher: jax.Array, beta: float = 1.0) -> jax.Array:
    """L_distill of predicting, for every example, the teacher features' batch mean (per feature).

    teacher: (B, D).  L = smooth_l1_distill(mean_b teacher_b broadcast to (B, D), teacher, beta)
    """
    teacher = jax.lax.stop_gradient(teacher).astype(jnp.float32)
    return smooth_l1_distill(jnp.broadcast_to(jnp.mean(teacher, axis=0, keepdims=True), teacher.shape), teacher, beta)
