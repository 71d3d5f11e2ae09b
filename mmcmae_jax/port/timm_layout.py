"""The one place where Flax parameter names and layouts meet PyTorch/timm state_dict names and layouts.

Naming rule (both directions, used for the encoders and for the full models):

    Flax path                                   dotted name
    patch_embed/proj/kernel (P,P,C,D)           patch_embed.proj.weight (D,C,P,P)
    <...>/kernel (in,out)  [Dense]              <...>.weight (out,in)
    <...>/scale            [LayerNorm]          <...>.weight
    <...>/bias                                  <...>.bias
    blocks/blocks_3/...    [encoder stack]      blocks.3. ...
    decoder/blocks_3/...   [decoder stack]      decoder.blocks.3. ...
    cls_token, pos_embed, rgb_mask_token, ...   unchanged (top-level arrays of a module)

For a ViT encoder this is exactly timm's `VisionTransformer` state_dict (fused qkv, output channels
ordered q|k|v, head, head_dim, on both sides). The one thing not in a sin-cos encoder's params is the
position table: it is computed from the grid, and written the way MAE stores it, with a zero cls slot.

Everything here works on NumPy arrays; nothing imports torch.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from mmcmae_jax.models.vit import VIT_SIZES, ViTSpec, sincos_pos_embed_2d

ImageSize = Union[int, Sequence[int]]

_BLOCK = re.compile(r"blocks_(\d+)")
# timm's model names per (width, depth, heads); patch 16 at 224 px is what timm registers for all four.
_TIMM_NAMES = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base",
               (1024, 24, 16): "vit_large"}


def image_hw(image_size: ImageSize) -> Tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def flatten(tree: Mapping, prefix: Tuple[str, ...] = ()) -> dict:
    """Nested dict -> {path tuple: array}, in insertion order."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (str(key),)))
        else:
            out[prefix + (str(key),)] = value
    return out


