"""SUN RGB-D semantic segmentation, 37 classes: RGB in, DPT head.

Records (docs/data.md): SUN RGB-D's 37-class label maps (1..37, 0 = unlabelled) next to its colour and
depth images, converted with `python -m mmcmae_jax.data.convert folder --root R --rgb 'image/*.jpg'
--depth 'depth/*.png' --depth-scale 0.001 --depth-encoding sunrgbd --label 'label37/*.png'
--label-set sunrgbd37 --labels-one-based --source sunrgbd --out SUN_TRAIN` (and the test split to SUN_TEST).
Run:
    python -m mmcmae_jax.finetune --config configs/finetune_sunrgbd_seg.py:vit_b16 --workdir W/sun_seg \
        --config.init_from=W/m3/stage2 --config.data.path=SUN_TRAIN --config.eval_data.path=SUN_TEST
    python -m mmcmae_jax.evaluate --config configs/finetune_sunrgbd_seg.py:vit_b16 --workdir W/sun_seg \
        --config.eval_data.path=SUN_TEST
Presets (comma-separated): vit_s16 | vit_b16 | vit_l16, fracNN, linear, frozen.
Expected time: 40,000 steps of batch 32 at 224 px, ViT-B; not yet measured by this project.
Expected result: not reported by the paper; not run at scale here.
"""
from mmcmae_jax.transfer.config import SUNRGBD37_CLASSES, apply_presets, finetune_config


def get_config(preset="vit_b16"):
    config = finetune_config("segmentation", num_classes=37)
    config.class_names = SUNRGBD37_CLASSES
    config.model.image_size = 224
    config.batch_size = 32
    config.total_steps = 40_000
    config.optim.update(lr=1e-4, warmup_steps=2000, weight_decay=0.05)
    config.layer_decay = 0.75
    config.checkpoint_every = 2000
    config.data.update(crop_scale=(0.5, 1.0))
    config.data.require_path = config.eval_data.require_path = True  # real data: never the procedural rooms
    return apply_presets(config, preset or "vit_b16")
