"""A stage is a model and a loss: `make_objective(config)` gives both, for stage 1 or stage 2.

The loss has one signature for every stage, so the trainer never asks which stage it runs:

    loss_fn(params, frozen, batch, rng) -> (loss, metrics)

`params` are trained; `frozen` holds the stage-1 encoders used as distillation teachers (an empty dict
when there is no teacher) and never receives a gradient. `batch` follows the data contract: `rgb`
(B,H,W,3) normalised, `depth` (B,H,W,1) standardised, `depth_valid` (B,H,W,1) in {0, 1}. `metrics`
holds each loss term by name and, as `<term>_trivial`, what a prediction that learned nothing scores on
the same batch (losses.py, last section), computed in the step at the cost of a few reductions.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmcmae_jax import losses
from mmcmae_jax.modalities import BATCH_KEYS, MODALITIES
from mmcmae_jax.models import matmul
from mmcmae_jax.models.m3 import CrossModalContrastive, MultiModalMAE, max_pool_tokens
from mmcmae_jax.models.masking import multimodal_masks, random_mask
from mmcmae_jax.models.vit import ViTEncoder, drop_cls, parse_variant, patchify


class Objective(NamedTuple):
    model: nn.Module
    init: Callable  # (rng, batch) -> params
    loss: Callable  # (params, frozen, batch, rng) -> (loss, metrics)
    forward: Callable  # (params, batch, rng) -> dict of model outputs and inputs, for pictures
    teacher: nn.Module | None  # the encoder module that `frozen` parameterises
    batch_keys: tuple = BATCH_KEYS  # the batch fields the loss reads


def _encoder_kwargs(model_cfg) -> dict:
    return dict(variant=model_cfg.variant, use_cls_token=model_cfg.use_cls_token, pos_embed=model_cfg.pos_embed,
                image_size=model_cfg.image_size, dtype=jnp.dtype(model_cfg.dtype))


def sample_sigma(rng: jax.Array, batch: int, obj: ml_collections.ConfigDict) -> jax.Array:
    """Per-example noise level sigma (B,): uniform on [0, sigma_max], or log-normal clipped to it."""
    if obj.sigma_distribution == "uniform":
        return jax.random.uniform(rng, (batch,), maxval=obj.sigma_max)
    log_sigma = obj.sigma_lognormal_mean + obj.sigma_lognormal_std * jax.random.normal(rng, (batch,))
    return jnp.minimum(jnp.exp(log_sigma), obj.sigma_max)


def make_objective(config: ml_collections.ConfigDict) -> Objective:
    """The objective of a checked config (config.validate; the commands check it once, at start)."""
    objective = (_stage1 if config.objective.stage == 1 else _stage2)(config.model, config.objective)
    return with_matmul_precision(objective, config.model.matmul_precision)


def with_matmul_precision(objective: Objective, precision: str) -> Objective:
    """The objective with init, loss and forward traced under `precision` (models/matmul.py)."""
    return objective._replace(**{name: matmul.under_precision(getattr(objective, name), precision)
                                 for name in ("init", "loss", "forward")})


def _stage1(model_cfg, obj) -> Objective:
    model = CrossModalContrastive(modalities=("rgb", "depth"), proj_hidden=model_cfg.proj_hidden,
                                  proj_dim=model_cfg.proj_dim, **_encoder_kwargs(model_cfg))
    patch = parse_variant(model_cfg.variant).patch_size

    def inputs(batch, rng):
        images = {"rgb": batch["rgb"], "depth": batch["depth"]}
        if obj.stage1_mask_ratio == 0.0:
            return images, None
        num_patches = (images["rgb"].shape[1] // patch) * (images["rgb"].shape[2] // patch)
        return images, random_mask(rng, images["rgb"].shape[0], num_patches, obj.stage1_mask_ratio).keep_idx

    def patch_valid(batch, keep_idx):
        """(B, N) or (B, kept): the patches with enough measured depth to take part in the loss."""
        valid_fraction = patchify(batch["depth_valid"], patch).mean(axis=-1)
        if keep_idx is not None:
            valid_fraction = jnp.take_along_axis(valid_fraction, keep_idx, axis=1)
        return valid_fraction > obj.contrastive_min_valid_fraction

    def init(rng, batch):
        return model.init(rng, *inputs(batch, rng))["params"]

    def loss_fn(params, frozen, batch, rng):
        del frozen  # stage 1 has no teacher
        images, keep_idx = inputs(batch, rng)
        out = model.apply({"params": params}, images, keep_idx)
        valid = patch_valid(batch, keep_idx)
        contrastive = losses.patch_info_nce(out["z_rgb"], out["z_depth"], obj.temperature, obj.negatives, valid)
        # Diagnostic, free of extra compute: the same loss against the depth of another frame. If it is
        # as low as `contrastive`, the encoders match patches by position, not by content.
        mismatched = losses.patch_info_nce(out["z_rgb"], jnp.roll(out["z_depth"], 1, axis=0), obj.temperature,
                                           obj.negatives, jnp.roll(valid, 1, axis=0))
        return obj.weights.contrastive * contrastive, {
            "contrastive": contrastive, "contrastive_other_frame": jax.lax.stop_gradient(mismatched),
            "contrastive_trivial": losses.uniform_info_nce(valid, obj.negatives),
            # The share of patches that take part; a data set with little depth shows it here.
            "contrastive_valid_patches": jnp.mean(valid.astype(jnp.float32))}

    def forward(params, batch, rng):
        return model.apply({"params": params}, *inputs(batch, rng))

    return Objective(model, init, loss_fn, forward, None)


def _stage2(model_cfg, obj) -> Objective:
    inputs, targets = tuple(obj.inputs), tuple(obj.targets)
    # Three switches (config.validate_objective checks that they fit together): noise on the depth input,
    # its level embedded into the depth tokens, and the loss that predicts the noise.
    denoise, distill = obj.weights.denoise > 0, obj.weights.distill > 0
    model = MultiModalMAE(modalities=inputs, targets=targets, decoder_depth=model_cfg.decoder_depth,
                          decoder_width=model_cfg.decoder_width, decoder_heads=model_cfg.decoder_heads,
                          use_sigma_embedding=obj.sigma_embedding, **_encoder_kwargs(model_cfg))
    teacher = ViTEncoder(**_encoder_kwargs(model_cfg)) if distill else None
    patch = parse_variant(model_cfg.variant).patch_size

    def sample_masks(rng, batch):
        num_patches = (batch["rgb"].shape[1] // patch) * (batch["rgb"].shape[2] // patch)
        return multimodal_masks(rng, batch["rgb"].shape[0], {m: num_patches for m in inputs},
                                {m: obj.mask_ratio[m] for m in inputs}, obj.mask_mode, obj.dirichlet_alpha)

    def run(params, batch, rng):
        """Noise the noised inputs (depth), mask every input, run the model. Returns (out, masks,
        {noised modality: added noise}, sigma)."""
        rng_mask, rng_sigma, rng_noise = jax.random.split(rng, 3)
        images = {m: batch[m] for m in inputs}
        sigma, added_noise = None, {}
        if obj.depth_noise:
            sigma = sample_sigma(rng_sigma, batch["rgb"].shape[0], obj)
            for i, m in enumerate(m for m in inputs if MODALITIES[m].noised):
                # The first noised modality draws from rng_noise itself (the numbers it always had).
                e = jax.random.normal(jax.random.fold_in(rng_noise, i) if i else rng_noise, batch[m].shape)
                added_noise[m] = sigma[:, None, None, None] * e
                if MODALITIES[m].valid_key:  # noise only where measured: holes stay holes (0), as sensors give them
                    added_noise[m] = added_noise[m] * batch[MODALITIES[m].valid_key]
                images[m] = batch[m] + added_noise[m]
        masks = sample_masks(rng_mask, batch)
        return model.apply({"params": params}, images, masks, sigma), masks, added_noise, sigma

    def init(rng, batch):
        rng_init, rng_fwd = jax.random.split(rng)
        sigma = jnp.zeros(batch["rgb"].shape[:1]) if obj.sigma_embedding else None
        return model.init(rng_init, {m: batch[m] for m in inputs}, sample_masks(rng_fwd, batch), sigma)["params"]

    def reconstruction_target(images, pixel_valid=None):
        target = patchify(images, patch)
        return losses.normalize_patches(target, pixel_valid) if obj.norm_pix_targets else target

    def loss_fn(params, frozen, batch, rng):
        out, masks, added_noise, sigma = run(params, batch, rng)
        batch_size, num_patches = out["pred"][targets[0]].shape[:2]
        everything = jnp.ones((batch_size, num_patches))  # a target that is no input is hidden everywhere
        # terms: the losses; trivial: what a prediction that learned nothing scores on the same batch.
        terms, trivial = {}, {}
        for t in sorted(targets):
            spec = MODALITIES[t]
            pixel_valid = None  # every value measured
            if spec.valid_key:  # a (B,H,W,1) field holds for every channel
                pixel_valid = patchify(jnp.broadcast_to(batch[spec.valid_key], batch[t].shape), patch)
            hidden = masks[t].mask if t in inputs else everything
            target = reconstruction_target(batch[t], pixel_valid)
            terms[t] = spec.reconstruction_loss(out["pred"][t], target, hidden, pixel_valid)
            trivial[t] = losses.image_mean_reconstruction_loss(target, hidden, pixel_valid, channels=spec.channels)
            if denoise and t in added_noise:
                noise_target = patchify(added_noise[t], patch)
                terms["denoise"] = losses.denoising_loss(out["pred"][t], noise_target, masks[t].mask, pixel_valid)
                trivial["denoise"] = losses.zero_noise_denoising_loss(noise_target, masks[t].mask, pixel_valid)
        if distill:
            teacher_features = {m: _teacher_features(teacher, frozen[f"{m}_encoder"], batch[m], model_cfg,
                                                     masks[m] if obj.distill_teacher_input == "visible" else None)
                                for m in inputs}
            terms["distill"] = sum(losses.smooth_l1_distill(out["pooled"][m], teacher_features[m], obj.distill_beta)
                                   for m in inputs)
            trivial["distill"] = sum(losses.batch_mean_distill_loss(teacher_features[m], obj.distill_beta)
                                     for m in inputs)
        loss = sum(obj.weights[name] * value for name, value in terms.items())
        metrics = dict(terms)
        metrics.update({f"{name}_trivial": jax.lax.stop_gradient(value) for name, value in trivial.items()})
        if obj.depth_noise:
            metrics["sigma_mean"] = jnp.mean(sigma)
        return loss, metrics

    def forward(params, batch, rng):
        out, masks, added_noise, sigma = run(params, batch, rng)
        return {"pred": out["pred"], "mask": {m: masks[m].mask for m in masks},
                "added_noise": added_noise.get("depth"), "sigma": sigma}

    return Objective(model, init, loss_fn, forward, teacher)


def _teacher_features(teacher, teacher_params, clean_images, model_cfg, student_mask=None):
    """Max-pooled output of a frozen stage-1 encoder on the clean frame: all of it (student_mask None),
    or only the patches the student sees (its Mask: the same keep indices, padded slots left out)."""
    keep_idx, keep_valid = (None, None) if student_mask is None else (student_mask.keep_idx, student_mask.keep_valid)
    tokens, _ = teacher.apply({"params": jax.lax.stop_gradient(teacher_params)}, clean_images, keep_idx, keep_valid)
    return jax.lax.stop_gradient(max_pool_tokens(drop_cls(tokens, model_cfg.use_cls_token), keep_valid))


def teacher_params_from_stage1(stage1_params: dict, inputs=("rgb", "depth")) -> dict:
    """The frozen teachers of stage 2: the stage-1 encoders, by name."""
    return {f"{m}_encoder": stage1_params[f"{m}_encoder"] for m in inputs}


def init_stage2_from_stage1(stage2_params: dict, stage1_params: dict) -> dict:
    """Stage 2 starts its encoders from stage 1 (same module names); everything else stays as initialised."""
    params = dict(stage2_params)
    for name in params:
        if name.endswith("_encoder") and name in stage1_params:
            shapes = jax.tree.map(lambda a, b: a.shape == b.shape, params[name], dict(stage1_params[name]))
            if not all(jax.tree.leaves(shapes)):
                raise ValueError(f"the stage-1 {name} has other shapes than this model's; use the same "
                                 "model.variant and model.image_size in both stages")
            params[name] = stage1_params[name]
    return params