def unflatten(flat: Mapping[Tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def timm_name(path: Sequence[str]) -> str:
    """Flax parameter path -> dotted state_dict name (see the module docstring)."""
    parts = []
    for key in path[:-1]:
        block = _BLOCK.fullmatch(key)
        if block:
            # Our Transformer module is named `blocks` (or `decoder`) and holds `blocks_i`; timm has
            # `blocks.i`, so `blocks/blocks_i` collapses to one `blocks`.
            if parts and parts[-1] == "blocks":
                parts.pop()
            parts += ["blocks", block.group(1)]
        else:
            parts.append(key)
    leaf = path[-1]
    parts.append({"kernel": "weight", "scale": "weight"}.get(leaf, leaf))
    return ".".join(parts)


def to_torch_layout(path: Sequence[str], array: np.ndarray) -> np.ndarray:
    """Flax array -> the layout PyTorch keeps under `timm_name(path)`."""
    array = np.asarray(array)
    if path[-1] == "kernel":
        if array.ndim == 2:  # Dense (in, out) -> Linear (out, in)
            return np.ascontiguousarray(array.T)
        if array.ndim == 4:  # Conv (kh, kw, in, out) -> Conv2d (out, in, kh, kw)
            return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
        raise ValueError(f"{'/'.join(path)}: a kernel of rank {array.ndim} has no PyTorch layout here")
    return array


def from_torch_layout(path: Sequence[str], array: np.ndarray) -> np.ndarray:
    """Inverse of `to_torch_layout`: the PyTorch array stored for `path` -> the Flax layout."""
    array = np.asarray(array)
    if path[-1] == "kernel":
        if array.ndim == 2:
            return np.ascontiguousarray(array.T)
        if array.ndim == 4:
            return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
        raise ValueError(f"{'/'.join(path)}: a kernel of rank {array.ndim} has no Flax layout here")
    return array


def tree_to_state_dict(params: Mapping) -> dict:
    """Any of our parameter trees -> {dotted name: NumPy array in PyTorch layout} (e.g. a full
    stage-2 model: `rgb_encoder.blocks.0.attn.qkv.weight`, `decoder.blocks.0.mlp.fc1.weight`,
    `depth_head.weight`, `sigma_embed.fc1.bias`, `depth_mask_token`)."""
    out = {}
    for path, value in flatten(params).items():
        name = timm_name(path)
        if name in out:
            raise ValueError(f"two parameters map to the state_dict name {name!r}")
        out[name] = to_torch_layout(path, value)
    return out


# ----------------------------------------------------------------------------------------------------
# Encoders


def encoder_spec(params: Mapping, num_heads: Optional[int] = None) -> ViTSpec:
    """The ViT size of an encoder parameter tree. The head count is not visible in the weights (qkv is
    (D, 3D) for any split), so it comes from `num_heads` or, failing that, from the named size (Ti, S,
    B, L) with this width."""
    _check_encoder_tree(params)
    kernel = np.shape(params["patch_embed"]["proj"]["kernel"])
    patch, width = int(kernel[0]), int(kernel[3])
    depth = len(params["blocks"])
    if num_heads is None:
        named = {w: h for (w, h) in ((v[0], v[2]) for v in VIT_SIZES.values())}
        if width not in named:
            raise ValueError(f"an encoder of width {width} is no named ViT size: give the head count "
                             "(--variant WIDTHxDEPTHxHEADS/PATCH)")
        num_heads = named[width]
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by {num_heads} heads")
    return ViTSpec(width, depth, num_heads, patch)


def _check_encoder_tree(params: Mapping) -> None:
    if not isinstance(params, Mapping) or "patch_embed" not in params or "blocks" not in params:
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"not a ViT encoder parameter tree (no patch_embed/blocks); top-level keys: {keys}")


def flax_encoder_to_timm(params: Mapping, *, image_size: Optional[ImageSize] = None) -> dict:
    """A `ViTEncoder` parameter tree -> timm `VisionTransformer` state_dict (NumPy arrays).

    With a learned position table the table is written as it is (its grid fixes the image size). With
    the fixed sin-cos embedding (no `pos_embed` in params) the table for `image_size` (default 224, an
    int or (height, width)) is written, with a zero cls slot as MAE stores it; timm adds it like any
    learned table, so the outputs agree.
    """
    _check_encoder_tree(params)
    out = tree_to_state_dict(params)
    spec = encoder_spec(params, num_heads=1)  # heads do not matter for the table
    has_cls = "cls_token" in params
    if "pos_embed" in params:
        table = np.asarray(params["pos_embed"])
        if image_size is not None:
            n = table.shape[1] - 1
            h, w = image_hw(image_size)
            if (h // spec.patch_size) * (w // spec.patch_size) != n:
                raise ValueError(f"the learned position table holds {n} patches, not the "
                                 f"{h}x{w} image size asked for: resample it with mae_import.resample_pos_embed")
        # Our learned table always has a cls slot; timm's has one only with a class token.
        out["pos_embed"] = table if has_cls else np.ascontiguousarray(table[:, 1:])
    else:
        h, w = image_hw(224 if image_size is None else image_size)
        if h % spec.patch_size or w % spec.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {spec.patch_size}")
        table = sincos_pos_embed_2d(spec.width, h // spec.patch_size, w // spec.patch_size)[None]
        if has_cls:
            table = np.concatenate([np.zeros((1, 1, spec.width), np.float32), table], axis=1)
        out["pos_embed"] = table.astype(np.float32)
    return out


def encoder_image_size(params: Mapping, image_size: Optional[ImageSize] = None) -> Tuple[int, int]:
    """The image size the exported table is for: the learned table's (square) grid, else `image_size`."""
    if "pos_embed" in params:
        spec = encoder_spec(params, num_heads=1)
        side = int(round((np.shape(params["pos_embed"])[1] - 1) ** 0.5))
        return side * spec.patch_size, side * spec.patch_size
    return image_hw(224 if image_size is None else image_size)


def timm_kwargs(spec: ViTSpec, image_size: ImageSize, class_token: bool = True) -> dict:
    """Keyword arguments of timm's `VisionTransformer` matching our encoder: a features-only model
    (no head, no pooling), so `forward_features` / `forward` return all tokens after the final norm."""
    h, w = image_hw(image_size)
    kwargs = dict(img_size=h if h == w else (h, w), patch_size=spec.patch_size, embed_dim=spec.width,
                  depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True,
                  class_token=class_token, num_classes=0, global_pool="")
    return kwargs


def timm_constructor(spec: ViTSpec, image_size: ImageSize, class_token: bool = True) -> str:
    """Python source that builds the matching timm model, for the export command to print."""
    h, w = image_hw(image_size)
    name = _TIMM_NAMES.get((spec.width, spec.depth, spec.num_heads))
    if name and spec.patch_size == 16 and spec.mlp_ratio == 4.0 and class_token:
        size = "" if (h, w) == (224, 224) else f", img_size={h if h == w else (h, w)}"
        return f'timm.create_model("{name}_patch16_224", pretrained=False, num_classes=0, global_pool=""{size})'
    kwargs = timm_kwargs(spec, (h, w), class_token)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"timm.models.vision_transformer.VisionTransformer({args})"


def state_dict_to_tree(state_dict: Mapping[str, np.ndarray], template: Mapping, *,
                       skip: Sequence[str] = (), what: str = "state_dict") -> dict:
    """timm/PyTorch state_dict -> a parameter tree shaped like `template`, strictly.

    Every template leaf must be present with the right shape, and every state_dict entry must be used
    or named in `skip`; otherwise a ValueError lists the missing, unexpected and mis-shaped names.
    """
    flat_template = flatten(template)
    missing, wrong, out = [], [], {}
    used = set(skip)
    for path, leaf in flat_template.items():
        name = timm_name(path)
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        value = from_torch_layout(path, state_dict[name])
        if value.shape != tuple(np.shape(leaf)):
            expected = to_torch_layout(path, np.zeros(np.shape(leaf), np.float32)).shape
            wrong.append(f"{name}: {tuple(np.shape(state_dict[name]))} in the {what}, {tuple(expected)} expected")
            continue
        out[path] = value.astype(np.dtype(getattr(leaf, "dtype", np.float32)))
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong:
            lines.append(f"wrong shapes ({len(wrong)}): {'; '.join(wrong)}")
        raise ValueError(f"the {what} does not match the model:\n  " + "\n  ".join(lines))
    return unflatten(out)
