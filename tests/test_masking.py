"""Static-shape masking: counts, uniqueness, restore, randomness, uniformity, multi-modal modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcmae_jax.models.masking import dirichlet_split, multimodal_masks, num_kept, random_mask


def test_keeps_exact_count_without_duplicates():
    m = random_mask(jax.random.key(0), 16, 49, 0.75)
    assert m.keep_idx.shape == (16, num_kept(49, 0.75)) == (16, 12)
    for row, mask in zip(np.asarray(m.keep_idx), np.asarray(m.mask)):
        assert len(set(row.tolist())) == 12
        assert mask.sum() == 49 - 12
        assert np.all(mask[row] == 0)  # kept patches are exactly the visible ones


def test_restore_inverts_shuffle():
    m = random_mask(jax.random.key(1), 4, 20, 0.5)
    tokens = jnp.arange(20)[None].repeat(4, 0) * 10
    shuffle = jnp.argsort(m.restore_idx, axis=1)  # the forward permutation that restore_idx inverts
    np.testing.assert_array_equal(shuffle[:, :10], m.keep_idx)  # kept patches come first
    # A sequence laid out as [kept, masked] in shuffled order, gathered with restore_idx, is back in order.
    shuffled = jnp.take_along_axis(tokens, shuffle, axis=1)
    np.testing.assert_array_equal(jnp.take_along_axis(shuffled, m.restore_idx, axis=1), tokens)
    assert not np.array_equal(shuffled, tokens)


def test_different_keys_different_masks():
    a = random_mask(jax.random.key(2), 8, 64, 0.8)
    b = random_mask(jax.random.key(3), 8, 64, 0.8)
    assert not np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask[0], a.mask[1])  # and per example


def test_every_position_equally_likely():
    # 4000 masks of 16 patches keeping 4: each position is kept 1000 times in expectation.
    m = random_mask(jax.random.key(4), 4000, 16, 0.75)
    counts = np.bincount(np.asarray(m.keep_idx).ravel(), minlength=16)
    expected = 4000 * 4 / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7, (chi2, counts)  # 99.9% quantile of chi-square with 15 degrees of freedom


def test_bad_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(jax.random.key(0), 1, 4, 1.0)


def test_shared_and_independent_modes():
    shapes, ratios = {"rgb": 16, "depth": 16}, {"rgb": 0.75, "depth": 0.75}
    shared = multimodal_masks(jax.random.key(5), 4, shapes, ratios, "shared")
    np.testing.assert_array_equal(shared["rgb"].mask, shared["depth"].mask)
    indep = multimodal_masks(jax.random.key(5), 4, shapes, ratios, "independent")
    assert not np.array_equal(indep["rgb"].mask, indep["depth"].mask)
    with pytest.raises(ValueError, match="shared mask"):
        multimodal_masks(jax.random.key(5), 4, shapes, {"rgb": 0.5, "depth": 0.75}, "shared")


def test_dirichlet_split_sums_to_budget():
    counts = np.asarray(dirichlet_split(jax.random.key(6), 500, 2, 7, 1.0))
    assert np.all(counts.sum(1) == 7) and counts.min() >= 0
    assert len(np.unique(counts[:, 0])) > 3  # the split really varies


def test_dirichlet_masks_keep_the_budget():
    masks = multimodal_masks(jax.random.key(7), 64, {"rgb": 16, "depth": 16}, {"rgb": 0.75, "depth": 0.75},
                             "dirichlet")
    visible = sum(np.asarray(1 - masks[m].mask).sum(1) for m in masks)
    assert np.all(visible == 8)
    for m in masks:
        # padded slots are exactly the visible-count complement; valid slots point at visible patches
        valid = np.asarray(masks[m].keep_valid)
        np.testing.assert_array_equal(valid.sum(1), np.asarray(1 - masks[m].mask).sum(1))
        kept = np.asarray(masks[m].keep_idx)
        for b in range(64):
            assert np.all(np.asarray(masks[m].mask)[b, kept[b][valid[b]]] == 0)
