"""MultiMAE-style baseline in MultiMAE's published setting: RGB and depth in, both reconstructed against
per-patch normalised targets (objective.norm_pix_targets=True; depth over its measured pixels only).

A stage-2 objective at paper scale; everything else as configs/m3_stage2.py.
Run (presets vit_s16, vit_b16 (default), vit_l16):
    python -m mmcmae_jax.pretrain --config configs/multimae_norm_pix.py:vit_b16 --workdir WORKDIR/multimae_norm_pix \
        --config.data.path=/data/scannet_records
Expected time: as m3_stage2.py.
Expected result (paper, ScanNet mIoU after fine-tuning): MultiMAE 65.1 (the paper does not say which target it used).
"""
from mmcmae_jax.config import paper_scale_config


def get_config(preset="vit_b16"):
    return paper_scale_config(2, preset or "vit_b16", objective="multimae_norm_pix")
