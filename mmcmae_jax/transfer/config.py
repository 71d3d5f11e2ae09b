"""Fine-tuning configuration: the pre-training model and trainer fields plus the task, head, losses,
encoder start, label fraction and evaluation. `configs/finetune_*.py` start from `finetune_config`.
"""
from __future__ import annotations

import ml_collections

from mmcmae_jax.config import _check, model_config, trainer_fields, validate_model, validate_trainer_fields

TASKS = ("depth", "segmentation")

NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes",
    "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard",
    "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture",
    "otherprop")
# The ScanNet benchmark's 20 classes, as 1-based nyu40 ids.
SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SCANNET20_CLASSES = tuple(NYU40_CLASSES[i - 1] for i in SCANNET20_NYU40_IDS)
# Records store nyu40 as 0..39: stored class (id - 1) -> its ScanNet-20 index, the others ignored.
SCANNET20_FROM_NYU40 = tuple(SCANNET20_NYU40_IDS.index(k + 1) if k + 1 in SCANNET20_NYU40_IDS else 255
                             for k in range(40))
# SUN RGB-D's 37 classes (the 37-class benchmark of Song et al., CVPR 2015).
SUNRGBD37_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes",
    "ceiling", "books", "fridge", "tv", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
    "night stand", "toilet", "sink", "lamp", "bathtub", "bag")

# Paper-scale encoder presets (variant); the model must match the checkpoint it starts from.
VIT_PRESETS = {"vit_s16": "S/16", "vit_b16": "B/16", "vit_l16": "L/16"}


def finetune_config(task: str, num_classes: int = 0) -> ml_collections.ConfigDict:
    """A complete fine-tuning config for `task` ("depth" or "segmentation" with `num_classes`)."""
    from mmcmae_jax.data import default_data_config
    config = trainer_fields(ml_collections.ConfigDict())
    config.task = task
    config.num_classes = num_classes            # segmentation: classes 0..C-1 (255 = ignore)
    config.class_names = ()                     # optional, for the per-class IoU table
    config.ignore_label = 255
    # Stored class k becomes label_remap[k] (ignore_label for "none"); () keeps the stored classes.
    # E.g. ScanNet stored as nyu40 -> its 20 benchmark classes (SCANNET20_FROM_NYU40).
    config.label_remap = ()
    config.model = model_config()               # only the encoder fields are used
    config.head = ml_collections.ConfigDict(dict(
        kind="dpt",          # "dpt" (dense, over 4 encoder blocks) or "linear" (probing)
        features=256,        # DPT fusion width
        reassemble_dims=(),  # () = (D/8, D/4, D/2, D)
        hooks=(),            # 1-based encoder blocks; () = the ends of the 4 quarters (3, 6, 9, 12 of 12)
    ))
    config.loss = ml_collections.ConfigDict(dict(
        depth="silog",       # "silog" or "berhu"
        silog_lambda=0.85,
        silog_scale=10.0,
        berhu_threshold=0.2,
        max_depth=10.0,      # training pixels beyond it are not counted (0 = no cap)
    ))
    # Where the RGB encoder starts (trainer fields): init_from, a stage-1/stage-2 (or fine-tuning) work
    # directory; init_from_mae, an ImageNet MAE checkpoint; or neither (from scratch). Not both.
    config.freeze_encoder = False              # train the head only; the encoder is a constant
    config.layer_decay = 0.75                  # BEiT layer-wise lr decay; 1.0 = none
    # Data-efficient study: train on this fraction of the (labelled) training frames, chosen by a hash
    # of (label_fraction_seed, frame id), so every smaller fraction is a subset of every larger one.
    config.label_fraction = 1.0
    config.label_fraction_seed = 0
    config.subset_dir = ""                     # where the chosen frames are written; "" = WORKDIR/train_subset

    config.optim.update(base_lr=5e-4, b2=0.999, weight_decay=0.05, warmup_steps=100)
    # config.data: the training frames
    config.data.update(crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2, saturation=0.2)
    config.eval_data = default_data_config()   # evaluation frames (central crop, one pass)
    config.eval_data.procedural_dir = "/tmp/mmcmae_jax_procedural_eval"
    config.eval_data.procedural_seed = 1       # procedural evaluation rooms differ from the training rooms
    config.eval = ml_collections.ConfigDict(dict(
        batch_size=16,
        min_depth=1e-3,
        max_depth=10.0,
        nyu_crop=False,      # the Eigen crop of the 480x640 NYU frame
        average="image",     # depth metrics per image then averaged ("image") or pooled ("pixel")
        at_end=True,         # the fine-tuning command evaluates its final parameters
    ))

    config.batch_size = 16
    # Evaluate on eval_data every N steps while training, into metrics.jsonl and TensorBoard (stage
    # `finetune_eval`); 0 = only the final parameters (eval.at_end).
    config.eval_every = 0
    config.image_every = 0
    config.keep_checkpoints = 2
    return config


