"""What the tests share: the tiny model and its configs, random frames, and the `slow` marker.

    python -m pytest -q -n 2 -m "not slow" tests   # the README's test command (CI), under 10 min on 2 cores
    python -m pytest -q -n 2 -m slow tests         # the end-to-end runs (14 min): commands, notebook, processes

Helpers are plain functions (`from conftest import tiny_config`): tests/ is on sys.path while pytest
collects it, and the scripts the tests start (tiny_train.py) import them the same way.
"""
import numpy as np

# The model every test trains: ViT dim 64, 2 layers, 2 heads, 8 px patches, at 32 px (16 patches).
TINY_MODEL = dict(variant="64x2x2/8", image_size=32, proj_hidden=64, proj_dim=32,
                  decoder_depth=1, decoder_width=32, decoder_heads=2)


def tiny_config(stage=1, objective="m3", **objective_fields):
    """training_config(stage) on the tiny model; stage 2 with the changes of config.OBJECTIVES[objective],
    then `objective_fields` (`weights=dict(...)` updates the loss weights)."""
    from mmcmae_jax.config import OBJECTIVES, training_config
    config = training_config(stage)
    config.model.update(TINY_MODEL)
    for change in (OBJECTIVES[objective] if stage == 2 else {}, objective_fields):
        change = dict(change)
        config.objective.weights.update(change.pop("weights", {}))
        config.objective.update(change)
    return config


def tiny_trainer_config(stage=1, **fields):
    """tiny_config(stage) for the trainer on in-memory batches of 4: no pictures, synchronous saves,
    six steps, each logged, a checkpoint every two; `fields` change the trainer's fields."""
    config = tiny_config(stage)
    config.update(batch_size=4, total_steps=6, log_every=1, checkpoint_every=2, image_every=0,
                  async_checkpoint=False)
    config.update(fields)
    config.data.path = "in-memory"
    return config


def random_frames(batch=2, size=32, seed=0, valid_fraction=0.8) -> dict:
    """Frames of Gaussian noise: rgb, depth and a depth_valid mask with about `valid_fraction` ones."""
    rng = np.random.default_rng(seed)
    return dict(rgb=rng.normal(size=(batch, size, size, 3)).astype(np.float32),
                depth=rng.normal(size=(batch, size, size, 1)).astype(np.float32),
                depth_valid=(rng.random((batch, size, size, 1)) > 1 - valid_fraction).astype(np.float32))


def tiny_batch(seed=0, batch=2, size=32) -> dict:
    """random_frames as JAX arrays."""
    import jax.numpy as jnp
    return {k: jnp.asarray(v) for k, v in random_frames(batch, size, seed).items()}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run (a command, the notebook, several processes); "
                                       "deselected by the README's test command, run with -m slow")
