"""ScanNet semantic segmentation, the benchmark's 20 classes: RGB in, DPT head (the paper's main task).

Records (docs/data.md): `python -m mmcmae_jax.data.convert scannet --root SCANS --label-map
scannetv2-labels.combined.tsv --label-column nyu40id --label-set nyu40 --out SCANNET_TRAIN` (and the
validation scenes to SCANNET_VAL). Records keep nyu40 (0..39); `label_remap` maps them to the 20
benchmark classes (SCANNET20_FROM_NYU40), the other nyu40 classes are ignored.
Run:
    python -m mmcmae_jax.finetune --config configs/finetune_scannet_seg.py:vit_b16 --workdir W/scannet_seg \
        --config.init_from=W/m3/stage2 --config.data.path=SCANNET_TRAIN --config.eval_data.path=SCANNET_VAL
    python -m mmcmae_jax.evaluate --config configs/finetune_scannet_seg.py:vit_b16 --workdir W/scannet_seg \
        --config.eval_data.path=SCANNET_VAL
Data-efficient study: presets frac10, frac20, frac40, frac60, frac80 (of the labelled training frames,
nested, chosen by frame id), e.g. `:vit_b16,frac10`. Other presets: vit_s16 | vit_l16, linear, frozen.
Expected time: 40,000 steps of batch 32 at 224 px, ViT-B; not yet measured by this project.
Expected result: the paper reports 67.5 mIoU for M3 (Mask3D 66.2, MultiMAE 65.1,
MAE 64.8) with ViT-B; this config has not been run at that scale in this repository.
"""
from mmcmae_jax.transfer.config import SCANNET20_CLASSES, SCANNET20_FROM_NYU40, apply_presets, finetune_config


def get_config(preset="vit_b16"):
    config = finetune_config("segmentation", num_classes=20)
    config.class_names = SCANNET20_CLASSES
    config.label_remap = SCANNET20_FROM_NYU40
    config.model.image_size = 224
    config.batch_size = 32
    config.total_steps = 40_000
    config.optim.update(lr=1e-4, warmup_steps=2000, weight_decay=0.05)
    config.layer_decay = 0.75
    config.checkpoint_every = 2000
    config.data.update(crop_scale=(0.5, 1.0))
    config.data.require_path = config.eval_data.require_path = True  # real data: never the procedural rooms
    return apply_presets(config, preset or "vit_b16")