def apply_presets(config: ml_collections.ConfigDict, presets: str) -> ml_collections.ConfigDict:
    """Comma-separated presets from `configs/FILE.py:PRESETS`: vit_s16 | vit_b16 | vit_l16 (encoder),
    fracNN (label fraction NN %), linear (linear head on a frozen encoder: probing), frozen (frozen
    encoder, DPT head)."""
    for preset in [p for p in presets.split(",") if p]:
        if preset in VIT_PRESETS:
            config.model.variant = VIT_PRESETS[preset]
        elif preset.startswith("frac") and preset[4:].isdigit() and 0 < int(preset[4:]) <= 100:
            config.label_fraction = int(preset[4:]) / 100
        elif preset == "linear":
            config.head.kind = "linear"
            config.freeze_encoder = True
        elif preset == "frozen":
            config.freeze_encoder = True
        else:
            raise ValueError(f"unknown preset {preset!r}: use {sorted(VIT_PRESETS)}, fracNN (1..100), linear, "
                             "frozen, comma-separated")
    return config


def validate_finetune(config: ml_collections.ConfigDict):
    """Raise ConfigError naming the first bad field of a fine-tuning config."""
    _check(config.task in TASKS, "task", f"{config.task!r} is not one of {TASKS}")
    validate_model(config.model)
    from mmcmae_jax.models.vit import parse_variant
    depth = parse_variant(config.model.variant).depth
    if config.task == "segmentation":
        _check(int(config.num_classes) == config.num_classes and config.num_classes >= 2, "num_classes",
               f"segmentation needs >= 2 classes, got {config.num_classes!r}")
        _check(not (0 <= config.ignore_label < config.num_classes), "ignore_label",
               f"{config.ignore_label} is one of the {config.num_classes} classes")
        _check(not config.class_names or len(config.class_names) == config.num_classes, "class_names",
               f"{len(config.class_names)} names for num_classes={config.num_classes}")
    remap = tuple(config.label_remap)
    _check(all(int(v) == v and (0 <= v < max(config.num_classes, 1) or v == config.ignore_label) for v in remap),
           "label_remap", f"entries must be classes 0..{config.num_classes - 1} or the ignore label {config.ignore_label}")
    _check(len(remap) <= 256, "label_remap", f"{len(remap)} entries; labels are stored as 0..255")
    _check(config.head.kind in ("dpt", "linear"), "head.kind", f"{config.head.kind!r} is not 'dpt' or 'linear'")
    _check(config.head.features > 0, "head.features", f"must be positive, got {config.head.features}")
    hooks = tuple(config.head.hooks)
    _check(not hooks or (len(hooks) == 4 and all(1 <= h <= depth for h in hooks)), "head.hooks",
           f"{hooks} must be empty or 4 block numbers in 1..{depth} (the encoder has {depth} blocks)")
    _check(not config.head.reassemble_dims or len(config.head.reassemble_dims) == 4, "head.reassemble_dims",
           f"{tuple(config.head.reassemble_dims)} must be empty or 4 widths")
    _check(config.loss.depth in ("silog", "berhu"), "loss.depth", f"{config.loss.depth!r} is not 'silog' or 'berhu'")
    _check(0 <= config.loss.silog_lambda <= 1, "loss.silog_lambda", f"{config.loss.silog_lambda} not in [0, 1]")
    _check(config.loss.silog_scale > 0, "loss.silog_scale", f"must be positive, got {config.loss.silog_scale}")
    _check(0 < config.loss.berhu_threshold <= 1, "loss.berhu_threshold", f"{config.loss.berhu_threshold} not in (0, 1]")
    _check(config.loss.max_depth >= 0, "loss.max_depth", f"must be >= 0, got {config.loss.max_depth}")
    _check(not (config.init_from and config.init_from_mae), "init_from",
           "set init_from (a pre-training work directory) or init_from_mae (MAE weights), not both")
    _check(0 < config.layer_decay <= 1, "layer_decay", f"{config.layer_decay} not in (0, 1]")
    _check(0 < config.label_fraction <= 1, "label_fraction", f"{config.label_fraction} not in (0, 1]")
    _check(config.eval.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {config.eval.batch_size}")
    _check(0 < config.eval.min_depth < config.eval.max_depth, "eval.min_depth",
           f"need 0 < min_depth < max_depth, got {config.eval.min_depth}, {config.eval.max_depth}")
    _check(config.eval.average in ("image", "pixel"), "eval.average", f"{config.eval.average!r} is not 'image' or 'pixel'")
    whole = isinstance(config.eval_every, int) and not isinstance(config.eval_every, bool)
    _check(whole and config.eval_every >= 0, "eval_every",
           f"must be a whole number of steps >= 0 (0: evaluate only at the end), got {config.eval_every!r}")
    validate_trainer_fields(config, ("data", "eval_data"))
