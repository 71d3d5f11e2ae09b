"""Export encoders (or a whole model) of a checkpoint as PyTorch state_dicts in safetensors format.

    python -m mmcmae_jax.port.export --checkpoint WORKDIR_OR_CHECKPOINT --out rgb_vit.safetensors
        [--modality rgb|depth|all] [--full-model] [--variant B/16] [--image-size 224] [--step N]

--checkpoint: a trainer work directory, its `checkpoints/` folder (the latest step, or --step), one
orbax PyTree checkpoint directory, or a `.msgpack` / `.safetensors` file of params (safetensors keys are
Flax paths joined by '/'). The saved item may be the params tree itself or a dict holding it under
`params` (the trainer's train state). A two-stage work directory (the demo's W) holds one work
directory per stage: name one, e.g. W/stage2.

--variant and --image-size default to `model.variant` and `model.image_size` of the run's `config.json`
(written by pre-training and fine-tuning into the work directory) when --checkpoint is a work directory
or lies in its `checkpoints/`; a flag given wins, and one that differs from config.json is named in a
notice. Without either, the weights give the size (named ViT widths only) and the image size is 224.
Each file's metadata records the variant and image size with where each came from, the checkpoint and
its step, and the task and head of a fine-tuning run; the line that names the file gives the step.

An encoder export loads with `strict=True` into timm's `VisionTransformer`; the command prints the
constructor to use. --modality all writes OUT with `-rgb` and `-depth` before the suffix. --full-model
writes every parameter of the model (decoder, heads, both encoders) under dotted names (see
`timm_layout`), for PyTorch re-implementations; it matches no timm class.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, NamedTuple, Optional

import numpy as np

from mmcmae_jax.errors import ConfigError, one_line, run_reporting
from mmcmae_jax.models.vit import parse_variant
from mmcmae_jax.port.timm_layout import (ImageSize, encoder_image_size, encoder_spec, flax_encoder_to_timm, image_hw,
                                         timm_constructor, tree_to_state_dict)
from mmcmae_jax.run.mismatch import check_single_stage, variant_mismatch
from mmcmae_jax.run.workdir import (checkpoint_location, config_path, load_params, read_config, run_workdir,
                                    stage_workdirs)


class ModelSettings(NamedTuple):
    """--variant and --image-size as the export uses them, each with where it came from, and the flags
    that overrule a different value of the run's config.json (one phrase each)."""
    variant: Optional[str]
    variant_source: str
    image_size: Optional[ImageSize]
    image_size_source: str
    overruled: tuple = ()
    config_json: Optional[str] = None


def recorded_model(path: str, config: dict) -> tuple:
    """(model.variant, model.image_size) of the config a run recorded in `path`; errors name the file
    and the field."""
    model = config.get("model")
    if not isinstance(model, dict) or "variant" not in model or "image_size" not in model:
        raise ValueError(f"{path}: no model.variant and model.image_size in it (not a pre-training or "
                         "fine-tuning config?); pass --variant and --image-size instead")
    variant, size = model["variant"], model["image_size"]
    if not isinstance(variant, str):
        raise ValueError(f"{path}: model.variant={variant!r} is not a string such as 'B/16'")
    try:
        parse_variant(variant)
    except ValueError as err:
        raise ValueError(f"{path}: model.variant: {err}") from None
    if isinstance(size, list) and len(size) == 2:  # JSON has no tuples
        size = tuple(size)
    sides = size if isinstance(size, tuple) else (size,)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        raise ValueError(f"{path}: model.image_size={model['image_size']!r} is not a positive int or [H, W]")
    return variant, size


def model_settings(checkpoint: str, variant: Optional[str] = None,
                   image_size: Optional[ImageSize] = None) -> ModelSettings:
    """--variant and --image-size for `checkpoint`: each from its flag, else from the run's config.json,
    else None (the weights' named size; 224 px). A flag that differs from config.json is listed in
    `overruled`."""
    check_single_stage(checkpoint, stage_workdirs(checkpoint))
    from_config, config_file, recorded = (None, None), None, None
    if run_workdir(checkpoint) is not None:
        config_file = config_path(checkpoint)
        try:
            recorded = read_config(checkpoint)
        except ValueError as err:
            if variant is None or image_size is None:
                raise ValueError(f"{err}; pass --variant and --image-size instead") from None
            # Both flags given: the record is not needed, so an unreadable one is not in the way.
        if recorded is not None and (variant is None or image_size is None):
            from_config = recorded_model(config_file, recorded)

    def pick(flag_value, flag, config_value, field):
        if flag_value is not None:
            return flag_value, flag
        if config_value is not None:
            return config_value, f"{field} in {config_file}"
        return None, f"no {flag}, no run config.json"

    overruled = []
    model = recorded.get("model") if isinstance(recorded, dict) else None
    if isinstance(model, dict):
        if variant is not None and model.get("variant") not in (None, variant):
            overruled.append(f"--variant {variant} (the run's model.variant: {model['variant']})")
        size = model.get("image_size")
        if image_size is not None and size is not None and _sides(size) != _sides(image_size):
            overruled.append(f"--image-size {_size_text(image_size)} (the run's model.image_size: {_size_text(size)})")
    variant, variant_source = pick(variant, "--variant", from_config[0], "model.variant")
    image_size, size_source = pick(image_size, "--image-size", from_config[1], "model.image_size")
    return ModelSettings(variant, variant_source, image_size, size_source, tuple(overruled), config_file)


def _sides(size) -> tuple:
    """(H, W) of an image size as a flag or config.json gives it (N, (H, W) or [H, W])."""
    try:
        return tuple(image_hw(tuple(size) if isinstance(size, list) else size))
    except (TypeError, ValueError):
        return (size,)


