"""NYU Depth V2 monocular depth: the RGB encoder of M3 (or a baseline) with a DPT head, RGB in, metres out.

Records (docs/data.md): the labelled NYU frames, train and test written to separate record sets
(e.g. exported to folders and converted with `python -m mmcmae_jax.data.convert folder ...
--depth-scale 0.001 --source nyu_depth_v2`, once for the train frames, once for the test frames).
Run:
    python -m mmcmae_jax.finetune --config configs/finetune_nyu_depth.py:vit_b16 --workdir W/nyu_depth \
        --config.init_from=W/m3/stage2 --config.data.path=NYU_TRAIN --config.eval_data.path=NYU_TEST
Evaluation (also run at the end of fine-tuning): δ1-3, AbsRel, SqRel, RMSE, RMSE-log, log10 in metres
over 1 mm < d < 10 m inside the Eigen crop, per image then averaged (docs/transfer.md):
    python -m mmcmae_jax.evaluate --config configs/finetune_nyu_depth.py:vit_b16 --workdir W/nyu_depth \
        --config.eval_data.path=NYU_TEST
Presets (comma-separated): vit_s16 | vit_b16 | vit_l16, fracNN (NN % of the training frames), linear
(frozen encoder, linear head), frozen (frozen encoder, DPT head).
Expected time: 20,000 steps of batch 32 at 256 px, ViT-B; not yet measured by this project.
Expected result: the paper reports δ1 87.1 for M3 and 85.1 for MAE (ViT-B); this config
has not been run at that scale in this repository.
"""
from mmcmae_jax.transfer.config import apply_presets, finetune_config


def get_config(preset="vit_b16"):
    config = finetune_config("depth")
    config.model.image_size = 256
    config.head.features = 256
    config.loss.update(depth="silog", max_depth=10.0)
    config.batch_size = 32
    config.total_steps = 20_000
    config.optim.update(lr=1e-4, warmup_steps=1000, weight_decay=0.05)
    config.layer_decay = 0.75
    config.checkpoint_every = 2000
    config.data.update(crop_scale=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3))
    config.eval.update(min_depth=1e-3, max_depth=10.0, nyu_crop=True, average="image")
    config.data.require_path = config.eval_data.require_path = True  # real data: never the procedural rooms
    return apply_presets(config, preset or "vit_b16")
