"""Random patch masking with static shapes, so a masked model jits once.

A mask keeps K of N patches per example (MAE): draw uniform noise per patch, sort it, keep the K
patches with the smallest noise. `restore_idx` is the inverse permutation of that sort: a sequence laid
out as [kept tokens, mask tokens] is gathered with it back into the original patch order.

For a Dirichlet split of one token budget across modalities (MultiMAE), each example keeps a varying
number k_m of patches of modality m (sum_m k_m = budget). Shapes stay static by giving each modality
K_m = min(budget, N_m) slots; `keep_valid` marks which slots are real, and padded slots are masked out
of attention and losses.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp


class Mask(NamedTuple):
    keep_idx: jax.Array     # (B, K) int32, indices of the kept patches (the visible tokens)
    keep_valid: jax.Array   # (B, K) bool, False for padded slots (only in a Dirichlet split)
    mask: jax.Array         # (B, N) float32, 1 where the patch is masked (hidden), 0 where visible
    restore_idx: jax.Array  # (B, N) int32, inverse of the shuffle: gathers [kept, masked] back to order


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept at a given mask ratio, as MAE rounds it."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def _mask_from_noise(noise: jax.Array, num_keep: int, num_valid: jax.Array | None = None) -> Mask:
    """Keep the `num_keep` lowest-noise patches; with `num_valid` (B,), only the first num_valid of them."""
    batch, num_patches = noise.shape
    shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    restore_idx = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    slot = jnp.arange(num_keep)[None, :]
    keep_valid = jnp.ones((batch, num_keep), bool) if num_valid is None else slot < num_valid[:, None]
    # Visible in sorted order: the first num_keep, minus padded slots; then back to patch order.
    visible_sorted = jnp.zeros((batch, num_patches), bool).at[:, :num_keep].set(keep_valid)
    mask = 1.0 - jnp.take_along_axis(visible_sorted, restore_idx, axis=1).astype(jnp.float32)
    return Mask(shuffle[:, :num_keep], keep_valid, mask, restore_idx)


def random_mask(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> Mask:
    """Uniform random masking: each example keeps `num_kept(num_patches, mask_ratio)` patches."""
    noise = jax.random.uniform(rng, (batch, num_patches))
    return _mask_from_noise(noise, num_kept(num_patches, mask_ratio))


def multimodal_masks(rng: jax.Array, batch: int, num_patches: Mapping[str, int],
                     mask_ratios: Mapping[str, float], mode: str = "independent",
                     dirichlet_alpha: float = 1.0) -> dict[str, Mask]:
    """Masks for several modalities of the same frames.

    mode:
      "independent": each modality its own uniform mask at its own ratio.
      "shared": one mask used by every modality (same patch grid and ratio required): a patch is
        visible in all modalities or in none.
      "dirichlet": one budget of sum_m num_kept(N_m, ratio_m) tokens, split per example across
        modalities by proportions ~ Dirichlet(alpha) (MultiMAE).
    """
    names = sorted(num_patches)
    if set(mask_ratios) != set(names):
        raise ValueError(f"mask_ratios names {sorted(mask_ratios)} differ from modalities {names}")
    subkeys = jax.random.split(rng, len(names) + 1)
    keys, split_key = dict(zip(names, subkeys[:-1])), subkeys[-1]
    if mode == "independent":
        return {m: random_mask(keys[m], batch, num_patches[m], mask_ratios[m]) for m in names}
    if mode == "shared":
        if len({num_patches[m] for m in names}) != 1 or len({mask_ratios[m] for m in names}) != 1:
            raise ValueError("a shared mask needs equal patch grids and mask ratios across modalities, got "
                             f"{dict(num_patches)} and {dict(mask_ratios)}")
        shared = random_mask(keys[names[0]], batch, num_patches[names[0]], mask_ratios[names[0]])
        return {m: shared for m in names}
    if mode == "dirichlet":
        budget = sum(num_kept(num_patches[m], mask_ratios[m]) for m in names)
        if budget > min(num_patches.values()):
            raise ValueError(f"a Dirichlet split of {budget} tokens could exceed a modality's "
                             f"{min(num_patches.values())} patches; raise the mask ratios")
        counts = dirichlet_split(split_key, batch, len(names), budget, dirichlet_alpha)
        return {m: _mask_from_noise(jax.random.uniform(keys[m], (batch, num_patches[m])), budget, counts[:, i])
                for i, m in enumerate(names)}
    raise ValueError(f"mask mode must be 'independent', 'shared' or 'dirichlet', got {mode!r}")


def dirichlet_split(rng: jax.Array, batch: int, num_modalities: int, budget: int, alpha: float) -> jax.Array:
    """(B, M) int32 token counts per modality, each row summing exactly to `budget`.

    Proportions ~ Dirichlet(alpha); counts are their floors, and the tokens left over go to the
    modalities with the largest fractional parts (largest-remainder rounding).
    """
    props = jax.random.dirichlet(rng, jnp.full((num_modalities,), alpha), (batch,))
    exact = props * budget
    counts = jnp.floor(exact).astype(jnp.int32)
    leftover = budget - counts.sum(axis=1, keepdims=True)
    rank = jnp.argsort(jnp.argsort(-(exact - counts), axis=1), axis=1)  # 0 = largest remainder
    return counts + (rank < leftover).astype(jnp.int32)


def gather_tokens(tokens: jax.Array, idx: jax.Array) -> jax.Array:
    """tokens (B, N, ...) at indices idx (B, K) -> (B, K, ...)."""
    idx = idx.reshape(idx.shape + (1,) * (tokens.ndim - 2))
    return jnp.take_along_axis(tokens, idx, axis=1)
