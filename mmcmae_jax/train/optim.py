"""AdamW with warm-up and cosine decay, gradient clipping, and no weight decay on norms, biases, tokens
and position embeddings (MAE's recipe); a step with a non-finite gradient moves no parameter."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Leaves whose name ends with one of these are never decayed, whatever their rank.
NO_DECAY_NAMES = ("bias", "scale", "cls_token", "pos_embed", "mask_token", "modality_embed")


def optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        base_lr=1.5e-4,         # lr = base_lr * global_batch / 256 (MAE)
        lr=-1.0,                # > 0 overrides the scaled lr
        warmup_steps=40,
        min_lr=0.0,
        b1=0.9,
        b2=0.95,
        weight_decay=0.05,
        grad_clip=1.0,          # global-norm clip; 0 disables it
    ))


def peak_lr(optim: ml_collections.ConfigDict, global_batch: int) -> float:
    return optim.lr if optim.lr > 0 else optim.base_lr * global_batch / 256


def decay_mask(params) -> dict:
    """True for the leaves that get weight decay: weight matrices and kernels only."""
    def decays(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return leaf.ndim > 1 and not name.endswith(NO_DECAY_NAMES)
    return jax.tree_util.tree_map_with_path(decays, params)


def scale_updates(scale_fn):
    """Multiply each leaf's update by scale_fn(params)'s leaf: a per-leaf learning-rate factor (AdamW's
    update is -lr * (adam direction + wd * param), so scaling it scales lr for both terms)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u * s, updates, scale_fn(params)), state

    return optax.GradientTransformation(init, update)


def clip_and_skip_nonfinite(inner: optax.GradientTransformation, max_norm: float) -> optax.GradientTransformation:
    """`inner` on gradients clipped to global norm `max_norm` (0: unclipped); a non-finite gradient moves
    no parameter.

    One global norm serves both the clip and the finiteness check, and the rest is elementwise, so XLA
    fuses each leaf's clip, Adam and decay into one pass. optax's clip_by_global_norm and apply_if_finite
    (a lax.cond around the whole update) took 3.3x as long on the ViT-B/16 stage-2 tree on the 2-core
    CPU (measured by benchmarks/step_parts.py, since retired: `git log -- benchmarks/step_parts.py`).

    On a non-finite step `inner` sees zero gradients and its update is zeroed: the parameters stay as
    they were and Adam's moments decay by one step. The host stops the run on that step's metrics
    (trainer.check_finite); this only keeps the NaN out of the parameters until it does.
    """
    def update(grads, state, params=None):
        norm = optax.tree.norm(grads)
        finite = jnp.isfinite(norm)
        clip = jnp.minimum(1.0, max_norm / norm) if max_norm > 0 else jnp.ones(())
        factor = jnp.where(finite, clip, 0.0)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, 0) * factor.astype(g.dtype), grads)
        updates, state = inner.update(grads, state, params)
        return jax.tree.map(lambda u: u * finite.astype(u.dtype), updates), state

    return optax.GradientTransformation(inner.init, update)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, global_batch: int, update_scale=None):
    """(optax transformation, learning-rate schedule). update_scale(params): per-leaf lr factors."""
    for field in ("warmup_steps", "weight_decay", "grad_clip", "min_lr"):
        if optim[field] < 0:
            raise ValueError(f"config.optim.{field} must be >= 0, got {optim[field]}")
    if not 0 <= optim.b1 < 1 or not 0 <= optim.b2 < 1:
        raise ValueError(f"config.optim.b1/b2 must lie in [0, 1), got {optim.b1}, {optim.b2}")
    lr = peak_lr(optim, global_batch)
    if lr <= 0:
        raise ValueError(f"config.optim.base_lr must be positive, got {optim.base_lr}")
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), optim.min_lr)
    adamw = optax.adamw(schedule, optim.b1, optim.b2, weight_decay=optim.weight_decay, mask=decay_mask)
    scale = [scale_updates(update_scale)] if update_scale is not None else []
    return clip_and_skip_nonfinite(optax.chain(adamw, *scale), optim.grad_clip), schedule
