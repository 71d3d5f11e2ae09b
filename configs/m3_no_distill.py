"""M3 ablation without distillation: stage 2 initialised from stage 1, no distillation loss (the paper's
"+ denoise" row: contrastive + reconstruction + denoising).

A stage-2 objective at paper scale; everything else as configs/m3_stage2.py.
Run (presets vit_s16, vit_b16 (default), vit_l16):
    python -m mmcmae_jax.pretrain --config configs/m3_no_distill.py:vit_b16 --workdir WORKDIR/m3_no_distill \
        --config.data.path=/data/scannet_records --config.init_from=WORKDIR/stage1
Expected time: as m3_stage2.py.
Expected result (paper ablation, ScanNet mIoU after fine-tuning): contrastive only 63.4, + reconstruction
66.3, + distill 66.5, + denoise 67.0, all 67.5.
"""
from mmcmae_jax.config import paper_scale_config


def get_config(preset="vit_b16"):
    return paper_scale_config(2, preset or "vit_b16", objective="m3_no_distill")
