"""M3 study arm "noise without denoising": stage 2 after stage 1 with noise added to the depth input and
its level sigma embedded, but no loss on predicting the noise (masked depth reconstruction and
distillation as in M3). Against m3.py and m3_no_denoise.py it tells noise as input corruption apart
from denoising as a task.

A stage-2 objective at paper scale; everything else as configs/m3_stage2.py.
Run (presets vit_s16, vit_b16 (default), vit_l16):
    python -m mmcmae_jax.pretrain --config configs/m3_noise_only.py:vit_b16 --workdir WORKDIR/m3_noise_only \
        --config.data.path=/data/scannet_records --config.init_from=WORKDIR/stage1
Expected time: as m3_stage2.py.
Expected result: not in the paper (ScanNet mIoU there: + distill 66.5 without noise, all 67.5 with denoising).
"""
from mmcmae_jax.config import paper_scale_config


def get_config(preset="vit_b16"):
    return paper_scale_config(2, preset or "vit_b16", objective="m3_noise_only")
