"""NYU Depth V2 semantic segmentation, 40 classes (Gupta et al.'s nyu40): RGB in, DPT head.

Records (docs/datasets.md): the standard split's frames with nyu40 labels, train and test as separate
record sets, e.g. `python -m mmcmae_jax.data.convert nyu-mat --mat nyu_depth_v2_labeled.mat --split train
--label-map classMapping40.mat --out NYU_TRAIN` (and `--split test` to NYU_TEST) or, from exported
folders, `convert folder ... --label 'label40/*.png' --label-set nyu40 --labels-one-based`. Labels are
0..39, 255 = unlabelled.
Run:
    python -m mmcmae_jax.finetune --config configs/finetune_nyu_seg.py:vit_b16 --workdir W/nyu_seg \
        --config.init_from=W/m3/stage2 --config.data.path=NYU_TRAIN --config.eval_data.path=NYU_TEST
    python -m mmcmae_jax.evaluate --config configs/finetune_nyu_seg.py:vit_b16 --workdir W/nyu_seg \
        --config.eval_data.path=NYU_TEST
Presets (comma-separated): vit_s16 | vit_b16 | vit_l16, fracNN (NN % of the labelled training frames),
linear, frozen.
Expected time: 20,000 steps of batch 16 at 256 px, ViT-B; not yet measured by this project.
Expected result: not reported by the paper for NYU segmentation; not run at scale here.
"""
from mmcmae_jax.transfer.config import NYU40_CLASSES, apply_presets, finetune_config


def get_config(preset="vit_b16"):
    config = finetune_config("segmentation", num_classes=40)
    config.class_names = NYU40_CLASSES
    config.model.image_size = 256
    config.batch_size = 16
    config.total_steps = 20_000
    config.optim.update(lr=1e-4, warmup_steps=1000, weight_decay=0.05)
    config.layer_decay = 0.75
    config.checkpoint_every = 2000
    config.data.update(crop_scale=(0.5, 1.0))
    config.data.require_path = config.eval_data.require_path = True  # real data: never the procedural rooms
    return apply_presets(config, preset or "vit_b16")
