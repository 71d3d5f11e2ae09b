"""Picture summaries of stage 2: per example, the masked inputs, the reconstruction, the predicted noise
and the ground truth, written as PNG under WORKDIR/images/ and to TensorBoard."""
from __future__ import annotations

import os

import jax
import numpy as np

from mmcmae_jax import visualize
from mmcmae_jax.models.vit import parse_variant, unpatchify
from mmcmae_jax.train import sharding

NUM_EXAMPLES = 4


def stage2_picture_fn(objective, config, workdir: str):
    """images_fn(step, params, global_batch, writer) for the trainer."""
    patch = parse_variant(config.model.variant).patch_size
    mesh = sharding.make_mesh(config.mesh.fsdp)

    def first_examples(params, batch, rng):
        out = objective.forward(params, batch, rng)
        return jax.tree.map(lambda x: x[:NUM_EXAMPLES], (out, batch))

    forward = jax.jit(first_examples, out_shardings=sharding.replicated(mesh))

    def write(step, params, batch, writer):
        out, inputs = jax.device_get(forward(params, batch, jax.random.key(step)))
        rows = [[upscale(image) for image in example_row(out, inputs, i, patch)] for i in range(len(inputs["rgb"]))]
        writer.write_image(step, "reconstruction", visualize.grid(rows),
                           os.path.join(workdir, "images", f"step_{step:06d}.png"))

    return write


def upscale(image: np.ndarray, min_size: int = 128) -> np.ndarray:
    """Nearest-neighbour enlargement of small images, so patches stay visible in the grid."""
    factor = max(1, -(-min_size // image.shape[0]))
    return image.repeat(factor, 0).repeat(factor, 1)


def example_row(out: dict, inputs: dict, i: int, patch: int) -> list:
    """[rgb masked, depth input masked, depth reconstruction, predicted noise, depth truth, (rgb recon)]."""
    height, width = inputs["rgb"].shape[1:3]
    grid_h = height // patch
    valid = inputs["depth_valid"][i]
    masks = out["mask"]
    rgb = visualize.rgb_to_uint8(inputs["rgb"][i])
    row = [visualize.masked_overlay(rgb, masks["rgb"][i], patch) if "rgb" in masks else rgb]

    truth = inputs["depth"][i]
    noisy = truth if out["added_noise"] is None else truth + out["added_noise"][i]
    vmin, vmax = visualize.shared_depth_scale(truth, valid=valid)
    depth_mask = masks.get("depth", np.ones(grid_h * (width // patch)))[i]
    row.append(visualize.masked_overlay(visualize.colorize(noisy, vmin, vmax, valid=valid), depth_mask, patch))

    if "depth" in out["pred"]:
        pred = np.asarray(unpatchify(out["pred"]["depth"][i:i + 1], patch, grid_h, 1))[0]
        hidden = visualize.patch_mask_pixels(depth_mask, height, width, patch)[..., None]
        # Reconstruction: predictions where depth was hidden, the clean input where it was seen (MAE).
        row.append(visualize.colorize(np.where(hidden, pred, truth), vmin, vmax, valid=valid))
        if out["added_noise"] is not None:
            scale = max(float(np.abs(out["added_noise"][i]).max()), 1e-3)
            noise = np.where(hidden, 0.0, pred)
            row.append(visualize.colorize(noise, -scale, scale, "coolwarm", valid=valid * (~hidden)))
    row.append(visualize.colorize(truth, vmin, vmax, valid=valid))
    if "rgb" in out["pred"]:
        rgb_pred = np.asarray(unpatchify(out["pred"]["rgb"][i:i + 1], patch, grid_h, 3))[0]
        row.append(visualize.rgb_to_uint8(rgb_pred))
    return row
