"""Default model and objective configuration, and its validation.

Every default the paper leaves open is a field here (see README, "Our defaults"). Config files under
`configs/` start from `pretrain_config(stage)` and change what their experiment needs.
"""
from __future__ import annotations

import ml_collections

from mmcmae_jax import modalities
from mmcmae_jax.errors import ConfigError

MODALITIES = tuple(modalities.MODALITIES)  # the modality table's names (modalities.py)
NOISED = tuple(m for m, spec in modalities.MODALITIES.items() if spec.noised)
# A reconstruction term per modality, named after it.
LOSS_TERMS = ("contrastive", *MODALITIES, "denoise", "distill")


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        variant="B/16",          # ViT size/patch, or WIDTHxDEPTHxHEADS/PATCH for tiny models
        image_size=224,
        pos_embed="sincos",      # fixed 2-D sin-cos (MAE, MultiMAE), or "learned"
        use_cls_token=True,
        dtype="float32",         # compute dtype; "bfloat16" keeps float32 parameters and losses
        # "bfloat16": every matmul of the model rounds its operands to bfloat16 and sums in float32, on
        # every backend (models/matmul.py); 1.3-2x faster training on a CPU with AMX (docs/results.md).
        matmul_precision="default",
        proj_hidden=2048,        # stage-1 projection head: 2-layer MLP
        proj_dim=256,
        decoder_depth=4,         # stage-2 decoder (MultiMAE-light)
        decoder_width=256,
        decoder_heads=8,
    ))


def objective_config(stage: int) -> ml_collections.ConfigDict:
    """Stage 1: patch-level contrastive. Stage 2: masked depth reconstruction + denoising + distillation.

    A loss term is on when its weight is positive; the noise on the depth input and the embedding of its
    level are switches of their own. So baselines and ablations are configs (OBJECTIVES below):
      MAE:             inputs=(rgb,),       targets=(rgb,),       no noise, denoise=0, distill=0
      MultiMAE-style:  inputs=(rgb, depth), targets=(rgb, depth), no noise, denoise=0, distill=0
      Mask3D-style:    inputs=(rgb, depth), targets=(depth,),     no noise, denoise=0, distill=0
      M3:              inputs=(rgb, depth), targets=(depth,),     noise,    denoise=1, distill=1 (after stage 1)
    """
    return ml_collections.ConfigDict(dict(
        stage=stage,
        # Stage 1.
        temperature=0.1,
        # "batch": every patch of the batch is a negative; "image": only the other patches of the same
        # frame. With "image" both encoders can match patches by their position embedding alone, and do:
        # the demo's stage 1 reached the same loss with depth from another frame (docs/results.md, "Stage 1
        # and the position shortcut"). Across frames, patches at the same position are negatives too.
        # "position": only the same position in the other frames, so position carries no information.
        negatives="batch",
        stage1_mask_ratio=0.0,   # > 0: one mask shared by both modalities, so positives exist on both sides
        # A patch takes part in the contrastive loss (as anchor and as negative) only when more than this
        # share of its depth pixels was measured. 0: every patch with some depth; one with none has no
        # depth content to be the positive of its RGB patch.
        contrastive_min_valid_fraction=0.0,
        # Stage 2.
        inputs=MODALITIES,
        targets=("depth",),
        mask_ratio=ml_collections.ConfigDict(dict(rgb=0.8, depth=0.8)),
        mask_mode="independent",  # "independent", "shared", or "dirichlet" (one budget split, MultiMAE)
        dirichlet_alpha=1.0,
        # Reconstruction targets (rgb and depth patches) normalised per patch to zero mean and unit
        # variance over the patch's valid values: MAE's norm_pix_loss, which MAE and MultiMAE publish with.
        norm_pix_targets=False,
        # Gaussian noise x_depth + sigma*e on the depth input, sigma drawn per example. Three separate
        # switches: the noise itself (depth_noise), sigma embedded like a diffusion timestep and added to
        # the encoded depth tokens (sigma_embedding, needs the noise), and the loss that predicts the noise
        # on the visible patches (weights.denoise, needs the noise).
        depth_noise=True,
        sigma_embedding=True,
        sigma_max=1.0,            # largest noise level, in units of standardised depth
        # "uniform": sigma ~ U[0, sigma_max]; "lognormal": log sigma ~ N(sigma_lognormal_mean,
        # sigma_lognormal_std^2), clipped at sigma_max (with these defaults its median is exp(-1.2) = 0.30).
        sigma_distribution="uniform",
        sigma_lognormal_mean=-1.2,
        sigma_lognormal_std=1.2,
        distill_beta=1.0,         # smooth-L1 threshold
        # What the frozen stage-1 teacher encodes: "full", the full clean frame; "visible", only the
        # student's visible patches of that modality (clean), so both pool over the same patches.
        distill_teacher_input="full",
        weights=ml_collections.ConfigDict(dict(
            contrastive=1.0 if stage == 1 else 0.0,
            depth=1.0,            # alpha
            rgb=1.0,
            denoise=1.0,          # w_denoise
            distill=1.0,          # gamma
        )),
    ))


