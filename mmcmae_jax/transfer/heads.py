"""Dense prediction heads over the RGB encoder, and the encoder+head model used for transfer.

- `DPTHead`: the dense prediction transformer head of Ranftl, Bochkovskiy and Koltun, "Vision
  Transformers for Dense Prediction" (DPT, ICCV 2021): four intermediate encoder blocks are
  layer-normalised and reassembled into a feature pyramid at 4x, 2x, 1x and 1/2x the patch grid, fused
  coarse to fine by RefineNet-style residual units, and read out by a small convolutional head at the
  input resolution.
- `LinearHead`: one linear map per patch token, upsampled bilinearly: the probing head.

Both return float32 at the input resolution (B, H, W, out_channels), whatever the compute dtype.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from mmcmae_jax.models.vit import ViTEncoder, drop_cls


def dpt_hooks(depth: int) -> tuple[int, ...]:
    """The four encoder blocks (1-based) DPT reads: the ends of the four quarters of the encoder.

    12 blocks -> (3, 6, 9, 12) (DPT's ViT-B hooks); 24 -> (6, 12, 18, 24); 2 -> (1, 1, 2, 2)."""
    if depth < 1:
        raise ValueError(f"an encoder of depth {depth} has no blocks to read")
    return tuple(max(1, round(depth * k / 4)) for k in range(1, 5))


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """(B, h, w, C) -> (B, height, width, C), bilinear (no antialiasing: upsampling only in the heads)."""
    if x.shape[1:3] == (height, width):
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), method="bilinear", antialias=False)


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3x3 convolutions (DPT's fusion unit)."""
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv1")(nn.relu(x))
        y = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv2")(nn.relu(y))
        return x + y


class FusionBlock(nn.Module):
    """Fuse a coarser path with this level's features, then upsample to `out_hw` and project 1x1."""
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, path, skip, out_hw):
        if skip is not None:
            path = path + ResidualConvUnit(self.features, self.dtype, name="skip_unit")(skip)
        path = ResidualConvUnit(self.features, self.dtype, name="path_unit")(path)
        path = resize_bilinear(path, *out_hw)
        return nn.Conv(self.features, (1, 1), dtype=self.dtype, name="out_proj")(path)


