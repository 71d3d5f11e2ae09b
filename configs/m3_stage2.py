"""M3 stage 2: masked depth reconstruction + denoising + distillation of stage 1, at paper scale.

Run (presets vit_s16, vit_b16 (default), vit_l16):
    python -m mmcmae_jax.pretrain --config configs/m3_stage2.py:vit_b16 --workdir WORKDIR/stage2 \
        --config.data.path=/data/scannet_records --config.init_from=WORKDIR/stage1
Expected time: 100k steps; not yet measured on an accelerator by this project (with 80% of patches
masked the encoders see 20% of the tokens).
Expected result: an RGB encoder that the paper fine-tunes to 67.5 mIoU on ScanNet (ViT-B, ImageNet+ScanNet).
"""
from mmcmae_jax.config import paper_scale_config


def get_config(preset="vit_b16"):
    return paper_scale_config(2, preset or "vit_b16")