def pretrain_config(stage: int) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config()
    config.objective = objective_config(stage)
    return config


def _check(condition: bool, field: str, message: str):
    if not condition:
        raise ConfigError(f"config.{field}: {message}")


def validate_model(model: ml_collections.ConfigDict):
    from mmcmae_jax.models.matmul import PRECISIONS
    from mmcmae_jax.models.vit import parse_variant
    try:
        spec = parse_variant(model.variant)
    except ValueError as err:
        raise ConfigError(f"config.model.variant: {err}") from None
    _check(model.image_size > 0 and model.image_size % spec.patch_size == 0, "model.image_size",
           f"{model.image_size} must be a positive multiple of the patch size {spec.patch_size}")
    _check(model.pos_embed in ("sincos", "learned"), "model.pos_embed", f"{model.pos_embed!r} is not 'sincos' or 'learned'")
    _check(model.dtype in ("float32", "bfloat16"), "model.dtype", f"{model.dtype!r} is not 'float32' or 'bfloat16'")
    _check(model.matmul_precision in PRECISIONS, "model.matmul_precision",
           f"{model.matmul_precision!r} is not one of {PRECISIONS}")
    _check(model.decoder_width % model.decoder_heads == 0, "model.decoder_width",
           f"{model.decoder_width} is not divisible by decoder_heads={model.decoder_heads}")
    _check(model.decoder_width % 4 == 0, "model.decoder_width", "must be divisible by 4 (sin-cos positions)")
    for field in ("proj_hidden", "proj_dim", "decoder_depth", "decoder_heads"):
        _check(model[field] > 0, f"model.{field}", f"must be positive, got {model[field]}")


def validate_objective(obj: ml_collections.ConfigDict):
    _check(obj.stage in (1, 2), "objective.stage", f"must be 1 or 2, got {obj.stage}")
    for term in LOSS_TERMS:
        _check(obj.weights[term] >= 0, f"objective.weights.{term}", f"must be >= 0, got {obj.weights[term]}")
    if obj.stage == 1:
        _check(obj.weights.contrastive > 0, "objective.weights.contrastive", "stage 1 trains the contrastive loss")
        _check(obj.temperature > 0, "objective.temperature", f"must be positive, got {obj.temperature}")
        from mmcmae_jax.losses import NEGATIVES
        _check(obj.negatives in NEGATIVES, "objective.negatives", f"{obj.negatives!r} is not one of {NEGATIVES}")
        _check(0.0 <= obj.stage1_mask_ratio < 1.0, "objective.stage1_mask_ratio", f"{obj.stage1_mask_ratio} not in [0, 1)")
        # A masked frame keeps its own patches in its slots, so slot i is not position i across frames.
        _check(obj.negatives != "position" or obj.stage1_mask_ratio == 0, "objective.negatives",
               "'position' groups the same patch position of every frame; it needs objective.stage1_mask_ratio=0")
        _check(0.0 <= obj.contrastive_min_valid_fraction < 1.0, "objective.contrastive_min_valid_fraction",
               f"{obj.contrastive_min_valid_fraction} not in [0, 1)")
        return
    inputs, targets = tuple(obj.inputs), tuple(obj.targets)
    _check(len(inputs) > 0 and set(inputs) <= set(MODALITIES), "objective.inputs", f"{inputs} must be a subset of {MODALITIES}")
    _check(len(targets) > 0 and set(targets) <= set(MODALITIES), "objective.targets", f"{targets} must be a subset of {MODALITIES}")
    for m in inputs:
        _check(0.0 <= obj.mask_ratio[m] < 1.0, f"objective.mask_ratio.{m}", f"{obj.mask_ratio[m]} not in [0, 1)")
    for m in targets:
        _check(obj.weights[m] > 0, f"objective.weights.{m}", f"target {m!r} is reconstructed, so its weight must be > 0")
    _check(obj.mask_mode in ("independent", "shared", "dirichlet"), "objective.mask_mode", f"{obj.mask_mode!r} unknown")
    no_noise = "objective.depth_noise=False, objective.sigma_embedding=False, objective.weights.denoise=0"
    noised = [m for m in inputs if m in NOISED]
    if obj.depth_noise:
        _check(bool(noised), "objective.depth_noise",
               f"noise is added to the {'/'.join(NOISED)} input, but {'/'.join(NOISED)} is not among the inputs "
               f"{inputs}; set {no_noise}")
        _check(obj.sigma_max > 0, "objective.sigma_max", f"must be positive, got {obj.sigma_max}")
        _check(obj.sigma_distribution in ("uniform", "lognormal"), "objective.sigma_distribution",
               f"{obj.sigma_distribution!r} is not 'uniform' or 'lognormal'")
    _check(obj.depth_noise or not obj.sigma_embedding, "objective.sigma_embedding",
           "embeds the depth noise level, but objective.depth_noise=False adds no noise; set both, or neither")
    if obj.weights.denoise > 0:
        _check(obj.depth_noise, "objective.weights.denoise",
               "the denoising loss predicts the noise on the depth input: it needs objective.depth_noise=True")
        _check(all(m in targets for m in noised), "objective.weights.denoise",
               f"the {'/'.join(noised)} head predicts the noise, but {'/'.join(noised)} is not among the targets "
               f"{targets}; set {no_noise}")
    _check(obj.distill_beta > 0, "objective.distill_beta", f"must be positive, got {obj.distill_beta}")
    _check(obj.distill_teacher_input in ("full", "visible"), "objective.distill_teacher_input",
           f"{obj.distill_teacher_input!r} is not 'full' or 'visible'")
    _check(obj.dirichlet_alpha > 0, "objective.dirichlet_alpha", f"must be positive, got {obj.dirichlet_alpha}")


