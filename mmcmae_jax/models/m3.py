"""The two M3 pre-training models.

Stage 1, `CrossModalContrastive`: an RGB and a depth ViT encoder, each followed by a projection head
giving an L2-normalised embedding per patch; patch i of RGB and patch i of depth are a positive pair.

Stage 2, `MultiModalMAE`: the same two encoders, each on its visible patches only; the depth input is
noised by the caller as x + sigma*e, and sigma, embedded like a diffusion timestep, is added to the
encoded depth tokens. A light decoder reads the visible tokens of every input modality plus mask tokens
for every reconstructed modality and predicts the patches of every position. The encoders keep the
same names in both stages (`rgb_encoder`, `depth_encoder`), so stage 2 starts from stage 1 by copying.

With `inputs` and `targets` the same model covers the baselines: MAE (rgb -> rgb), MultiMAE-style
(rgb+depth -> rgb+depth), Mask3D-style (rgb+depth -> depth) and M3 (rgb+depth -> depth, plus noise).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcmae_jax.modalities import MODALITIES
from mmcmae_jax.models.masking import Mask, gather_tokens
from mmcmae_jax.models.matmul import Dense
from mmcmae_jax.models.vit import Transformer, ViTEncoder, drop_cls, parse_variant, sincos_pos_embed_2d

class EncoderFields(nn.Module):
    """Fields shared by both stages' models, and the one place their encoders are built."""
    variant: str = "B/16"
    modalities: Sequence[str] = ("rgb", "depth")
    use_cls_token: bool = True
    pos_embed: str = "sincos"
    image_size: int = 224
    dtype: jnp.dtype = jnp.float32

    def make_encoders(self) -> dict:
        return {m: ViTEncoder(self.variant, self.use_cls_token, self.pos_embed, self.image_size,
                              self.dtype, name=f"{m}_encoder") for m in self.modalities}


class ProjectionHead(nn.Module):
    """2-layer MLP mapping each token to an L2-normalised embedding."""
    hidden: int = 2048
    out: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(Dense(self.hidden, dtype=self.dtype, name="fc1")(x), approximate=False)
        x = Dense(self.out, dtype=self.dtype, name="fc2")(x).astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


class CrossModalContrastive(EncoderFields):
    """Stage 1: per-patch embeddings `z_rgb`, `z_depth` (B, N, proj_dim), L2-normalised."""
    proj_hidden: int = 2048
    proj_dim: int = 256

    @nn.compact
    def __call__(self, images: Mapping[str, jax.Array], keep_idx: Optional[jax.Array] = None):
        out = {}
        for m, encoder in self.make_encoders().items():
            tokens, _ = encoder(images[m], keep_idx)
            patches = drop_cls(tokens, self.use_cls_token)
            out[f"z_{m}"] = ProjectionHead(self.proj_hidden, self.proj_dim, self.dtype, name=f"{m}_proj")(patches)
            out[f"{m}_tokens"] = patches
        return out


class SigmaEmbedding(nn.Module):
    """Noise level sigma (B,) -> (B, width): sinusoidal features, then an MLP (as a diffusion timestep)."""
    width: int
    num_frequencies: int = 128
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sigma):
        # sigma is O(1) in normalised depth units; x1000 spreads it over the frequencies like a timestep.
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(self.num_frequencies) / self.num_frequencies)
        angles = 1000.0 * sigma.astype(jnp.float32)[:, None] * freqs[None, :]
        features = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        x = nn.silu(Dense(self.width, dtype=self.dtype, name="fc1")(features))
        return Dense(self.width, dtype=self.dtype, name="fc2")(x)


