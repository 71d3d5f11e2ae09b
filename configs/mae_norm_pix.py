"""MAE baseline in its published setting: RGB in, RGB reconstructed against per-patch normalised pixels
(MAE's norm_pix_loss, objective.norm_pix_targets=True).

A stage-2 objective at paper scale; everything else as configs/m3_stage2.py.
Run (presets vit_s16, vit_b16 (default), vit_l16):
    python -m mmcmae_jax.pretrain --config configs/mae_norm_pix.py:vit_b16 --workdir WORKDIR/mae_norm_pix \
        --config.data.path=/data/scannet_records
Expected time: as m3_stage2.py.
Expected result (paper, ScanNet mIoU after fine-tuning): MAE 64.8 (the paper does not say which target it used).
"""
from mmcmae_jax.config import paper_scale_config


def get_config(preset="vit_b16"):
    return paper_scale_config(2, preset or "vit_b16", objective="mae_norm_pix")
