"""The procedural scene generator: determinism, exact depth, classes, noise, dataset writing; both
styles ("rooms", the default, and "varied")."""

import hashlib
import json
import os

import numpy as np
import pytest

from mmcmae_jax.data import config, convert, procedural, records, schema
from mmcmae_jax.data.errors import RecordError


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


def test_a_procedural_dir_holding_other_records_is_refused_not_emptied(tmp_path):
    """procedural_dir pointed at a folder of the user's records: nothing of theirs is removed."""
    theirs = records.shard_name(str(tmp_path), "nyu", 0, 1, records.ARRAY_RECORD)
    procedural.write_procedural_dataset(str(tmp_path / "src"), 2, 16, seed=0, num_shards=1)
    os.replace(records.record_files_in(str(tmp_path / "src"))[0], theirs)
    with pytest.raises(RecordError, match=r"holds 1 record files that are not its procedural set \(nyu-"):
        procedural.ensure_procedural_dataset(str(tmp_path), 2, 16, seed=0, num_shards=1)
    assert records.record_files_in(str(tmp_path)) == [theirs]


def test_rooms_frames_are_unchanged():
    """The default style renders what it rendered before styles existed (documented numbers and the
    existing sets depend on it): values computed with the code before the "varied" style was added."""
    f = procedural.render_frame(3, 7, 32)
    g = procedural.render_frame(3, 7, 32, style="rooms")
    np.testing.assert_array_equal(f["rgb"], g["rgb"])
    assert f["frame_id"] == "procedural-3-00000007"
    label_sha = hashlib.sha256(f["label"].tobytes()).hexdigest()
    assert label_sha == "880a11af3868532cc0361b2ce5249e2bf7e079d172fdeb63ede85ad7f121ff44"
    assert abs(int(f["rgb"].astype(np.int64).sum()) - 468479) <= 50
    np.testing.assert_allclose(float(f["depth_m"].astype(np.float64).sum()), 3940.267690181732, rtol=1e-6)
    where = ([0, 10, 20, 31], [0, 15, 5, 31])
    rgb = [[124, 120, 119], [205, 242, 223], [124, 148, 136], [115, 93, 88]]
    np.testing.assert_allclose(f["rgb"][where].astype(int), rgb, atol=1)
    depth = [2.325090169906616, 5.158266544342041, 5.273193359375, 2.465472459793091]
    np.testing.assert_allclose(f["depth_m"][where], depth, rtol=1e-6)
    n = procedural.render_frame(1, 4, 48, depth_noise=True)  # the sensor noise draws as before too
    label_sha = hashlib.sha256(n["label"].tobytes()).hexdigest()
    assert label_sha == "d06bf54f6fe6f297eb578fa77ecceab75bd26ca791279d74347f8cb5546c2512"
    assert abs(int((n["depth_m"] == 0).sum()) - 499) <= 2
    np.testing.assert_allclose(float(n["depth_m"].astype(np.float64).sum()), 6153.22056221962, rtol=1e-4)


