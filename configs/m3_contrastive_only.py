"""M3 ablation "contrastive only": stage 1 alone; its RGB encoder is fine-tuned directly.

Run (presets vit_s16, vit_b16 (default), vit_l16):
    python -m mmcmae_jax.pretrain --config configs/m3_contrastive_only.py:vit_b16 --workdir WORKDIR/contrastive \
        --config.data.path=/data/scannet_records
Expected time: as m3_stage1.py. Expected result (paper ablation, ScanNet mIoU): 63.4.
"""
from mmcmae_jax.config import paper_scale_config


def get_config(preset="vit_b16"):
    return paper_scale_config(1, preset or "vit_b16")
