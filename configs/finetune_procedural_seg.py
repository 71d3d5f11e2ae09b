"""Fine-tune for semantic segmentation (9 classes) of procedural rooms: RGB in, on a CPU in minutes.

Run, from scratch or from the demo's pre-training (`python -m mmcmae_jax.pretrain --config configs/demo.py
--workdir /tmp/m3_demo`; same encoder, 128x4x4/8 at 64 px):
    python -m mmcmae_jax.finetune --config configs/finetune_procedural_seg.py --workdir /tmp/ft_proc_seg
    python -m mmcmae_jax.finetune --config configs/finetune_procedural_seg.py --workdir /tmp/ft_proc_seg_m3 \
        --config.init_from=/tmp/m3_demo/stage2
Training frames: the demo's 2,000 rooms (/tmp/mmcmae_jax_procedural_demo, written once); evaluation:
200 other rooms (seed 1, /tmp/mmcmae_jax_procedural_eval). Presets (comma-separated): smoke (a few
steps, tiny sets, for tests), fracNN (NN % of the training frames), linear, frozen.
Expected time and result: docs/transfer.md ("Measured"), with the commands above.
"""
from mmcmae_jax.data import PROCEDURAL_CLASS_NAMES
from mmcmae_jax.transfer.config import apply_presets, finetune_config


def get_config(preset=""):
    config = finetune_config("segmentation", num_classes=len(PROCEDURAL_CLASS_NAMES))
    config.class_names = tuple(PROCEDURAL_CLASS_NAMES)
    config.model.update(variant="128x4x4/8", image_size=64)
    config.head.features = 64
    config.batch_size = 32
    config.total_steps = 300
    config.optim.update(lr=1e-3, warmup_steps=30)
    config.log_every = 10
    config.checkpoint_every = 100
    config.data.update(procedural_dir="/tmp/mmcmae_jax_procedural_demo", procedural_frames=2000,
                       procedural_size=64, procedural_shards=4)
    config.eval_data.update(procedural_dir="/tmp/mmcmae_jax_procedural_eval", procedural_frames=200,
                            procedural_size=64, procedural_shards=1)
    presets = [p for p in preset.split(",") if p]
    if "smoke" in presets:
        presets.remove("smoke")
        config.model.variant = "64x2x2/8"
        config.head.features = 32
        config.update(batch_size=8, total_steps=4, log_every=1, checkpoint_every=2)
        config.optim.warmup_steps = 1
        config.data.update(procedural_dir="/tmp/mmcmae_jax_procedural_smoke", procedural_frames=64)
        config.eval_data.update(procedural_dir="/tmp/mmcmae_jax_procedural_smoke_eval", procedural_frames=12)
        config.eval.batch_size = 8
    return apply_presets(config, ",".join(presets))
