"""The grain pipeline: batch contract, exact resume, per-process sharding, config validation."""

import numpy as np
import pytest

from mmcmae_jax.data import augment, config, pipeline, procedural, records, schema

SIZE = 32


@pytest.fixture(scope="module")
def data_procedural_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("proc")
    return {
        fmt: procedural.write_procedural_dataset(
            str(root / fmt), 12, 40, seed=1, num_shards=3, format=fmt, depth_noise=True, num_workers=1
        )
        for fmt in records.FORMATS
    }


def _make(paths, *, batch_size=4, image_size=SIZE, train=True, seed=0, shard_index=0, shard_count=1,
          skip_log=None, labels=True, **options):
    return pipeline.make_pipeline(
        paths, config.data_options(**{"shuffle_buffer": 8, **options}), batch_size=batch_size,
        image_size=image_size, seed=seed, train=train, shard_index=shard_index, shard_count=shard_count,
        skip_log=skip_log, labels=labels)


@pytest.mark.parametrize("fmt", records.FORMATS)
def test_batch_contract(data_procedural_shards, fmt):
    batch = next(_make(data_procedural_shards[fmt]))
    assert set(batch) == {"rgb", "color_jitter", "depth_units", "depth_scale", "label"}
    assert batch["rgb"].shape == (4, SIZE, SIZE, 3) and batch["rgb"].dtype == np.uint8
    assert batch["color_jitter"].shape == (4, 2, 3) and batch["color_jitter"].dtype == np.float32
    assert batch["depth_units"].shape == (4, SIZE, SIZE) and batch["depth_units"].dtype == np.uint16
    np.testing.assert_allclose(batch["depth_scale"], 0.0002)  # the procedural records' units: 0.2 mm
    assert batch["label"].shape == (4, SIZE, SIZE) and batch["label"].dtype == np.uint8
    assert 0 < (batch["depth_units"] == 0).mean() < 0.5  # sensor-like holes, kept as 0
    assert set(np.unique(batch["label"])) <= set(range(len(procedural.CLASS_NAMES)))
    order, factors = batch["color_jitter"][:, 0], batch["color_jitter"][:, 1]
    assert all(sorted(row) == [0, 1, 2] for row in order.tolist())
    assert np.all(np.abs(factors - 1) <= 0.4 + 1e-6) and np.any(factors != 1)
    without = next(_make(data_procedural_shards[fmt], labels=False))  # pre-training: no labels decoded
    assert "label" not in without
    np.testing.assert_array_equal(without["depth_units"], batch["depth_units"])


def test_eval_frames_are_not_jittered(data_procedural_shards):
    batch = next(_make(data_procedural_shards["tfrecord"], train=False))
    np.testing.assert_array_equal(batch["color_jitter"], np.tile([[0, 1, 2], [1, 1, 1]], (4, 1, 1)))


@pytest.mark.parametrize("fmt", records.FORMATS)
def test_resume_sees_the_same_batches(data_procedural_shards, fmt):
    paths = data_procedural_shards[fmt]
    straight = _make(paths)
    for _ in range(2):
        next(straight)
    state = straight.get_state()
    expected = [next(straight) for _ in range(5)]  # crosses an epoch boundary (12 frames)
    resumed = _make(paths)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_epochs_reshuffle_and_augment_differently(data_procedural_shards):
    it = _make(data_procedural_shards["array_record"], batch_size=12)
    first, second = next(it), next(it)
    assert not np.array_equal(first["rgb"], second["rgb"])


def test_eval_is_deterministic_and_finite(data_procedural_shards):
    paths = data_procedural_shards["tfrecord"]
    a = list(_make(paths, train=False))
    b = list(_make(paths, train=False))
    assert len(a) == 3  # one pass, 12 frames, batches of 4
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["depth_units"], y["depth_units"])


@pytest.mark.parametrize("fmt", records.FORMATS)
def test_processes_get_disjoint_parts(data_procedural_shards, fmt):
    paths = data_procedural_shards[fmt]
    parts = [list(_make(paths, train=False, batch_size=1, shard_index=i, shard_count=2)) for i in range(2)]
    sums = [{int(b["depth_units"].astype(np.int64).sum()) for b in part} for part in parts]
    assert len(parts[0]) + len(parts[1]) == 12 and len(parts[0]) >= 5 and len(parts[1]) >= 5
    assert not sums[0] & sums[1]


def test_geometry_keeps_modalities_aligned():
    # A frame whose left half is near/labelled 1 and right half far/labelled 2, with a hole column.
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[:, :10] = 255
    depth = np.where(np.arange(20)[None] < 10, 1000, 3000).repeat(20, 0).astype(np.uint16)  # mm
    depth[:, 15] = 0
    label = np.where(np.arange(20)[None] < 10, 1, 2).repeat(20, 0).astype(np.int32)
    frame = schema.DecodedFrame(rgb, depth, 0.001, label, "x")
    rgb_o, depth_o, label_o = augment.resize_frame(frame, (0, 0, 20, 20), 10, flip=True)
    valid_o = depth_o > 0
    assert set(np.unique(label_o)) == {1, 2}  # nearest neighbour: no invented classes
    np.testing.assert_array_equal(label_o[:, -1], 1)  # flipped: the left half is now on the right
    np.testing.assert_array_equal(depth_o[:, 7:], 1000)  # away from the edge, depth moved with labels
    assert depth_o[valid_o].min() >= 1000 and depth_o.max() <= 3000  # holes never pull depth to 0
    assert np.all(depth_o[valid_o] > 0) and not valid_o.all()  # the hole column survives, unblurred
    assert np.all(rgb_o[:, -1] == 255)


def test_config_validation_names_the_field():
    c = config.default_data_config()
    config.validate_data_config(c)
    for field, value in [("depth_trim", 0.7), ("procedural_seed", -1), ("format", "hdf5"), ("hflip_prob", 2.0)]:
        bad = config.default_data_config()
        bad[field] = value
        with pytest.raises(ValueError, match=field):
            config.validate_data_config(bad)


def test_pipeline_from_config_reads_records(data_procedural_shards):
    c = config.default_data_config()
    c.path = ",".join(data_procedural_shards["array_record"])
    batch = next(config.pipeline_from_config(c, batch_size=2, image_size=SIZE, seed=0, train=True,
                                             shard_index=0, shard_count=1))
    assert batch["rgb"].shape == (2, SIZE, SIZE, 3)


def test_grain_workers_give_the_same_batches(data_procedural_shards):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    for fmt in records.FORMATS:
        paths = data_procedural_shards[fmt]
        in_process = [next(it) for it in [_make(paths, train=False)] for _ in range(2)]
        with_worker = [next(it) for it in [_make(paths, train=False, worker_count=1)] for _ in range(2)]
        for a, b in zip(in_process, with_worker):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_orbax_checkpoints_the_iterator(data_procedural_shards, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    paths = data_procedural_shards["array_record"]
    it = _make(paths)
    next(it)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), options=ocp.CheckpointManagerOptions(create=True))
    manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = next(it)
    restored = _make(paths)
    manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    np.testing.assert_array_equal(next(restored)["rgb"], expected["rgb"])
