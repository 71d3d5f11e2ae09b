"""Picture summaries of stage 2: per example, the masked inputs, the reconstruction, the predicted noise
and the ground truth, with column titles and a depth colour bar per row, written as PNG under
WORKDIR/images/ and to TensorBoard."""
from __future__ import annotations

import os

import jax
import numpy as np

from mmcmae_jax import visualize
from mmcmae_jax.device_batch import prepare_batch
from mmcmae_jax.models.vit import parse_variant, unpatchify
from mmcmae_jax.train import sharding

NUM_EXAMPLES = 4


def stage2_picture_fn(objective, config, workdir: str):
    """images_fn(step, params, global host batch, writer) for the trainer."""
    patch = parse_variant(config.model.variant).patch_size
    mesh = sharding.make_mesh(config.mesh.fsdp)

    def first_examples(params, batch, rng):
        batch = prepare_batch(batch, objective.batch_keys, config.data.depth_trim)
        out = objective.forward(params, batch, rng)
        return jax.tree.map(lambda x: x[:NUM_EXAMPLES], (out, batch))

    forward = jax.jit(first_examples, out_shardings=sharding.replicated(mesh))

    def write(step, params, batch, writer):
        out, inputs = jax.device_get(forward(params, batch, jax.random.key(step)))
        figure = stage2_figure(out, inputs, patch, f"step {step}: training batch")
        writer.write_image(step, "reconstruction", visualize.figure_to_image(figure),
                           os.path.join(workdir, "images", f"step_{step:06d}.png"))

    return write


def stage2_figure(out: dict, inputs: dict, patch: int, title: str | None = None):
    """The picture grid of a stage-2 forward pass: one row per example, a title over each column, and at
    the end of each row the colour bar of its depth maps (inputs are standardised per frame: depth in
    standard deviations from the frame's mean). The predicted noise has its own range, in the row label."""
    rows, labels, colorbars = [], [], []
    for i in range(len(inputs["rgb"])):
        images, titles, (vmin, vmax), noise_scale = example_panels(out, inputs, i, patch)
        rows.append(images)
        labels.append(f"example {i}" + ("" if noise_scale is None else f"\nnoise ±{noise_scale:.2g}"))
        colorbars.append(("turbo", vmin, vmax, "depth (σ)"))
    return visualize.plot_panels(rows, titles=titles, row_labels=labels, colorbars=colorbars, suptitle=title)


def example_row(out: dict, inputs: dict, i: int, patch: int) -> list:
    """The images of example `i` (`example_panels`), in the order of its column titles."""
    return example_panels(out, inputs, i, patch)[0]


def example_panels(out: dict, inputs: dict, i: int, patch: int):
    """(images, column titles, (vmin, vmax) of its depth maps, range of the predicted noise or None) of
    example `i`: rgb masked, depth input masked, depth reconstruction, predicted noise, depth truth and
    the RGB reconstruction, each where the objective has it."""
    height, width = inputs["rgb"].shape[1:3]
    grid_h = height // patch
    valid = inputs["depth_valid"][i]
    masks = out["mask"]
    rgb = visualize.rgb_to_uint8(inputs["rgb"][i])
    row = [visualize.masked_overlay(rgb, masks["rgb"][i], patch) if "rgb" in masks else rgb]
    titles = ["RGB, masked" if "rgb" in masks else "RGB"]

    truth = inputs["depth"][i]
    noisy = truth if out["added_noise"] is None else truth + out["added_noise"][i]
    vmin, vmax = visualize.shared_depth_scale(truth, valid=valid)
    depth_mask = masks.get("depth", np.ones(grid_h * (width // patch)))[i]
    row.append(visualize.masked_overlay(visualize.colorize(noisy, vmin, vmax, valid=valid), depth_mask, patch))
    titles.append(("noisy depth" if out["added_noise"] is not None else "depth") + ", masked")

    noise_scale = None
    if "depth" in out["pred"]:
        pred = np.asarray(unpatchify(out["pred"]["depth"][i:i + 1], patch, grid_h, 1))[0]
        hidden = visualize.patch_mask_pixels(depth_mask, height, width, patch)[..., None]
        # Reconstruction: predictions where depth was hidden, the clean input where it was seen (MAE).
        row.append(visualize.colorize(np.where(hidden, pred, truth), vmin, vmax, valid=valid))
        titles.append("reconstructed depth")
        if out["added_noise"] is not None:
            noise_scale = max(float(np.abs(out["added_noise"][i]).max()), 1e-3)
            noise = np.where(hidden, 0.0, pred)
            row.append(visualize.colorize(noise, -noise_scale, noise_scale, "coolwarm", valid=valid * (~hidden)))
            titles.append("predicted noise")
    row.append(visualize.colorize(truth, vmin, vmax, valid=valid))
    titles.append("ground-truth depth")
    if "rgb" in out["pred"]:
        rgb_pred = np.asarray(unpatchify(out["pred"]["rgb"][i:i + 1], patch, grid_h, 3))[0]
        row.append(visualize.rgb_to_uint8(rgb_pred))
        titles.append("reconstructed RGB")
    return row, titles, (vmin, vmax), noise_scale
