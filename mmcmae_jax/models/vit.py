"""Vision Transformer encoder (Flax Linen) whose parameters map one to one onto timm's VisionTransformer.

Names follow timm so that a state_dict converts by renaming and transposing only:

    ours (Flax)                         timm (PyTorch)
    patch_embed/proj/kernel (P,P,C,D)   patch_embed.proj.weight (D,C,P,P)
    cls_token (1,1,D)                   cls_token
    pos_embed (1,1+N,D)  [learned only] pos_embed (1,1+N,D); for sin-cos we write the fixed table
    blocks_i/norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2
    norm                                norm

Pre-norm blocks, exact GELU and LayerNorm eps 1e-6, as timm and MAE.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from mmcmae_jax.models import matmul
from mmcmae_jax.models.masking import gather_tokens
from mmcmae_jax.models.matmul import Dense

# name: (width, depth, heads). mlp_ratio is 4 for all.
VIT_SIZES = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    width: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0


def parse_variant(variant: str) -> ViTSpec:
    """'B/16' -> ViTSpec(768, 12, 12, 16); sizes Ti, S, B, L with any patch size.

    A custom size is written WIDTHxDEPTHxHEADS/PATCH, e.g. '64x2x2/8' for the tiny test models.
    """
    named = re.fullmatch(r"(Ti|S|B|L)/(\d+)", variant)
    custom = re.fullmatch(r"(\d+)x(\d+)x(\d+)/(\d+)", variant)
    if named:
        width, depth, heads = VIT_SIZES[named.group(1)]
        return ViTSpec(width, depth, heads, int(named.group(2)))
    if custom:
        width, depth, heads, patch = map(int, custom.groups())
        if width % heads:
            raise ValueError(f"ViT variant {variant!r}: width {width} is not divisible by {heads} heads")
        return ViTSpec(width, depth, heads, patch)
    raise ValueError(f"ViT variant {variant!r} is neither SIZE/PATCH with SIZE in {sorted(VIT_SIZES)} "
                     "(e.g. 'B/16') nor WIDTHxDEPTHxHEADS/PATCH (e.g. '64x2x2/8')")


def sincos_pos_embed_2d(width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (grid_h*grid_w, width), as in MAE.

    Half of the channels encode the row, half the column; each half is [sin(p*w_k), cos(p*w_k)] with
    w_k = 1 / 10000^(k / (width/4)). The layout matches MAE's table, so its checkpoints line up.
    """
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # MAE encodes the width coordinate first (its grid is [w, h]); we keep that order.
    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, N, P*P*C), patches in row-major order, pixels (p, q, c) inside a patch."""
    return rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: jax.Array, patch_size: int, grid_h: int, channels: int) -> jax.Array:
    """Inverse of `patchify`: (B, N, P*P*C) -> (B, H, W, C)."""
    return rearrange(patches, "b (h w) (p q c) -> b (h p) (w q) c", h=grid_h, p=patch_size,
                     q=patch_size, c=channels)


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches, linearly projected: a stride-P convolution (timm's layout)."""
    patch_size: int
    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        if images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the patch size {p}")
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj")(images)
        return rearrange(x, "b h w d -> b (h w) d")


def dot_product_attention(q, k, v, key_mask: Optional[jax.Array] = None) -> jax.Array:
    """Softmax attention of heads-major q, k, v (B, H, N, D); key_mask (B, N_keys), False = never attended.

    The same result as jax.nn.dot_product_attention (float32 logits and softmax), written so that XLA's
    CPU backend runs it fast (3.7x faster forward over a 224 px frame than jax.nn.dot_product_attention
    on the 2-core CPU, by benchmarks/step_parts.py, since retired: `git log -- benchmarks/step_parts.py`):
    - heads before tokens: with jax's (B, N, H, D) layout the per-head matmuls ran in a transposed form;
    - the softmax is normalised after the values are summed (exp(s - max) @ v / sum exp(s - max)): the
      division then touches (B, H, N, D) instead of (B, H, N, N), and XLA fuses the two matmuls and the
      exponential into one kernel;
    - a masked key gets a -1e30 bias rather than a select, which keeps that fusion intact.
    A query whose keys are all masked averages all values, as a softmax over equal logits does.
    """
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = matmul.einsum("bhqd,bhkd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    if key_mask is not None:
        logits = logits + jnp.where(key_mask, 0.0, -1e30).astype(jnp.float32)[:, None, None, :]
    # Subtracting the row maximum keeps exp in range; it is a constant shift, so no gradient flows through it.
    unnormalised = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = matmul.einsum("bhqk,bhkd->bhqd", unnormalised.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(unnormalised, axis=-1, keepdims=True)).astype(v.dtype)


class Attention(nn.Module):
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask: Optional[jax.Array] = None):
        width = x.shape[-1]
        qkv = Dense(3 * width, dtype=self.dtype, name="qkv")(x)
        # timm's fused qkv: output channels ordered (q|k|v, head, head_dim).
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = dot_product_attention(q, k, v, key_mask)
        return Dense(width, dtype=self.dtype, name="proj")(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=False)  # timm and MAE use the exact GELU
        return Dense(width, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        width = x.shape[-1]
        x = x + Attention(self.num_heads, self.dtype, name="attn")(
            nn.LayerNorm(1e-6, dtype=self.dtype, name="norm1")(x), key_mask)
        hidden = nn.LayerNorm(1e-6, dtype=self.dtype, name="norm2")(x)
        return x + Mlp(int(width * self.mlp_ratio), self.dtype, name="mlp")(hidden)


class Transformer(nn.Module):
    """A stack of blocks named `blocks_i` (timm's `blocks.i`), returning every block's output."""
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        intermediates = {}
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_ratio, self.dtype, name=f"blocks_{i}")(x, key_mask)
            intermediates[f"block_{i + 1}"] = x
        return x, intermediates


