"""M3 stage 1, cross-modal patch contrastive learning, at paper scale (224 px, 100k steps, batch 256).

Run (presets vit_s16, vit_b16 (default), vit_l16):
    python -m mmcmae_jax.pretrain --config configs/m3_stage1.py:vit_b16 --workdir WORKDIR/stage1 \
        --config.data.path=/data/scannet_records
Expected time: 100k steps; not yet measured on an accelerator by this project.
The contrastive loss starts near log(256 x 196) = 10.8 with batch negatives.
Expected result: the encoders of WORKDIR/stage1, to be read by m3_stage2.py (--config.init_from).
"""
from mmcmae_jax.config import paper_scale_config


def get_config(preset="vit_b16"):
    return paper_scale_config(1, preset or "vit_b16")
