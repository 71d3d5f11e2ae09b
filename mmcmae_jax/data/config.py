"""The input options as one ml_collections ConfigDict (every default written here, once), their
validation, and the one call from a config to a pipeline.

The batch size, image size and seed are not data options: the run owns them (its global batch over the
processes, its model's image size, its seed) and passes them to `pipeline_from_config`."""

from __future__ import annotations

import ml_collections

from mmcmae_jax.data import pipeline, procedural, records
from mmcmae_jax.progress import say


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults of every input option (docs/data.md explains each)."""
    c = ml_collections.ConfigDict()
    c.path = ""  # files, glob, comma list or directory; "" = the procedural demo set
    # True for configs meant for real data (paper scale, NYU, SUN RGB-D, ScanNet): an empty path is then
    # an error, not a silent switch to the procedural rooms.
    c.require_path = False
    c.format = "auto"  # "auto" | "array_record" | "tfrecord"
    c.crop_scale = (0.2, 1.0)  # random resized crop, area fraction
    c.crop_ratio = (3 / 4, 4 / 3)  # random resized crop, aspect ratio
    c.hflip_prob = 0.5
    c.brightness = 0.4
    c.contrast = 0.4
    c.saturation = 0.2
    c.depth_trim = 0.1  # fraction trimmed from each tail for depth standardisation
    c.skip_bad_records = False
    c.shuffle_buffer = 1024  # TFRecord window shuffle
    c.cycle_length = 4  # TFRecord shards read at once
    c.worker_count = 0
    c.read_threads = 4
    c.num_epochs = ml_collections.config_dict.placeholder(int)  # None: forever when training
    # The procedural demo set, written to procedural_dir when path is "".
    c.procedural_dir = "/tmp/mmcmae_jax_procedural"
    c.procedural_frames = 10000
    c.procedural_size = 128
    c.procedural_shards = 8
    c.procedural_seed = 0  # frame i of the set depends only on (seed, i, size, style)
    c.procedural_depth_noise = True
    # "rooms" (eye-level views of furnished rooms) or "varied" (any camera pose, random colours and
    # textures on every surface, cluttered: depth and classes must be read from the image).
    c.procedural_style = "rooms"
    return c


def data_options(**changes) -> ml_collections.ConfigDict:
    """The default options with `changes`, validated: the `options` of pipeline.make_pipeline."""
    c = default_data_config()
    c.update(changes)
    validate_data_config(c)
    return c


def _check(ok: bool, field: str, value, want: str):
    if not ok:
        raise ValueError(f"data config field {field!r} = {value!r}: {want}")


def validate_data_config(c) -> None:
    """Raise ValueError naming the first bad field."""
    _check(
        c.format in ("auto",) + records.FORMATS,
        "format",
        c.format,
        f"must be auto or one of {records.FORMATS}",
    )
    lo, hi = c.crop_scale
    _check(0 < lo <= hi <= 1, "crop_scale", c.crop_scale, "must be (lo, hi) with 0 < lo <= hi <= 1")
    _check(
        0 < c.crop_ratio[0] <= c.crop_ratio[1],
        "crop_ratio",
        c.crop_ratio,
        "must be (lo, hi) with 0 < lo <= hi",
    )
    _check(0 <= c.hflip_prob <= 1, "hflip_prob", c.hflip_prob, "must be in [0, 1]")
    for name in ("brightness", "contrast", "saturation"):
        _check(0 <= c[name] < 1, name, c[name], "must be in [0, 1)")
    _check(0 <= c.depth_trim < 0.5, "depth_trim", c.depth_trim, "must be in [0, 0.5)")
    _check(c.shuffle_buffer >= 0, "shuffle_buffer", c.shuffle_buffer, "must be >= 0")
    _check(c.cycle_length >= 1, "cycle_length", c.cycle_length, "must be >= 1")
    _check(c.worker_count >= 0, "worker_count", c.worker_count, "must be >= 0")
    _check(c.read_threads >= 1, "read_threads", c.read_threads, "must be >= 1")
    _check(c.num_epochs is None or c.num_epochs >= 1, "num_epochs", c.num_epochs, "must be None or >= 1")
    _check(isinstance(c.skip_bad_records, bool), "skip_bad_records", c.skip_bad_records, "must be a bool")
    _check(isinstance(c.require_path, bool), "require_path", c.require_path, "must be a bool")
    _check(isinstance(c.procedural_seed, int) and c.procedural_seed >= 0, "procedural_seed", c.procedural_seed,
           "must be an int >= 0")
    _check(
        c.procedural_style in procedural.STYLES,
        "procedural_style",
        c.procedural_style,
        f"must be one of {procedural.STYLES}",
    )


def pipeline_from_config(
    c, *, batch_size: int, image_size: int, seed: int, train: bool, shard_index: int | None = None,
    shard_count: int | None = None, skip_log=None, name: str = "config.data", labels: bool = True,
):
    """Validate `c` (the config section `name`) and build the pipeline of batches of `batch_size` frames
    at `image_size` (augmentation seeded by `seed`); an empty path makes (once) and reads the procedural
    set. labels=False: no label decoded or sent."""
    validate_data_config(c)
    return pipeline.make_pipeline(
        records_path(c, name), c, batch_size=batch_size, image_size=image_size, seed=seed, train=train,
        shard_index=shard_index, shard_count=shard_count, skip_log=skip_log, labels=labels,
    )


def records_path(c, name: str = "config.data") -> str:
    """c.path, or, when it is empty, the procedural set (written once, announced); with c.require_path an
    empty path is an error naming `name`.path."""
    if c.path:
        return c.path
    check_path_given(c, name)
    say("data", f"{name}.path is empty: reading the procedural rooms ({c.procedural_frames} frames at "
                f"{c.procedural_size} px, style {c.procedural_style}, in {c.procedural_dir})")
    return procedural.ensure_procedural_dataset(
        c.procedural_dir,
        c.procedural_frames,
        c.procedural_size,
        c.procedural_seed,
        c.procedural_shards,
        records.ARRAY_RECORD,
        c.procedural_depth_noise,
        style=c.procedural_style,
    )


def check_path_given(c, name: str = "config.data") -> None:
    """Raise ConfigError when c.require_path and c.path is empty (run it at start, before training)."""
    if c.require_path and not c.path:
        from mmcmae_jax.errors import ConfigError
        raise ConfigError(f"{name}.path is empty: this config is meant for real data; pass "
                          f"--{name}.path=RECORDS (files, a glob or a directory of converted records, "
                          f"docs/data.md)")