class ViTEncoder(nn.Module):
    """ViT encoder for one modality, optionally over a subset of its patches (the visible ones).

    __call__(images (B,H,W,C), keep_idx (B,K) or None, keep_valid (B,K) or None) returns
    (tokens, intermediates): tokens (B, [1+]K, D) after the final norm, with the cls token first when
    `use_cls_token`; intermediates {"block_1": ..., "block_L": ...}, each block's output (before the
    final norm). `keep_valid` marks padded slots (a variable-size split under a static shape) that no
    token may attend to.
    """
    variant: str = "B/16"
    use_cls_token: bool = True
    pos_embed: str = "sincos"  # "sincos" (fixed) or "learned"
    image_size: int = 224  # only sizes the learned position table
    dtype: jnp.dtype = jnp.float32

    @property
    def spec(self) -> ViTSpec:
        return parse_variant(self.variant)

    @nn.compact
    def __call__(self, images, keep_idx=None, keep_valid=None):
        spec = self.spec
        x = PatchEmbed(spec.patch_size, spec.width, self.dtype, name="patch_embed")(images)
        grid_h, grid_w = images.shape[1] // spec.patch_size, images.shape[2] // spec.patch_size
        patch_pos, cls_pos = self.position_tables(grid_h, grid_w)
        x = x + patch_pos.astype(x.dtype)

        if keep_idx is not None:  # the masked encoder sees only the kept patches
            x = gather_tokens(x, keep_idx)
        key_mask = None if keep_valid is None else keep_valid.astype(bool)

        if self.use_cls_token:
            cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, spec.width))
            # The cls slot of the position table is zero for sin-cos (MAE); learned tables carry it.
            cls = cls + cls_pos
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, spec.width)).astype(x.dtype), x], 1)
            if key_mask is not None:
                key_mask = jnp.concatenate([jnp.ones_like(key_mask[:, :1]), key_mask], axis=1)

        x, intermediates = Transformer(spec.depth, spec.num_heads, spec.mlp_ratio, self.dtype,
                                       name="blocks")(x, key_mask)
        x = nn.LayerNorm(1e-6, dtype=self.dtype, name="norm")(x)
        return x, intermediates

    def position_tables(self, grid_h, grid_w):
        """(patch table (1, N, D), cls slot (1, 1, D)). The cls slot of the sin-cos table is zero (MAE)."""
        width = self.spec.width
        if self.pos_embed == "sincos":
            return jnp.asarray(sincos_pos_embed_2d(width, grid_h, grid_w))[None], jnp.zeros((1, 1, width))
        if self.pos_embed == "learned":
            n = (self.image_size // self.spec.patch_size) ** 2
            table = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + n, width))
            if n != grid_h * grid_w:
                raise ValueError(f"the learned position table holds {n} patches but the input has "
                                 f"{grid_h}x{grid_w}; set model.image_size or resample it (mmcmae_jax.port)")
            return table[:, 1:], table[:, :1]
        raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {self.pos_embed!r}")


def drop_cls(tokens: jax.Array, use_cls_token: bool) -> jax.Array:
    """The patch tokens of an encoder output."""
    return tokens[:, 1:] if use_cls_token else tokens