def test_varied_frames_are_deterministic_and_differ_from_rooms():
    a = procedural.render_frame(3, 7, 32, style="varied")
    b = procedural.render_frame(3, 7, 32, style="varied")
    for key in ("rgb", "depth_m", "label"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["frame_id"] == "procedural-varied-3-00000007"
    assert not np.array_equal(a["rgb"], procedural.render_frame(3, 7, 32)["rgb"])
    assert not np.array_equal(a["rgb"], procedural.render_frame(3, 8, 32, style="varied")["rgb"])
    with pytest.raises(ValueError, match="style"):
        procedural.render_frame(3, 7, 32, style="fancy")


def test_varied_depth_is_metric_and_finite():
    for i in range(6):
        f = procedural.render_frame(0, i, 48, style="varied")
        d = f["depth_m"]
        assert d.dtype == np.float32 and np.all(np.isfinite(d))
        assert d.min() > 0.01 and d.max() < 10  # rooms are at most 6.5 x 3.3 x 6.5 m
        assert set(np.unique(f["label"]).tolist()) <= set(range(len(procedural.CLASS_NAMES)))
    f = procedural.render_frame(2, 0, 48, depth_noise=True, style="varied")
    holes = f["depth_m"] == 0
    assert 0 < holes.mean() < 0.5
    assert np.median(np.abs(f["depth_m"] - f["depth_exact_m"])[~holes]) < 0.05


def test_varied_floor_depth_follows_the_pinhole_geometry():
    # Tilted, rolled cameras at any height: z-depth on the floor is still height / (ray slope down).
    checked = 0
    for i in range(6):
        scene, cam, rot, fov = procedural.sample_scene(np.random.default_rng([0, i]), "varied")
        _, depth, cls, _, dirs, _ = procedural.render(scene, cam, rot, fov, 40)
        floor = cls == procedural.FLOOR
        if floor.sum() < 20:
            continue
        checked += 1
        np.testing.assert_allclose(depth[floor], (cam[1] / -dirs[..., 1])[floor], rtol=1e-6)
        # and the depth is the camera z of the hit point
        points = cam + depth[..., None] * dirs
        np.testing.assert_allclose(((points - cam) @ rot)[..., 2], depth, rtol=1e-6, atol=1e-9)
    assert checked >= 3


def test_varied_frames_show_objects_from_varied_cameras():
    labels, heights, pitches, rolls = [], [], [], []
    for i in range(40):
        labels.append(procedural.render_frame(0, i, 32, style="varied")["label"])
        _, cam, rot, _ = procedural.sample_scene(np.random.default_rng([0, i]), "varied")
        heights.append(cam[1])
        pitches.append(-np.arcsin(rot[1, 2]))  # the optical axis below the horizon
        rolls.append(np.arctan2(rot[1, 0], rot[1, 1]))
    labels = np.array(labels)
    assert (labels >= procedural.TABLE).mean() > 0.35  # 39 % over frames 0-499 at 64 px
    floor = (labels == procedural.FLOOR).mean((1, 2))
    assert floor.std() > 0.12 and floor.min() < 0.05 and floor.max() > 0.5
    assert min(heights) < 0.6 and max(heights) > 1.9
    assert min(pitches) < -0.15 and max(pitches) > 0.6
    assert min(rolls) < -0.2 and max(rolls) > 0.2


def test_procedural_style_is_a_validated_config_field():
    c = config.default_data_config()
    assert c.procedural_style == "rooms"
    config.validate_data_config(c)
    c.procedural_style = "varied"
    config.validate_data_config(c)
    c.procedural_style = "fancy"
    with pytest.raises(ValueError, match="procedural_style"):
        config.validate_data_config(c)


def test_ensure_replaces_a_set_of_another_style(tmp_path, capsys):
    rooms = procedural.ensure_procedural_dataset(str(tmp_path), 2, 16, seed=1, num_shards=1)
    # Sets written before styles existed have no style in procedural.json: they are "rooms" sets.
    meta_path = tmp_path / "procedural.json"
    meta = json.loads(meta_path.read_text())
    assert meta["style"] == "rooms"
    del meta["style"]
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert procedural.ensure_procedural_dataset(str(tmp_path), 2, 16, seed=1, num_shards=1) == rooms
    assert "replacing" not in capsys.readouterr().out
    varied = procedural.ensure_procedural_dataset(str(tmp_path), 2, 16, seed=1, num_shards=1, style="varied")
    assert "'style': ('rooms', 'varied')" in capsys.readouterr().out
    assert json.loads(meta_path.read_text())["style"] == "varied"
    ids = [schema.parse_example(r).frame_id for r in records.read_records(varied[0])]
    assert ids == ["procedural-varied-1-00000000", "procedural-varied-1-00000001"]
    again = procedural.ensure_procedural_dataset(str(tmp_path), 2, 16, seed=1, num_shards=1, style="varied")
    assert again == varied
    assert "replacing" not in capsys.readouterr().out


def test_converter_writes_the_varied_style(tmp_path):
    convert.main(["procedural", "--out", str(tmp_path), "--num-frames", "2", "--size", "16",
                  "--style", "varied"])
    assert json.loads((tmp_path / "procedural.json").read_text())["style"] == "varied"
    with pytest.raises(SystemExit):
        convert.main(["procedural", "--out", str(tmp_path), "--num-frames", "2", "--style", "fancy"])
