"""Export encoders (or a whole model) of a checkpoint as PyTorch state_dicts in safetensors format.

    python -m mmcmae_jax.port.export --checkpoint WORKDIR_OR_CHECKPOINT --out rgb_vit.safetensors
        [--modality rgb|depth|all] [--full-model] [--variant B/16] [--image-size 224] [--step N]

--checkpoint: a trainer work directory, its `checkpoints/` folder (the latest step, or --step), one
orbax PyTree checkpoint directory, or a `.msgpack` / `.safetensors` file of params (safetensors keys are
Flax paths joined by '/'). The saved item may be the params tree itself or a dict holding it under
`params` (the trainer's train state).

An encoder export loads with `strict=True` into timm's `VisionTransformer`; the command prints the
constructor to use. --modality all writes OUT with `-rgb` and `-depth` before the suffix. --full-model
writes every parameter of the model (decoder, heads, both encoders) under dotted names (see
`timm_layout`), for PyTorch re-implementations; it matches no timm class.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Optional

import numpy as np

from mmcmae_jax.models.vit import parse_variant
from mmcmae_jax.port.timm_layout import (ImageSize, encoder_image_size, encoder_spec, flax_encoder_to_timm, timm_constructor, tree_to_state_dict, unflatten)

def _take_params(tree: Mapping, where: str) -> dict:
    if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
        tree = tree["params"]
    if not isinstance(tree, Mapping):
        raise ValueError(f"{where}: the restored item is a {type(tree).__name__}, not a params dict")
    return _to_dict(tree)


def _to_dict(tree) -> dict:
    return {str(k): (_to_dict(v) if isinstance(v, Mapping) else np.asarray(v)) for k, v in tree.items()}


def load_params(path: str, step: Optional[int] = None) -> dict:
    """The params tree (NumPy arrays) of a checkpoint directory, `.msgpack` or `.safetensors` file."""
    if os.path.isfile(path):
        if path.endswith(".msgpack"):
            from flax import serialization
            with open(path, "rb") as f:
                return _take_params(serialization.msgpack_restore(f.read()), path)
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            flat = load_file(path)
            tree = unflatten({tuple(k.split("/")): v for k, v in flat.items()})
            return _take_params(tree, path)
        raise ValueError(f"{path!r}: expected a checkpoint directory, a .msgpack or a .safetensors file")
    from mmcmae_jax.train.checkpoint import restore_params
    return _to_dict(restore_params(path, step))


def encoder_params(params: Mapping, modality: str) -> dict:
    """`{modality}_encoder` of a stage-1/stage-2 params tree; a bare encoder tree counts as RGB."""
    if f"{modality}_encoder" in params:
        return params[f"{modality}_encoder"]
    if "patch_embed" in params and modality == "rgb":
        return dict(params)
    encoders = sorted(k for k in params if k.endswith("_encoder"))
    raise ValueError(f"the checkpoint has no {modality}_encoder (encoders there: {encoders or 'none'})")


def save_state_dict(state_dict: Mapping[str, np.ndarray], out: str, metadata: Optional[dict] = None) -> None:
    from safetensors.numpy import save_file
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, out, metadata=metadata)


def _out_path(out: str, modality: str, several: bool) -> str:
    if not several:
        return out
    stem, ext = os.path.splitext(out)
    return f"{stem}-{modality}{ext or '.safetensors'}"


def export(checkpoint: str, out: str, *, modality: str = "rgb", full_model: bool = False,
           variant: Optional[str] = None, image_size: Optional[ImageSize] = None,
           step: Optional[int] = None) -> list:
    """Write the state_dicts; returns [(path, timm constructor or None)]."""
    params = load_params(checkpoint, step)
    if full_model:
        state_dict = tree_to_state_dict(params)
        save_state_dict(state_dict, out, {"format": "pt", "layout": "mmcmae_jax full model, dotted names"})
        return [(out, None)]
    modalities = ("rgb", "depth") if modality == "all" else (modality,)
    written = []
    for m in modalities:
        enc = encoder_params(params, m)
        heads = None
        if variant is not None:
            wanted, found = parse_variant(variant), encoder_spec(enc, num_heads=1)
            if (found.width, found.depth, found.patch_size) != (wanted.width, wanted.depth, wanted.patch_size):
                raise ValueError(f"--variant {variant} is width {wanted.width}, depth {wanted.depth}, patch "
                                 f"{wanted.patch_size}; the {m} encoder has {found.width}, {found.depth}, "
                                 f"{found.patch_size}")
            heads = wanted.num_heads
        spec = encoder_spec(enc, num_heads=heads)
        size = encoder_image_size(enc, image_size)
        state_dict = flax_encoder_to_timm(enc, image_size=size)
        path = _out_path(out, m, len(modalities) > 1)
        save_state_dict(state_dict, path, {"format": "pt", "modality": m})
        written.append((path, timm_constructor(spec, size, class_token="cls_token" in enc)))
    return written


def _image_size(text: str):
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return tuple(parts)
    raise argparse.ArgumentTypeError(f"--image-size {text!r}: give N or H,W")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmcmae_jax.port.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="work directory, checkpoints/ folder, orbax PyTree directory, .msgpack or .safetensors")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--modality", choices=("rgb", "depth", "all"), default="rgb")
    parser.add_argument("--full-model", action="store_true", help="every parameter, dotted names (no timm class)")
    parser.add_argument("--variant", help="e.g. B/16 or 64x2x2/16: needed for the head count of a custom width")
    parser.add_argument("--image-size", type=_image_size, default=None,
                        help="N or H,W for the sin-cos table and img_size (default 224; a learned table fixes it)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    try:
        written = export(args.checkpoint, args.out, modality=args.modality, full_model=args.full_model,
                         variant=args.variant, image_size=args.image_size, step=args.step)
    except (ValueError, FileNotFoundError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    for path, constructor in written:
        print(f"wrote {path}")
        if constructor:
            print("load it with:\n"
                  "    import timm, torch\n"
                  "    from safetensors.torch import load_file\n"
                  f"    model = {constructor}\n"
                  f"    model.load_state_dict(load_file({path!r}), strict=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