class DPTHead(nn.Module):
    """DPT over four token maps (B, N, D) of a patch grid (grid_h, grid_w); returns (B, H, W, out)."""
    out_channels: int
    features: int = 256
    reassemble_dims: Sequence[int] = ()   # () = (D/8, D/4, D/2, D), DPT-Base's (96, 192, 384, 768) for D=768
    task: str = "depth"                   # the readout: "depth" (DPT's depth head) or "segmentation"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, token_maps: Sequence[jax.Array], grid_hw: tuple[int, int], image_hw: tuple[int, int]):
        if len(token_maps) != 4:
            raise ValueError(f"DPT reads 4 encoder blocks, got {len(token_maps)}")
        width = token_maps[0].shape[-1]
        dims = tuple(self.reassemble_dims) or (max(width // 8, 1), max(width // 4, 1), max(width // 2, 1), width)
        levels = []
        for i, (tokens, dim) in enumerate(zip(token_maps, dims)):
            x = rearrange(tokens, "b (h w) d -> b h w d", h=grid_hw[0], w=grid_hw[1])
            # Block outputs are the un-normalised residual stream, whose scale differs between encoders
            # (a Mask3D-style one of the ablation started the head at depth e^8); normalise each map
            # first, as DINOv2's DPT reads normalised intermediate layers.
            x = nn.LayerNorm(1e-6, dtype=self.dtype, name=f"reassemble_{i}_norm")(x)
            x = nn.Conv(dim, (1, 1), dtype=self.dtype, name=f"reassemble_{i}_proj")(x)
            # Resample to 4x, 2x, 1x and 1/2x the patch grid (DPT's reassemble operation).
            if i == 0:
                x = nn.ConvTranspose(dim, (4, 4), strides=(4, 4), dtype=self.dtype, name="reassemble_0_up")(x)
            elif i == 1:
                x = nn.ConvTranspose(dim, (2, 2), strides=(2, 2), dtype=self.dtype, name="reassemble_1_up")(x)
            elif i == 3:
                x = nn.Conv(dim, (3, 3), strides=(2, 2), dtype=self.dtype, name="reassemble_3_down")(x)
            levels.append(nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype, name=f"level_{i}")(x))

        # Coarse to fine: each fusion upsamples to the next finer level; the finest doubles its size.
        path = None
        for i in (3, 2, 1, 0):
            out_hw = levels[i - 1].shape[1:3] if i else (2 * levels[0].shape[1], 2 * levels[0].shape[2])
            fusion = FusionBlock(self.features, self.dtype, name=f"fusion_{i}")
            path = fusion(levels[i], None, out_hw) if path is None else fusion(path, levels[i], out_hw)

        if self.task == "depth":
            # DPT's depth readout: halve the channels, upsample, 3x3 conv to 32, ReLU, 1x1 to the output.
            x = nn.Conv(max(self.features // 2, 1), (3, 3), dtype=self.dtype, name="out_conv1")(path)
            x = resize_bilinear(x, *image_hw)
            x = nn.relu(nn.Conv(32, (3, 3), dtype=self.dtype, name="out_conv2")(x))
        elif self.task == "segmentation":
            # DPT's segmentation readout without batch norm (no batch statistics to carry in the state).
            x = nn.relu(nn.Conv(self.features, (3, 3), dtype=self.dtype, name="out_conv1")(path))
        else:
            raise ValueError(f"DPTHead.task must be 'depth' or 'segmentation', got {self.task!r}")
        # The output layer runs in float32 (DESIGN: float32 output heads under bf16).
        x = nn.Conv(self.out_channels, (1, 1), dtype=jnp.float32, name="out")(x.astype(jnp.float32))
        return resize_bilinear(x, *image_hw)


class LinearHead(nn.Module):
    """A linear map of each final patch token to `out_channels`, bilinearly upsampled: linear probing."""
    out_channels: int

    @nn.compact
    def __call__(self, tokens: jax.Array, grid_hw: tuple[int, int], image_hw: tuple[int, int]):
        x = nn.Dense(self.out_channels, dtype=jnp.float32, name="out")(tokens.astype(jnp.float32))
        x = rearrange(x, "b (h w) c -> b h w c", h=grid_hw[0], w=grid_hw[1])
        return resize_bilinear(x, *image_hw)


LOG_DEPTH_LIMIT = 8.0  # predicted depth lies in (e^-8, e^8) m = (0.3 mm, 3 km)


def positive_depth(raw: jax.Array) -> jax.Array:
    """Raw head output -> depth in metres, strictly positive: the head predicts log-depth.

    Why not softplus(raw) + floor: once a prediction falls well below the floor, d log(depth) / d raw
    vanishes and the head never recovers (a ViT-Ti depth run of the ablation collapsed to the floor
    everywhere). Here d log(depth) / d raw = 1 - tanh^2(raw / 8), about 1 over 2 cm .. 50 m; the tanh
    only bounds the exponent so that nothing overflows.
    """
    return jnp.exp(LOG_DEPTH_LIMIT * jnp.tanh(raw.astype(jnp.float32) / LOG_DEPTH_LIMIT))


class DenseModel(nn.Module):
    """The RGB encoder (named `rgb_encoder`, as in pre-training) and a dense head (`head`).

    __call__(rgb (B,H,W,3)) -> (B, H, W, out_channels) float32: metres for depth (positive), class
    logits for segmentation.
    """
    task: str                       # "depth" or "segmentation"
    out_channels: int
    head: str = "dpt"               # "dpt" or "linear"
    head_features: int = 256
    reassemble_dims: Sequence[int] = ()
    hooks: Sequence[int] = ()       # 1-based encoder blocks for DPT; () = dpt_hooks(depth)
    variant: str = "B/16"
    use_cls_token: bool = True
    pos_embed: str = "sincos"
    image_size: int = 224
    dtype: jnp.dtype = jnp.float32

    def encoder(self) -> ViTEncoder:
        return ViTEncoder(variant=self.variant, use_cls_token=self.use_cls_token, pos_embed=self.pos_embed,
                          image_size=self.image_size, dtype=self.dtype, name="rgb_encoder")

    @nn.compact
    def __call__(self, rgb):
        encoder = self.encoder()
        spec = encoder.spec
        image_hw = rgb.shape[1:3]
        grid_hw = (image_hw[0] // spec.patch_size, image_hw[1] // spec.patch_size)
        tokens, intermediates = encoder(rgb)
        if self.head == "dpt":
            hooks = tuple(self.hooks) or dpt_hooks(spec.depth)
            bad = [h for h in hooks if not 1 <= h <= spec.depth]
            if len(hooks) != 4 or bad:
                raise ValueError(f"DPT hooks {hooks}: need 4 blocks in 1..{spec.depth}")
            # The readout token is ignored (DPT's "ignore" readout): only patch tokens form the maps.
            maps = [drop_cls(intermediates[f"block_{h}"], self.use_cls_token) for h in hooks]
            raw = DPTHead(self.out_channels, self.head_features, tuple(self.reassemble_dims), self.task,
                          self.dtype, name="head")(maps, grid_hw, image_hw)
        elif self.head == "linear":
            raw = LinearHead(self.out_channels, name="head")(drop_cls(tokens, self.use_cls_token), grid_hw, image_hw)
        else:
            raise ValueError(f"head must be 'dpt' or 'linear', got {self.head!r}")
        return positive_depth(raw) if self.task == "depth" else raw
