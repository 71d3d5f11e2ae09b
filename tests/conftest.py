"""What the tests share: the tiny model and its configs, random frames, and the `slow` marker.

    python -m pytest -q -n 2 -m "not slow" tests   # the README's test command (CI), about 8 min on 2 cores
    python -m pytest -q -n 2 -m slow tests         # the end-to-end runs (14 min): commands, notebook, processes

Helpers are plain functions (`from conftest import tiny_config`): tests/ is on sys.path while pytest
collects it, and the scripts the tests start (tiny_train.py) import them the same way.
"""
import os
import shutil
import tempfile

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
    """Host batches as the pipeline sends them (device_batch.py) of random frames: uniform RGB, no colour
    jitter, depth 0.5-10 m in millimetres with about `valid_fraction` of the pixels measured."""
    rng = np.random.default_rng(seed)
    shape = (batch, size, size)
    return dict(rgb=rng.integers(0, 256, shape + (3,), np.uint8),
                color_jitter=np.tile(np.array([[0, 1, 2], [1, 1, 1]], np.float32), (batch, 1, 1)),
                depth_units=np.where(rng.random(shape) < valid_fraction, rng.integers(500, 10000, shape), 0)
                .astype(np.uint16),
                depth_scale=np.full((batch,), 0.001, np.float32))


def tiny_batch(seed=0, batch=2, size=32) -> dict:
    """Model inputs of Gaussian noise, as JAX arrays: rgb, depth and a depth_valid mask (80 % ones)."""
    import jax.numpy as jnp
    rng = np.random.default_rng(seed)
    return {"rgb": jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32),
            "depth": jnp.asarray(rng.normal(size=(batch, size, size, 1)), jnp.float32),
            "depth_valid": jnp.asarray(rng.random((batch, size, size, 1)) > 0.2, jnp.float32)}


def drawn_params(init, *args, scale=0.2, seed=0):
    """Parameters in the shapes `init(*args)` gives, drawn with NumPy: for tests of arithmetic that do not
    need the model's own initialisers (compiling those of a DPT head alone costs ~20 s of CPU)."""
    import jax
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.normal(size=s.shape) * scale).astype(s.dtype),
                        jax.eval_shape(init, *args))


_CACHE_MADE_HERE = []
_OUR_CACHE = "MMCMAE_JAX_TEST_CACHE"  # set beside a cache directory these hooks made (not the user's own)


def pytest_configure(config):
    # A persistent compilation cache for each test process, shared with the commands its tests start:
    # dozens of tests compile the same tiny train step. Each xdist worker makes its own (the one the
    # controller made is in the environment it inherits): JAX writes an entry in place, and a worker could
    # read one that the other is still writing.
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ or os.environ.get(_OUR_CACHE):
        _CACHE_MADE_HERE.append(tempfile.mkdtemp(prefix="mmcmae_jax_test_cache_"))
        os.environ.update({"JAX_COMPILATION_CACHE_DIR": _CACHE_MADE_HERE[0], _OUR_CACHE: "1"})
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    config.addinivalue_line("markers", "slow: an end-to-end run (a command, the notebook, several processes); "
                                       "deselected by the README's test command, run with -m slow")


def pytest_unconfigure(config):
    for directory in _CACHE_MADE_HERE:
        shutil.rmtree(directory, ignore_errors=True)
