"""The procedural scene generator: determinism, exact depth, classes, noise, dataset writing."""

import numpy as np

from mmcmae_jax.data import procedural, records, schema


def test_frames_are_deterministic_and_differ_by_index():
    a, b = procedural.render_frame(3, 7, 32), procedural.render_frame(3, 7, 32)
    c = procedural.render_frame(3, 8, 32)
    np.testing.assert_array_equal(a["rgb"], b["rgb"])
    np.testing.assert_array_equal(a["depth_m"], b["depth_m"])
    assert not np.array_equal(a["rgb"], c["rgb"])


def test_depth_is_metric_and_consistent_with_the_room():
    for i in range(5):
        f = procedural.render_frame(0, i, 48)
        d = f["depth_m"]
        assert np.all(np.isfinite(d)) and d.min() > 0.05 and d.max() < 12  # rooms are at most 8 m deep
        labels = set(np.unique(f["label"]).tolist())
        assert labels <= set(range(len(procedural.CLASS_NAMES)))
        assert {procedural.FLOOR, procedural.WALL} <= labels  # the camera looks down into a room


def test_floor_depth_follows_the_pinhole_geometry():
    # On the floor, z-depth = camera height / (ray slope down): exact geometry, not an estimate.
    rng = np.random.default_rng([0, 0])
    scene, cam, rot, fov = procedural.sample_scene(rng)
    size = 40
    _, depth, cls, _, dirs, _ = procedural.render(scene, cam, rot, fov, size)
    floor = cls == procedural.FLOOR
    expected = cam[1] / -dirs[..., 1]
    np.testing.assert_allclose(depth[floor], expected[floor], rtol=1e-6)


def test_sensor_noise_makes_holes_and_small_errors():
    f = procedural.render_frame(1, 0, 64, depth_noise=True)
    holes = f["depth_m"] == 0
    assert 0 < holes.mean() < 0.5
    err = np.abs(f["depth_m"] - f["depth_exact_m"])[~holes]
    assert np.median(err) < 0.05


def test_write_dataset_is_the_same_whatever_the_sharding(tmp_path):
    one = procedural.write_procedural_dataset(
        str(tmp_path / "a"), 6, 24, seed=5, num_shards=1, format="tfrecord", num_workers=1
    )
    three = procedural.write_procedural_dataset(
        str(tmp_path / "b"), 6, 24, seed=5, num_shards=3, format="array_record", num_workers=2
    )
    assert len(one) == 1 and len(three) == 3
    a = [schema.parse_example(r).frame_id for r in records.read_records(one[0])]
    b = [schema.parse_example(r).frame_id for p in three for r in records.read_records(p)]
    assert a == b == [f"procedural-5-{i:08d}" for i in range(6)]
    ex = schema.parse_example(next(iter(records.read_records(three[0]))))
    assert ex.label_set == "procedural" and ex.intrinsics is not None
    assert procedural.ensure_procedural_dataset(str(tmp_path / "b"), 6, 24, seed=5, num_shards=3) == three


def test_replacing_a_procedural_set_says_what_changed(tmp_path, capsys):
    """Runs that share a procedural_dir with other settings replace each other's set: never silently."""
    first = procedural.ensure_procedural_dataset(str(tmp_path), 4, 24, seed=5, num_shards=1)
    assert "replacing" not in capsys.readouterr().out
    assert procedural.ensure_procedural_dataset(str(tmp_path), 4, 24, seed=5, num_shards=1) == first
    procedural.ensure_procedural_dataset(str(tmp_path), 3, 24, seed=5, num_shards=1)
    out = capsys.readouterr().out
    assert f"replacing the procedural set in {tmp_path}" in out and "'num_frames': (4, 3)" in out
