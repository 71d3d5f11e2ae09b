"""M3, both stages in one command: stage 1 in WORKDIR/stage1, then stage 2 in WORKDIR/stage2, which starts
from and distils stage 1.

Run (presets vit_s16, vit_b16 (default), vit_l16):
    python -m mmcmae_jax.pretrain --config configs/m3.py:vit_b16 --workdir WORKDIR \
        --config.stage1.data.path=/data/scannet_records --config.stage2.data.path=/data/scannet_records
Expected time: the sum of m3_stage1.py and m3_stage2.py.
"""
from mmcmae_jax.config import paper_scale_config, two_stage_config


def get_config(preset="vit_b16"):
    preset = preset or "vit_b16"
    return two_stage_config(paper_scale_config(1, preset), paper_scale_config(2, preset))
