"""The demo: M3 stage 1 then stage 2 on procedural RGB-D rooms, on a CPU in minutes.

Run (the README's main job):
    python -m mmcmae_jax.pretrain --config configs/demo.py --workdir /tmp/m3_demo
It writes 2,000 procedural frames at 64 px to /tmp/mmcmae_jax_procedural_demo (once), trains stage 1
(patch contrastive) in /tmp/m3_demo/stage1, then stage 2 (masked depth + denoising + distillation of
stage 1) in /tmp/m3_demo/stage2: checkpoints, metrics.jsonl, TensorBoard events, and picture grids in
stage2/images/. Re-running resumes or, when finished, returns at once.
Preset "smoke" runs a few steps of each stage on a tiny model (used by the tests).
Expected time and result: see README ("The demo"), measured with the command above.
"""
from mmcmae_jax.config import training_config, two_stage_config


def stage(number: int, steps: int, smoke: bool):
    config = training_config(number)
    config.model.update(variant="128x4x4/8", image_size=64, proj_hidden=256, proj_dim=64,
                        decoder_depth=2, decoder_width=128, decoder_heads=4)
    config.batch_size = 32
    config.total_steps = steps
    config.optim.update(lr=1e-3, warmup_steps=max(steps // 10, 1))
    config.log_every = 10
    config.image_every = max(steps // 4, 1)
    config.checkpoint_every = max(steps // 4, 1)
    config.data.update(procedural_dir="/tmp/mmcmae_jax_procedural_demo", procedural_frames=2000,
                       procedural_size=64, procedural_shards=4, crop_scale=(0.5, 1.0))
    if smoke:  # the tests' tiny model: every code path of the demo, compiled in seconds
        config.model.update(variant="64x2x2/8", proj_hidden=64, proj_dim=32, decoder_depth=1, decoder_width=32,
                            decoder_heads=2)
        config.update(batch_size=8, log_every=1, image_every=2, checkpoint_every=2)
        config.data.update(procedural_dir="/tmp/mmcmae_jax_procedural_smoke", procedural_frames=64)
    return config


def get_config(preset=""):
    if preset not in ("", "smoke"):
        raise ValueError(f"configs/demo.py presets: '' (default) or 'smoke', got {preset!r}")
    smoke = preset == "smoke"
    return two_stage_config(stage(1, 4 if smoke else 300, smoke), stage(2, 4 if smoke else 300, smoke))
