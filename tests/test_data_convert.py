"""Converters: real NYU / SUN RGB-D frames from ../shared (skipped when absent), and generated
fixtures in the on-disk layouts of the NYU labeled .mat, ScanNet exports and TUM RGB-D."""

import json
import os

import h5py
import numpy as np
import pytest
from PIL import Image

from mmcmae_jax.data import convert, pipeline, records, schema, sources

REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "rgbd_real")


def _real(sub):
    path = os.path.join(REAL, sub)
    if not os.path.isdir(path):
        pytest.skip(f"real RGB-D frames not found at {path} (shared/ is not beside the checkout)")
    return path


def _frames(paths):
    return {ex.frame_id: ex for p in paths for ex in map(schema.parse_example, records.read_records(p))}


def test_nyu_png_folder_in_metres_with_labels(tmp_path):
    root = _real("nyu_mini")
    paths = convert.write_example_shards(
        sources.folder_examples(
            root,
            "rgb/*.png",
            "depth_mm/*.png",
            0.001,
            label_pattern="label40/*.png",
            label_set="nyu40",
            labels_one_based=True,
            source="nyu_depth_v2",
            intrinsics=sources.NYU_INTRINSICS,
        ),
        str(tmp_path),
        "nyu",
        2,
        "tfrecord",
    )
    frames = _frames(paths)
    assert len(frames) == 18
    first = schema.decode_example(frames["1"])
    valid = first.depth_m[first.depth_m > 0]
    assert first.depth_m.shape == (480, 640) and 1.79 <= valid.min() and valid.max() <= 3.7  # 1.798-3.615 m
    labelled = [k for k, ex in frames.items() if ex.label is not None]
    assert sorted(map(int, labelled)) == [1, 2, 9, 14, 15, 16, 17, 18]
    label = first.label
    raw = np.asarray(Image.open(os.path.join(root, "label40", "0001.png")))
    np.testing.assert_array_equal(label[raw == 0], 255)
    np.testing.assert_array_equal(label[raw > 0], raw[raw > 0] - 1)
    with open(os.path.join(root, "classes.json")) as f:
        names = json.load(f)["label40_names(1..40, 0=unlabeled)"]
    assert names[int(np.bincount(label[label < 255]).argmax())] in ("wall", "floor", "cabinet", "bed")


def test_sunrgbd_bit_rotation_gives_millimetres(tmp_path, capsys):
    root = _real("sunrgbd_mini/SUNRGBD")
    paths = convert.main(
        [
            "sunrgbd",
            "--root",
            root,
            "--split",
            "train",
            "--raw-depth",
            "--out",
            str(tmp_path),
            "--format",
            "array_record",
        ]
    ) or records.expand_paths(str(tmp_path))
    frames = _frames(paths)
    assert len(frames) == 15
    assert f"wrote 15 frames (0 with a label map) to 1 array_record shards in {tmp_path}" in capsys.readouterr().out
    depth = schema.decode_example(frames["1"]).depth_m
    assert depth.shape == (530, 730)
    valid = depth[depth > 0]
    assert 0 < (depth == 0).mean() < 0.5  # raw depth keeps the sensor's holes
    assert 0.3 < np.median(valid) < 6.0 and valid.max() <= 8.2  # metres, not scrambled bits (~64 m)


def _write_nyu_mat(path, n=2, h=12, w=16):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    depth = rng.uniform(0.7, 9.5, (n, h, w))
    labels = rng.integers(0, 895, (n, h, w))
    with h5py.File(path, "w") as f:  # MATLAB v7.3 layout: every array transposed
        f["images"] = rgb.transpose(0, 3, 2, 1)
        f["depths"] = depth.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1).astype(np.uint16)
    return rgb, depth, labels


def test_nyu_mat_reader_transposes_and_maps_labels(tmp_path):
    mat = str(tmp_path / "nyu_depth_v2_labeled.mat")
    rgb, depth, labels = _write_nyu_mat(mat)
    mapping = (np.arange(894) % 40) + 1  # class k -> ((k-1) % 40) + 1
    np.save(tmp_path / "map40.npy", mapping)
    examples = list(sources.nyu_mat_examples(mat, label_map=str(tmp_path / "map40.npy")))
    assert [ex.frame_id for ex in examples] == ["0001", "0002"]
    frame = schema.decode_example(examples[1])
    np.testing.assert_array_equal(frame.rgb, rgb[1])
    np.testing.assert_allclose(frame.depth_m, depth[1], atol=1e-4)  # 0.2 mm units
    want = np.where(labels[1] > 0, (labels[1] - 1) % 40, 255)
    np.testing.assert_array_equal(frame.label, want)
    assert examples[0].label_set == "nyu40" and examples[0].intrinsics == pytest.approx(
        sources.NYU_INTRINSICS, rel=1e-6
    )


