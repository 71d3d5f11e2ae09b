"""The modality table: what the model and the objective need to know of each input and target.

Like MultiMAE's domain table: a modality is its batch field (the same name), its channels, the batch
field of its valid pixels (losses and norm-pix targets read only measured values), whether the stage-2
noise objective corrupts it, and its reconstruction loss. Adding a modality (e.g. surface normals,
3 channels, all valid) is one entry here and, if mean squared error does not suit it, its loss.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from mmcmae_jax import losses


@dataclasses.dataclass(frozen=True)
class Modality:
    channels: int
    # The batch field that is 1 where a value was measured (None: every value is); a (B,H,W,1) field is
    # broadcast over the channels.
    valid_key: Optional[str] = None
    # Noised: objective.depth_noise adds sigma*e to this input, the model embeds sigma into its tokens,
    # and the denoising loss predicts the noise on its visible patches.
    noised: bool = False
    # (pred, target, patch mask, pixel_valid or None) -> scalar; patches (B, N, P*P*channels).
    reconstruction_loss: Callable = losses.masked_patch_mse


MODALITIES = {
    "rgb": Modality(channels=3),
    "depth": Modality(channels=1, valid_key="depth_valid", noised=True),
}

# The batch fields a pre-training loss reads: every modality and its valid-pixel field.
BATCH_KEYS = (*MODALITIES, *(spec.valid_key for spec in MODALITIES.values() if spec.valid_key))
