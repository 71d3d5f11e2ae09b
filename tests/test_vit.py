"""ViT encoder: parameter count against timm's ViT-B/16, shapes, masking, position embeddings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcmae_jax.models.vit import (ViTEncoder, dot_product_attention, parse_variant, patchify,
                                   sincos_pos_embed_2d, unpatchify)


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_vit_b16_parameter_count_matches_timm(pos_embed):
    encoder = ViTEncoder("B/16", pos_embed=pos_embed)
    params = jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))["params"]
    # timm stores the position table (197 x 768, cls slot included) as a parameter either way.
    table = 0 if "pos_embed" in params else 197 * 768
    assert count(params) + table == 85_798_656  # timm vit_base_patch16_224, num_classes=0


def test_parameter_names_follow_timm():
    params = jax.eval_shape(lambda: ViTEncoder("64x2x2/8").init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))))["params"]
    assert set(params) == {"patch_embed", "cls_token", "blocks", "norm"}
    assert params["patch_embed"]["proj"]["kernel"].shape == (8, 8, 1, 64)
    block = params["blocks"]["blocks_1"]
    assert set(block) == {"norm1", "attn", "norm2", "mlp"}
    assert block["attn"]["qkv"]["kernel"].shape == (64, 192)
    assert block["mlp"]["fc1"]["kernel"].shape == (64, 256)


def test_variants_and_bad_variant():
    assert parse_variant("L/16").width == 1024 and parse_variant("L/16").depth == 24
    assert parse_variant("Ti/8").patch_size == 8
    with pytest.raises(ValueError, match="'X/16'"):
        parse_variant("X/16")
    with pytest.raises(ValueError, match="not divisible"):
        parse_variant("65x2x2/8")


def test_encoder_outputs_and_kept_tokens():
    encoder = ViTEncoder("64x2x2/8")
    images = jax.random.normal(jax.random.key(0), (2, 32, 48, 3))
    params = encoder.init(jax.random.key(1), images)
    tokens, inter = encoder.apply(params, images)
    assert tokens.shape == (2, 1 + 4 * 6, 64)
    assert sorted(inter) == ["block_1", "block_2"] and inter["block_2"].shape == tokens.shape
    keep = jnp.array([[0, 5, 7], [3, 2, 1]])
    kept, _ = encoder.apply(params, images, keep)
    assert kept.shape == (2, 4, 64)
    # One patch alone, attending only to itself and cls, equals the same patch kept alone by index.
    only = encoder.apply(params, images, keep[:, :1])[0]
    padded = encoder.apply(params, images, keep, jnp.array([[True, False, False]] * 2))[0]
    np.testing.assert_allclose(only[:, :2], padded[:, :2], atol=1e-5)


def test_bad_image_size_names_patch():
    encoder = ViTEncoder("64x2x2/8")
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        encoder.init(jax.random.key(0), jnp.zeros((1, 30, 32, 3)))


def test_sincos_table_matches_independent_formula():
    width, grid = 16, 3
    table = sincos_pos_embed_2d(width, grid, grid)
    # Independent: channel c < width/2 encodes the column, the rest the row; each half is [sin | cos].
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    for idx in range(grid * grid):
        row, col = divmod(idx, grid)
        expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
        np.testing.assert_allclose(table[idx], expected, rtol=1e-6, atol=1e-7)


def test_patchify_roundtrip_and_layout():
    images = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
    patches = patchify(jnp.asarray(images), 4)
    assert patches.shape == (2, 6, 48)
    np.testing.assert_array_equal(patches[0, 1], images[0, 0:4, 4:8].reshape(-1))  # row-major patches
    np.testing.assert_array_equal(unpatchify(patches, 4, 2, 3), images)


def test_attention_against_numpy_with_and_without_key_mask():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 3, 5, 4)).astype(np.float32) for _ in range(3))
    key_mask = np.array([[True] * 5, [True, False, True, True, False]])

    def numpy_attention(mask):
        logits = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) / np.sqrt(4)
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        return np.einsum("bhqk,bhkd->bhqd", weights / weights.sum(-1, keepdims=True), v)

    np.testing.assert_allclose(dot_product_attention(q, k, v), numpy_attention(np.ones((2, 5), bool)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dot_product_attention(q, k, v, jnp.asarray(key_mask)), numpy_attention(key_mask),
                               rtol=1e-5, atol=1e-6)


def test_attention_gradient_and_edge_cases():
    """The deferred normalisation's gradient equals jax's softmax attention's, with a key mask; a query
    whose keys are all masked averages the values; bfloat16 inputs give a bfloat16 output."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 3, 6, 8)).astype(np.float32)) for _ in range(3))
    key_mask = jnp.asarray([[True] * 6, [False, True, True, False, True, True]])
    cotangent = jnp.asarray(rng.normal(size=(2, 3, 6, 8)).astype(np.float32))

    def reference(q, k, v):  # jax's attention takes (B, N, H, D) and a (B, H, Q, K) mask
        swap = lambda x: x.transpose(0, 2, 1, 3)
        return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), mask=key_mask[:, None, None, :]))

    ours = jax.grad(lambda *a: jnp.sum(dot_product_attention(*a, key_mask) * cotangent), argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(lambda *a: jnp.sum(reference(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d/d{name}")

    none_visible = jnp.zeros((2, 6), bool)
    np.testing.assert_allclose(dot_product_attention(q, k, v, none_visible),
                               jnp.broadcast_to(v.mean(axis=2, keepdims=True), v.shape), rtol=1e-5, atol=1e-6)
    out = dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), key_mask)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), reference(q, k, v), atol=0.05)