def max_pool_tokens(tokens: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """(B, K, D) -> (B, D): max over tokens, ignoring slots with valid = False."""
    if valid is None:
        return jnp.max(tokens, axis=1)
    pooled = jnp.max(jnp.where(valid[..., None], tokens, -jnp.inf), axis=1)
    return jnp.where(jnp.any(valid, axis=1)[:, None], pooled, 0.0)  # no visible token: 0, not -inf


class MultiModalMAE(EncoderFields):
    """Stage 2 (and the MAE-family baselines), in three steps: encode each input's visible patches,
    build the decoder's sequence (per modality: visible tokens, and mask tokens where it is a target),
    decode and predict the patches of every target.

    __call__(images {m: (B,H,W,C)}, masks {m: Mask}, sigma (B,) or None) returns
      pred   {t: (B, N, P*P*C_t)} for every target modality t, at every patch position;
      pooled {m: (B, D)}: max-pooled visible encoder tokens per input modality (for distillation).
    """
    targets: Sequence[str] = ("depth",)
    decoder_depth: int = 4
    decoder_width: int = 256
    decoder_heads: int = 8
    # sigma embedded into the noised modality's tokens (objective.sigma_embedding); the noise is the
    # caller's to add.
    use_sigma_embedding: bool = True

    @nn.compact
    def __call__(self, images: Mapping[str, jax.Array], masks: Mapping[str, Mask],
                 sigma: Optional[jax.Array] = None):
        patch = parse_variant(self.variant).patch_size
        any_image = images[self.modalities[0]]
        grid = (any_image.shape[1] // patch, any_image.shape[2] // patch)
        encoders = self.make_encoders()
        sequences, key_valid, spans, pooled = [], [], {}, {}
        for m in sorted(set(self.modalities) | set(self.targets)):
            modality_embed = self.param(f"{m}_modality_embed", nn.initializers.normal(0.02),
                                        (1, 1, self.decoder_width))
            mask_token = (self.param(f"{m}_mask_token", nn.initializers.normal(0.02), (1, 1, self.decoder_width))
                          if m in self.targets else None)
            visible = None
            if m in encoders:
                visible, pooled[m] = self.encode(m, encoders[m], images[m], masks[m], sigma)
            seq, valid = self.decoder_sequence(m, visible, masks.get(m), mask_token, grid, any_image.shape[0])
            start = sum(x.shape[1] for x in sequences)
            spans[m] = (start, start + seq.shape[1])
            sequences.append(seq + modality_embed)
            key_valid.append(valid)
        return {"pred": self.decode(sequences, key_valid, spans, patch), "pooled": pooled}

    def encode(self, m, encoder, image, mask, sigma):
        """(visible tokens in the decoder's width (B, K, W), max-pooled encoder tokens (B, D)) of one
        input; a noised modality's tokens get its noise level's embedding."""
        tokens, _ = encoder(image, mask.keep_idx, mask.keep_valid)
        tokens = drop_cls(tokens, self.use_cls_token)
        pooled = max_pool_tokens(tokens, mask.keep_valid)
        if MODALITIES[m].noised and self.use_sigma_embedding:
            if sigma is None:
                raise ValueError(f"the model embeds the {m} noise level: pass sigma")
            tokens = tokens + SigmaEmbedding(tokens.shape[-1], dtype=self.dtype,
                                             name="sigma_embed")(sigma)[:, None, :].astype(tokens.dtype)
        return Dense(self.decoder_width, dtype=self.dtype, name=f"{m}_decoder_embed")(tokens), pooled

    def decoder_sequence(self, m, visible, mask, mask_token, grid, batch):
        """(sequence (B, L, W), which of its slots attention reads (B, L)) of modality m. An input that is
        no target gives only its visible tokens; a target gives every position: its visible tokens where
        seen (when it is an input), mask tokens elsewhere. Both carry the 2-D sin-cos positions."""
        num_patches = grid[0] * grid[1]
        pos = jnp.asarray(sincos_pos_embed_2d(self.decoder_width, *grid))[None]
        if mask_token is None:  # context only
            seq = visible + gather_tokens(jnp.broadcast_to(pos, (batch,) + pos.shape[1:]), mask.keep_idx)
            return seq, mask.keep_valid
        mask_tokens = jnp.broadcast_to(mask_token, (batch, num_patches, self.decoder_width))
        if visible is None:  # a target that is not an input (e.g. depth from RGB alone)
            seq = mask_tokens
        else:
            k = visible.shape[1]
            visible = jnp.where(mask.keep_valid[..., None], visible, mask_tokens[:, :k])
            seq = gather_tokens(jnp.concatenate([visible, mask_tokens[:, k:]], axis=1), mask.restore_idx)
        return seq + pos, jnp.ones((batch, num_patches), bool)

    def decode(self, sequences, key_valid, spans, patch):
        """The decoder over every modality's sequence, then each target's head on its span: {t: patches}."""
        x, _ = Transformer(self.decoder_depth, self.decoder_heads, dtype=self.dtype, name="decoder")(
            jnp.concatenate(sequences, axis=1), jnp.concatenate(key_valid, axis=1))
        x = nn.LayerNorm(1e-6, dtype=self.dtype, name="decoder_norm")(x)
        return {t: Dense(patch * patch * MODALITIES[t].channels, dtype=self.dtype, name=f"{t}_head")(
            x[:, spans[t][0]:spans[t][1]]).astype(jnp.float32) for t in self.targets}