def _size_text(size) -> str:
    sides = _sides(size)
    return str(sides[0]) if len(set(sides)) == 1 else "x".join(map(str, sides))


def run_metadata(checkpoint: str, step: Optional[int]) -> dict:
    """Metadata of every exported file: the checkpoint read, its step, and the task and head of the run
    that wrote it when its config.json says (a fine-tuning run)."""
    where, found_step = checkpoint_location(checkpoint, step)
    metadata = {"checkpoint": where, "step": "" if found_step is None else str(found_step)}
    if run_workdir(checkpoint) is not None:
        try:
            recorded = read_config(checkpoint) or {}
        except ValueError:  # already said by model_settings where it matters
            recorded = {}
        if isinstance(recorded.get("task"), str):
            metadata["task"] = recorded["task"]
        head = recorded.get("head")
        if isinstance(head, dict) and isinstance(head.get("kind"), str):
            metadata["head"] = head["kind"]
    return metadata


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
    """Write the state_dicts; returns [(path, timm constructor or None)]. `variant` and `image_size`
    default to the run's config.json (see `model_settings`)."""
    if full_model:  # every parameter under its own name: neither the size nor the image size matters
        check_single_stage(checkpoint, stage_workdirs(checkpoint))
        metadata = run_metadata(checkpoint, step)
        state_dict = tree_to_state_dict(load_params(checkpoint, step)[0])
        save_state_dict(state_dict, out, {"format": "pt", "layout": "mmcmae_jax full model, dotted names", **metadata})
        return [(out, None)]
    settings = model_settings(checkpoint, variant, image_size)
    variant, image_size = settings.variant, settings.image_size
    metadata = run_metadata(checkpoint, step)
    params, _ = load_params(checkpoint, step)
    modalities = ("rgb", "depth") if modality == "all" else (modality,)
    written = []
    for m in modalities:
        enc = encoder_params(params, m)
        heads = None
        if variant is not None:
            wanted, found = parse_variant(variant), encoder_spec(enc, num_heads=1)
            if (found.width, found.depth, found.patch_size) != (wanted.width, wanted.depth, wanted.patch_size):
                given = (f"--variant {variant}" if settings.variant_source == "--variant"
                         else f"variant {variant} ({settings.variant_source})")
                raise ValueError(variant_mismatch(given, m, wanted, found))
            heads = wanted.num_heads
        spec = encoder_spec(enc, num_heads=heads)
        size = encoder_image_size(enc, image_size)
        state_dict = flax_encoder_to_timm(enc, image_size=size)
        path = _out_path(out, m, len(modalities) > 1)
        save_state_dict(state_dict, path, {
            "format": "pt", "modality": m, **metadata,
            "variant": variant or f"{spec.width}x{spec.depth}x{spec.num_heads}/{spec.patch_size}",
            "variant_from": settings.variant_source if variant else "the weights",
            "image_size": _size_text(size), "image_size_from": settings.image_size_source})
        written.append((path, timm_constructor(spec, size, class_token="cls_token" in enc)))
    return written


def _image_size(text: str):
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return tuple(parts)
    raise argparse.ArgumentTypeError(f"--image-size {text!r}: give N or H,W")


def _print_settings(settings: ModelSettings) -> None:
    # Printed before the export: a size that the checkpoint refuses is then read knowing where it came from.
    if settings.overruled:
        print(f"notice: the command line overrules {settings.config_json}: {', '.join(settings.overruled)}")
    if settings.variant is None:
        print(f"variant: the named ViT size of the weights' width ({settings.variant_source})")
    else:
        print(f"variant {settings.variant} ({settings.variant_source})")
    if settings.image_size is None:
        print(f"image size 224, unless a learned position table fixes it ({settings.image_size_source})")
    else:
        h, w = image_hw(settings.image_size)
        print(f"image size {h if h == w else f'{h}x{w}'} ({settings.image_size_source})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmcmae_jax.port.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="work directory, checkpoints/ folder, orbax PyTree directory, .msgpack or .safetensors")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--modality", choices=("rgb", "depth", "all"), default="rgb")
    parser.add_argument("--full-model", action="store_true", help="every parameter, dotted names (no timm class)")
    parser.add_argument("--variant", help="e.g. B/16 or 64x2x2/16: needed for the head count of a custom width "
                        "(default: model.variant of the run's config.json)")
    parser.add_argument("--image-size", type=_image_size, default=None,
                        help="N or H,W for the sin-cos table and img_size (default: model.image_size of the "
                        "run's config.json, else 224; a learned table fixes it)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--debug", action="store_true", help="a failure's traceback instead of its one line "
                        "(also MMCMAE_DEBUG=1)")
    args = parser.parse_args(argv)
    return run_reporting(lambda: _export_and_print(args), args.debug)


def _export_and_print(args) -> int:
    try:
        if not args.full_model:
            _print_settings(model_settings(args.checkpoint, args.variant, args.image_size))
        written = export(args.checkpoint, args.out, modality=args.modality, full_model=args.full_model,
                         variant=args.variant, image_size=args.image_size, step=args.step)
    except (ValueError, FileNotFoundError) as err:  # the flags do not fit the checkpoint, or name none
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"export of --checkpoint={args.checkpoint}: {one_line(err)}") from None
    where, step = checkpoint_location(args.checkpoint, args.step)
    for path, constructor in written:
        print(f"wrote {path} ({'' if step is None else f'step {step} of '}{where})")
        if constructor:
            print("load it with:\n"
                  "    import timm, torch\n"
                  "    from safetensors.torch import load_file\n"
                  f"    model = {constructor}\n"
                  f"    model.load_state_dict(load_file({path!r}), strict=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