def validate(config: ml_collections.ConfigDict):
    """Raise ValueError naming the first bad field of a pre-training config."""
    validate_model(config.model)
    validate_objective(config.objective)


def trainer_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add to `config` the fields the trainer reads, with their defaults: optimiser, data, loop,
    checkpoints, mesh, where the encoders start. Pre-training and fine-tuning configs both start here."""
    from mmcmae_jax.data import default_data_config
    from mmcmae_jax.train.optim import optim_config
    config.optim = optim_config()
    config.data = default_data_config()
    config.batch_size = 256           # global, over all processes and devices
    config.total_steps = 10_000
    config.seed = 0
    config.log_every = 20
    config.image_every = 1000         # picture summaries (stage 2); 0 disables them
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.async_checkpoint = True
    config.mesh = ml_collections.ConfigDict(dict(fsdp=1))  # > 1 shards parameters and optimizer state
    config.init_from = ""             # a work directory to start from (stage 2: the stage-1 run)
    config.init_from_mae = ""         # an ImageNet MAE checkpoint to start the encoders from
    config.init_from_mae_drop_learned_pos_embed = False  # see validate_init_from_mae
    return config


def validate_trainer_fields(config: ml_collections.ConfigDict, data_fields=("data",)):
    """Raise ConfigError naming the first bad field of those trainer_fields adds (`data_fields`: every
    data config the run reads)."""
    for field in ("batch_size", "total_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        _check(int(config[field]) == config[field] and config[field] > 0, field, f"must be a positive integer, got {config[field]!r}")
    _check(config.image_every >= 0, "image_every", f"must be >= 0, got {config.image_every}")
    _check(config.mesh.fsdp >= 1, "mesh.fsdp", f"must be >= 1, got {config.mesh.fsdp}")
    validate_init_from_mae(config)
    from mmcmae_jax.train.optim import make_optimizer
    try:
        make_optimizer(config.optim, config.total_steps, config.batch_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    from mmcmae_jax.data import validate_data_config
    for field in data_fields:
        try:
            validate_data_config(config[field])
        except ValueError as err:
            raise ConfigError(f"config.{field}: {err}") from None


def training_config(stage: int) -> ml_collections.ConfigDict:
    """A complete single-stage pre-training config: model, objective, optimiser, data and loop."""
    return trainer_fields(pretrain_config(stage))


def validate_init_from_mae(config: ml_collections.ConfigDict):
    """init_from_mae_drop_learned_pos_embed: a checkpoint with a learned position table (a supervised timm
    ViT) cannot start a sin-cos encoder as it is: the table would be thrown away. That is refused unless
    this field is True, which drops the table on purpose; model.pos_embed="learned" keeps it instead."""
    drop = config.init_from_mae_drop_learned_pos_embed
    field = "init_from_mae_drop_learned_pos_embed"
    _check(isinstance(drop, bool), field, f"must be True or False, got {drop!r}")
    if drop:
        _check(bool(config.init_from_mae), field, "drops the position table of the init_from_mae checkpoint, "
               "but init_from_mae is empty")
        _check(config.model.pos_embed == "sincos", field, "drops the checkpoint's table for the encoder's "
               "sin-cos one, but model.pos_embed='learned' keeps the table: set one of the two")


def validate_training(config: ml_collections.ConfigDict):
    """Raise ValueError naming the first bad field of a training config."""
    validate(config)
    validate_trainer_fields(config)

# ViT presets for the paper-scale configs: (variant, global batch, steps).
PRESETS = {
    "vit_s16": ("S/16", 256, 100_000),
    "vit_b16": ("B/16", 256, 100_000),
    "vit_l16": ("L/16", 256, 100_000),
}

# The baselines and ablations, as changes to the stage-2 objective (see objective_config). The paper's
# ablation rows: contrastive only = stage 1 alone (configs/m3_contrastive_only.py); + reconstruction =
# m3_recon_only; + distill = m3_no_denoise; + denoise = m3_no_distill; all = m3 ("all" scores above
# "+ denoise", so the rows are not cumulative). The m3_* objectives start from stage 1 (config.init_from,
# required where they distil); the baselines from random weights or ImageNet MAE.
_CLEAN_DEPTH = dict(depth_noise=False, sigma_embedding=False)
OBJECTIVES = {
    "m3": {},
    "m3_no_denoise": dict(**_CLEAN_DEPTH, weights=dict(denoise=0.0)),
    "m3_no_distill": dict(weights=dict(distill=0.0)),
    "m3_recon_only": dict(**_CLEAN_DEPTH, weights=dict(denoise=0.0, distill=0.0)),
    # Noise on the depth input and sigma embedded, without the loss that predicts the noise: separates
    # noise as input corruption from denoising as a task.
    "m3_noise_only": dict(weights=dict(denoise=0.0)),
    "mae": dict(inputs=("rgb",), targets=("rgb",), **_CLEAN_DEPTH, weights=dict(denoise=0.0, distill=0.0)),
    "mae_norm_pix": dict(inputs=("rgb",), targets=("rgb",), norm_pix_targets=True, **_CLEAN_DEPTH,
                         weights=dict(denoise=0.0, distill=0.0)),
    "multimae": dict(inputs=("rgb", "depth"), targets=("rgb", "depth"), **_CLEAN_DEPTH,
                     weights=dict(denoise=0.0, distill=0.0)),
    "multimae_norm_pix": dict(inputs=("rgb", "depth"), targets=("rgb", "depth"), norm_pix_targets=True,
                              **_CLEAN_DEPTH, weights=dict(denoise=0.0, distill=0.0)),
    "mask3d": dict(inputs=("rgb", "depth"), targets=("depth",), **_CLEAN_DEPTH, weights=dict(denoise=0.0, distill=0.0)),
}


def paper_scale_config(stage: int, preset: str = "vit_b16", objective: str = "m3") -> ml_collections.ConfigDict:
    """A paper-scale config at 224 px for one stage; `objective` names a stage-2 baseline or ablation."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    variant, batch, steps = PRESETS[preset]
    config = training_config(stage)
    config.model.variant = variant
    config.batch_size, config.total_steps = batch, steps
    config.optim.warmup_steps = steps // 20
    config.data.require_path = True  # paper scale means real data: no silent procedural rooms
    change = dict(OBJECTIVES[objective])
    config.objective.weights.update(change.pop("weights", {}))
    config.objective.update(change)
    return config


def two_stage_config(stage1: ml_collections.ConfigDict, stage2: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Stage 1 then stage 2: the pre-training command runs them in WORKDIR/stage1 and WORKDIR/stage2."""
    return ml_collections.ConfigDict(dict(stages=("stage1", "stage2"), stage1=stage1, stage2=stage2))


def validate_pretraining(config: ml_collections.ConfigDict):
    """Raise ConfigError naming the first bad field of a one-stage training config, or of any stage of a
    two-stage one (as config.stage2.FIELD), so that no stage starts before every stage is checked."""
    if "stages" not in config:
        validate_training(config)
        return
    for name in config.stages:
        try:
            validate_training(config[name])
        except ValueError as err:
            raise ConfigError(str(err).replace("config.", f"config.{name}.", 1)) from None
