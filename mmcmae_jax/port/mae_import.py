"""ImageNet MAE (or any timm ViT) weights -> our encoders, as the pre-training initialisation.

Accepted sources: a path to a PyTorch checkpoint (`.pth`, `.pt`, `.bin`, `.ckpt`; read with
`torch.load(..., weights_only=True)`, so no pickled code runs), a `.safetensors` file, or an in-memory
state_dict. The official MAE release keeps the state_dict under `model`; timm and our export keep it at
the top level; both are accepted (also under `state_dict`).

What is taken: the encoder (patch embedding, cls token, blocks, final norm). What is dropped, by name:
MAE's pre-training decoder (`decoder_*`, `mask_token`) and a classifier (`head.*`, `fc_norm.*`).
Anything else the encoder does not have is an error, as is anything it needs and does not find.

Position embedding:
- into a sin-cos encoder (our default): the encoder computes its table from the grid, so the
  checkpoint's table is not loaded; it is checked to be MAE's fixed sin-cos table (it is, for MAE
  pre-training checkpoints), because a learned table would be silently thrown away otherwise
  (LearnedPositionTableError). Pass `check_sincos=False` to drop a learned table on purpose; the
  commands' config field for it is `init_from_mae_drop_learned_pos_embed`.
- into a learned-table encoder: copied, and resampled (bicubic over the patch grid, the cls slot kept)
  when the checkpoint's grid differs from the encoder's.

Depth encoder (1 channel): the RGB patch projection is averaged over the colour channels, so a depth
patch is read by the mean RGB filter (timm's `adapt_input_conv` sums instead; depth is standardised per
image, so the scale is relearned quickly either way and the mean keeps the weight norm of one channel).
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from mmcmae_jax.errors import unreadable_as
from mmcmae_jax.models.vit import sincos_pos_embed_2d
from mmcmae_jax.port.timm_layout import ImageSize, image_hw, state_dict_to_tree

log = logging.getLogger(__name__)

StateDictSource = Union[str, os.PathLike, Mapping]

# Non-encoder parts of MAE pre-training and timm classification checkpoints: dropped by design.
_DROPPED_PREFIXES = ("decoder_", "decoder.", "mask_token", "head.", "fc_norm.")
# MAE's table is float32 of a float64 computation, like ours; a learned table differs by far more.
_SINCOS_TOLERANCE = 1e-4


class LearnedPositionTableError(ValueError):
    """The checkpoint's position table was learned (a supervised timm ViT, or a fine-tuned one): a
    sin-cos encoder started from it would throw it away. `finding` says what was found, without the
    advice, which each caller words for its own settings (the commands name their config fields)."""

    def __init__(self, finding: str):
        self.finding = finding
        super().__init__(f"{finding}. Build the encoder with pos_embed='learned' to keep it, or pass "
                         "check_sincos=False to drop it.")


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor: bfloat16/float16 have no exact NumPy twin here
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def read_state_dict(source: StateDictSource) -> dict:
    """A state_dict as {name: NumPy array}, from a file or a mapping, unwrapped from `model` /
    `state_dict` when the weights are nested there (MAE's release nests them under `model`)."""
    if isinstance(source, Mapping):
        raw, where = source, "the given state_dict"
    else:
        path = os.fspath(source)
        where = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no weights file at {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            with unreadable_as(ValueError, path, "a safetensors file"):
                raw = load_file(path)
        else:
            try:
                import torch
            except ImportError:
                raise ImportError(f"reading the PyTorch checkpoint {path!r} needs torch: pip install "
                                  "'mmcmae_jax[torch]' (or convert it to .safetensors elsewhere)") from None
            # weights_only: tensors and plain containers only; a pickle that would run code is refused.
            with unreadable_as(ValueError, path, "a PyTorch checkpoint (torch.load, weights only)"):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(raw, Mapping) and "patch_embed.proj.weight" not in raw and isinstance(raw.get(key), Mapping):
            raw = raw[key]
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a state_dict (a mapping of names to tensors), got {type(raw).__name__}")
    return {str(k): _to_numpy(v) for k, v in raw.items()}


def resample_pos_embed(table: np.ndarray, grid_hw, *, num_prefix: int = 1) -> np.ndarray:
    """(1, prefix + H0*W0, D) -> (1, prefix + H*W, D): bicubic over a square source grid, prefix (cls)
    slots unchanged."""
    import jax

    table = np.asarray(table, np.float32)
    prefix, patches = table[:, :num_prefix], table[:, num_prefix:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"cannot resample a position table of {patches.shape[1]} patches: not a square grid")
    h, w = grid_hw
    if (h, w) == (side, side):
        return table
    grid = patches.reshape(side, side, -1)
    resized = np.asarray(jax.image.resize(grid, (h, w, grid.shape[-1]), method="bicubic"), np.float32)
    return np.concatenate([prefix, resized.reshape(1, h * w, -1)], axis=1)


def load_mae_into_encoder(source: StateDictSource, template: Mapping, *, in_chans: Optional[int] = None,
                          image_size: Optional[ImageSize] = None, check_sincos: bool = True,
                          state_dict: Optional[Mapping] = None) -> dict:
    """MAE/timm ViT weights -> a parameter tree for the `ViTEncoder` whose params look like `template`
    (its `init` output, or `jax.eval_shape` of it). Returns NumPy arrays; the template is not changed.

    in_chans: 3 (RGB) or 1 (depth: the patch projection averaged over colour channels); by default
    read from the template. image_size: the encoder's image size, checked against a learned table.
    """
    sd = dict(read_state_dict(source) if state_dict is None else state_dict)
    if "patch_embed" not in template:
        raise ValueError(f"the template is not a ViT encoder's parameters (top-level keys {sorted(template)})")
    kernel_shape = tuple(np.shape(template["patch_embed"]["proj"]["kernel"]))
    patch, chans, width = kernel_shape[0], kernel_shape[2], kernel_shape[3]
    if in_chans is not None and in_chans != chans:
        raise ValueError(f"in_chans={in_chans} but the encoder's patch projection reads {chans} channels")

    dropped = sorted(k for k in sd if k.startswith(_DROPPED_PREFIXES))
    for key in dropped:
        del sd[key]
    if dropped:
        log.info("MAE import: not part of the encoder, dropped: %s", ", ".join(dropped))

    weight = sd.get("patch_embed.proj.weight")
    if weight is not None and weight.ndim == 4 and weight.shape[1] != chans:
        if chans == 1:
            sd["patch_embed.proj.weight"] = weight.mean(axis=1, keepdims=True)
        else:
            raise ValueError(f"patch_embed.proj.weight reads {weight.shape[1]} channels; the encoder reads "
                             f"{chans} (only 3 -> 1, by averaging, is converted)")

    has_cls = "cls_token" in template
    table = sd.pop("pos_embed", None)
    if "pos_embed" in template:
        if table is None:
            raise ValueError("missing keys (1): pos_embed (the encoder has a learned position table)")
        target_n = np.shape(template["pos_embed"])[1] - 1
        side = int(round(target_n ** 0.5))
        if image_size is not None:
            h, w = image_hw(image_size)
            if (h // patch) * (w // patch) != target_n:
                raise ValueError(f"image_size {h}x{w} does not match the encoder's table of {target_n} patches")
        src_prefix = table.shape[1] - int(round((table.shape[1] - 1) ** 0.5)) ** 2
        if src_prefix == 0:  # a table without a cls slot (class_token=False): give it a zero one
            table = np.concatenate([np.zeros_like(table[:, :1]), table], axis=1)
        elif src_prefix != 1:
            raise ValueError(f"pos_embed {table.shape}: neither 1+H*W nor H*W for a square grid")
        sd["pos_embed"] = resample_pos_embed(table, (side, side), num_prefix=1)
    elif table is not None and check_sincos:
        _check_sincos_table(table, width, has_cls)

    return state_dict_to_tree(sd, template, what="checkpoint")


def _check_sincos_table(table: np.ndarray, width: int, has_cls: bool) -> None:
    table = np.asarray(table, np.float32)
    n = table.shape[1]
    side = int(round((n - 1) ** 0.5))
    prefix = 1 if side * side == n - 1 else 0
    side = int(round((n - prefix) ** 0.5))
    if side * side != n - prefix or table.shape[-1] != width:
        raise ValueError(f"pos_embed {table.shape}: not a square grid of width {width}")
    expected = sincos_pos_embed_2d(width, side, side)
    diff = float(np.max(np.abs(table[0, prefix:] - expected)))
    cls_slot = float(np.max(np.abs(table[0, :prefix]))) if prefix else 0.0
    if diff > _SINCOS_TOLERANCE or cls_slot > _SINCOS_TOLERANCE:
        raise LearnedPositionTableError(
            f"the checkpoint's pos_embed is not MAE's fixed sin-cos table (max difference {diff:.3g}, cls "
            f"slot {cls_slot:.3g}): it was learned, and the sin-cos encoder would throw it away")


def check_position_table(state_dict: Mapping, width: int) -> None:
    """Raise LearnedPositionTableError when the state_dict's `pos_embed` is not the fixed sin-cos table
    of a `width`-wide encoder: what starting a sin-cos encoder from it checks, here before any model is
    built. A state_dict without a table passes."""
    if "pos_embed" in state_dict:
        _check_sincos_table(state_dict["pos_embed"], width, has_cls=True)


def init_encoders_from_mae(params: Mapping, source: StateDictSource, *,
                           modalities: Sequence[str] = ("rgb", "depth"),
                           image_size: Optional[ImageSize] = None, check_sincos: bool = True) -> dict:
    """A stage-1 (`CrossModalContrastive`) or stage-2 (`MultiModalMAE`) parameter tree with each
    `{m}_encoder` replaced by the MAE weights (depth: channel-averaged patch projection). Other
    entries (projection heads, decoder) are returned as they were. The file is read once."""
    sd = read_state_dict(source)
    out = dict(params)
    found = [m for m in modalities if f"{m}_encoder" in params]
    if not found:
        raise ValueError(f"no encoder of {list(modalities)} in the parameters (top-level keys {sorted(params)})")
    for m in found:
        try:
            out[f"{m}_encoder"] = load_mae_into_encoder(None, params[f"{m}_encoder"], image_size=image_size,
                                                        check_sincos=check_sincos, state_dict=sd)
        except ValueError as err:
            where = f"{m}_encoder from {source if not isinstance(source, Mapping) else 'state_dict'}"
            if isinstance(err, LearnedPositionTableError):  # keeps its type: callers add their own advice
                raise LearnedPositionTableError(f"{where}: {err.finding}") from None
            raise ValueError(f"{where}: {err}") from None
    return out