def _write_scannet_scene(root, n=2):
    rng = np.random.default_rng(1)
    scene = root / "scene0000_00"
    for sub in ("color", "depth", "label-filt", "intrinsic"):
        (scene / sub).mkdir(parents=True)
    depth_mm = rng.integers(500, 4000, (n, 24, 32)).astype(np.uint16)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(scene / "color" / f"{i}.jpg")
        Image.fromarray(depth_mm[i]).save(scene / "depth" / f"{i}.png")
        Image.fromarray(np.full((36, 48), 3 if i else 40, np.uint16)).save(scene / "label-filt" / f"{i}.png")
    np.savetxt(
        scene / "intrinsic" / "intrinsic_depth.txt",
        np.array([[577.6, 0, 319.5, 0], [0, 578.7, 239.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
    )
    (root / "labels.tsv").write_text("id\traw_category\tnyu40id\n3\tcabinet\t3\n40\tthing\t0\n")
    return depth_mm


def test_scannet_export_millimetres_and_nyu40_labels(tmp_path):
    depth_mm = _write_scannet_scene(tmp_path)
    examples = list(sources.scannet_examples(str(tmp_path), label_map=str(tmp_path / "labels.tsv")))
    assert [ex.frame_id for ex in examples] == ["scene0000_00/0", "scene0000_00/1"]
    frame = schema.decode_example(examples[1])
    assert frame.rgb.shape == (24, 32, 3)  # colour resized to the depth size
    np.testing.assert_allclose(frame.depth_m, depth_mm[1] / 1000.0, rtol=1e-6)
    np.testing.assert_array_equal(frame.label, 2)  # nyu40 id 3 (cabinet) -> index 2
    np.testing.assert_array_equal(schema.decode_example(examples[0]).label, 255)  # nyu40 id 0
    assert examples[0].intrinsics == pytest.approx((577.6, 578.7, 319.5, 239.5), rel=1e-6)


def _write_tum_sequence(root):
    (root / "rgb").mkdir()
    (root / "depth").mkdir()
    rgb_times, depth_times = [1.000, 1.033, 1.066, 1.5], [1.004, 1.030, 1.070]
    for t in rgb_times:
        Image.fromarray(np.full((8, 10, 3), int(t * 100) % 255, np.uint8)).save(root / "rgb" / f"{t:.6f}.png")
    for t in depth_times:
        Image.fromarray(np.full((8, 10), 5000 * 2, np.uint16)).save(root / "depth" / f"{t:.6f}.png")
    header = "# timestamp filename\n"
    (root / "rgb.txt").write_text(header + "".join(f"{t:.6f} rgb/{t:.6f}.png\n" for t in rgb_times))
    (root / "depth.txt").write_text(header + "".join(f"{t:.6f} depth/{t:.6f}.png\n" for t in depth_times))


def test_tum_associates_by_timestamp_and_divides_by_5000(tmp_path):
    _write_tum_sequence(tmp_path)
    paths = convert.write_example_shards(sources.tum_examples(str(tmp_path)), str(tmp_path / "out"), "tum")
    frames = _frames(paths)
    assert sorted(frames) == ["1.000000", "1.033000", "1.066000"]  # 1.5 s has no depth within 20 ms
    np.testing.assert_allclose(schema.decode_example(frames["1.033000"]).depth_m, 2.0)


def test_cli_folder_then_pipeline(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "d").mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / "c" / f"{i:04d}.png")
        Image.fromarray(np.full((20, 20), 1000 + i, np.uint16)).save(tmp_path / "d" / f"{i:06d}.png")
    assert (
        convert.main(
            [
                "folder",
                "--root",
                str(tmp_path),
                "--rgb",
                "c/*.png",
                "--depth",
                "d/*.png",
                "--depth-scale",
                "0.001",
                "--out",
                str(tmp_path / "out"),
                "--format",
                "tfrecord",
            ]
        )
        == 0
    )
    batches = list(
        pipeline.make_pipeline(
            str(tmp_path / "out"), batch_size=2, image_size=16, train=False, shard_index=0, shard_count=1
        )
    )
    assert len(batches) == 2
    np.testing.assert_allclose(batches[0]["depth_m"][0], 1.0)
    np.testing.assert_array_equal(batches[0]["label"], 255)  # no labels: all ignore, fixed shape
