"""Converters: real NYU / SUN RGB-D frames from ../shared (skipped when absent), and generated
fixtures in the on-disk layouts of the NYU labeled .mat, ScanNet exports and TUM RGB-D."""

import glob
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from mmcmae_jax.data import convert, data_options, pipeline, records, schema
from mmcmae_jax.data.sources import folder, nyu_mat, scannet, tum
from mmcmae_jax.data.errors import RecordError

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
        folder.examples(
            root,
            "rgb/*.png",
            "depth_mm/*.png",
            0.001,
            label_pattern="label40/*.png",
            label_set="nyu40",
            labels_one_based=True,
            source="nyu_depth_v2",
            intrinsics=nyu_mat.NYU_INTRINSICS,
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
    examples = list(nyu_mat.examples(mat, label_map=str(tmp_path / "map40.npy")))
    assert [ex.frame_id for ex in examples] == ["0001", "0002"]
    frame = schema.decode_example(examples[1])
    np.testing.assert_array_equal(frame.rgb, rgb[1])
    np.testing.assert_allclose(frame.depth_m, depth[1], atol=1e-4)  # 0.2 mm units
    want = np.where(labels[1] > 0, (labels[1] - 1) % 40, 255)
    np.testing.assert_array_equal(frame.label, want)
    assert examples[0].label_set == "nyu40" and examples[0].intrinsics == pytest.approx(
        nyu_mat.NYU_INTRINSICS, rel=1e-6
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
    examples = list(scannet.examples(str(tmp_path), label_map=str(tmp_path / "labels.tsv")))
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
    paths = convert.write_example_shards(tum.examples(str(tmp_path)), str(tmp_path / "out"), "tum")
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
            str(tmp_path / "out"), data_options(), batch_size=2, image_size=16, seed=0, train=False,
            shard_index=0, shard_count=1,
        )
    )
    assert len(batches) == 2
    np.testing.assert_allclose(batches[0]["depth_units"][0] * batches[0]["depth_scale"][0], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(batches[0]["label"], 255)  # no labels: all ignore, fixed shape


def _room_depth_mm(h=48, w=64, seed=0):
    """Millimetres of a room seen from 2.5-5.5 m, 10% holes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    mm = 2500 + 3000 * xx / w + 200 * yy / h + rng.integers(0, 30, (h, w))
    mm[rng.random((h, w)) < 0.1] = 0
    return mm.astype(np.uint16)


def _sunrgbd_encode(mm):
    """SUN RGB-D's on-disk depth: millimetres with the 16 bits rotated left by 3."""
    mm = mm.astype(np.uint32)
    return (((mm << 3) | (mm >> 13)) & 0xFFFF).astype(np.uint16)


def _kinect_disparity(h=48, w=64):
    rng = np.random.default_rng(3)
    raw = rng.integers(400, 1080, (h, w))
    raw[rng.random((h, w)) < 0.1] = 2047  # Kinect's "no measurement"
    return raw.astype(np.uint16)


def _write_frames(root, depth_images, *, depth_ext="png", rgb=None):
    """rgb/i.png and depth/i.<depth_ext> for each depth image (an array, or bytes written as they are)."""
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    for i, depth in enumerate(depth_images):
        h, w = depth.shape if hasattr(depth, "shape") else (48, 64)
        image = rgb if rgb is not None else Image.fromarray(np.full((h, w, 3), 30 * i, np.uint8))
        image.save(root / "rgb" / f"{i}.png")
        if isinstance(depth, bytes):
            (root / "depth" / f"{i}.{depth_ext}").write_bytes(depth)
        else:
            Image.fromarray(depth).save(root / "depth" / f"{i}.{depth_ext}")


def _folder_args(root, out, *extra, depth="depth/*.png", scale="0.001"):
    return ["folder", "--root", str(root), "--rgb", "rgb/*.png", "--depth", depth, "--depth-scale", scale,
            "--out", str(out), *extra]


def test_sunrgbd_depth_through_folder_without_its_encoding_is_refused(tmp_path, capsys):
    room, close_up = _room_depth_mm(), _room_depth_mm() // 2  # medians 4.1 m and 2.0 m (x8: 33 m and 16 m)
    for mm in (room, close_up):
        shutil.rmtree(tmp_path / "rgb", ignore_errors=True)
        shutil.rmtree(tmp_path / "depth", ignore_errors=True)
        _write_frames(tmp_path, [_sunrgbd_encode(mm), _sunrgbd_encode(mm)])
        out = tmp_path / "out"
        assert convert.main(_folder_args(tmp_path, out)) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {tmp_path / 'depth' / '0.png'}: depth")
        assert "--depth-encoding sunrgbd --depth-scale 0.001" in err
        assert not os.path.exists(out) or not records.record_files_in(str(out))
        assert convert.main(_folder_args(tmp_path, out, "--depth-encoding", "sunrgbd")) == 0
        frame = schema.decode_example(_frames(records.expand_paths(str(out)))["0"])
        np.testing.assert_allclose(frame.depth_m, mm / 1000.0, rtol=1e-6)
        shutil.rmtree(out)


def test_plausible_depth_range_is_the_users_to_set(tmp_path, capsys):
    _write_frames(tmp_path, [_room_depth_mm() * 7])  # millimetres, 17-39 m: not an indoor scene
    assert convert.main(_folder_args(tmp_path, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "0.png: implausible depth read as units of 0.001 m: valid median 28" in err and "--plausible-depth" in err
    assert convert.main(_folder_args(tmp_path, tmp_path / "out", "--plausible-depth", "0.1,50,100")) == 0
    with pytest.raises(SystemExit):
        convert.main(_folder_args(tmp_path, tmp_path / "out2", "--plausible-depth", "5,1,100"))


def test_real_sunrgbd_depth_through_folder_names_the_file_and_the_encoding(tmp_path):
    root = _real("sunrgbd_mini/SUNRGBD")
    with pytest.raises(RecordError, match=r"train_depth_raw/0*1\.png: depth values carry SUN RGB-D's bit rotation.*"
                                          r"--depth-encoding sunrgbd --depth-scale 0\.001"):
        list(folder.examples(root, "train/color/*", "train_depth_raw/*.png", 0.001))


def test_raw_kinect_disparity_is_refused_as_png_and_as_nyu_pgm(tmp_path):
    disparity = _kinect_disparity()
    _write_frames(tmp_path / "png", [disparity])
    with pytest.raises(RecordError, match=r"depth/0\.png: depth values look like raw Kinect disparity \(11-bit"):
        list(folder.examples(str(tmp_path / "png"), "rgb/*.png", "depth/*.png", 0.001))
    # NYU's raw frames: a PGM header, then the values little-endian (PGM readers take them big-endian).
    pgm = b"P5\n64 48\n65535\n" + disparity.astype("<u2").tobytes()
    _write_frames(tmp_path / "pgm", [pgm], depth_ext="pgm")
    with pytest.raises(RecordError, match=r"depth/0\.pgm: depth must be a one-channel 16-bit PNG.*bytes swapped"):
        list(folder.examples(str(tmp_path / "pgm"), "rgb/*.png", "depth/*.pgm", 0.001))


def test_eight_bit_depth_png_is_refused(tmp_path):
    _write_frames(tmp_path, [np.full((48, 64), 200, np.uint8)])
    with pytest.raises(RecordError, match=r"depth/0\.png: depth must be a one-channel 16-bit PNG.*mode L \(8 bits"):
        list(folder.examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001))


def test_tum_and_scannet_depth_are_checked_too(tmp_path):
    (tmp_path / "tum").mkdir()
    (tmp_path / "scannet").mkdir()
    _write_tum_sequence(tmp_path / "tum")
    for name in os.listdir(tmp_path / "tum" / "depth"):  # centimetres, where TUM's 1/5000 m are expected
        Image.fromarray(_room_depth_mm(8, 10) // 10).save(tmp_path / "tum" / "depth" / name)
    with pytest.raises(RecordError, match=r"depth/1\.004000\.png: implausible depth read as units of 0\.0002 m"
                                          r".*it looks like millimetres \(--depth-scale 0\.001\)"):
        list(tum.examples(str(tmp_path / "tum")))
    depth_mm = _write_scannet_scene(tmp_path / "scannet")
    Image.fromarray(depth_mm[1] * 11).save(tmp_path / "scannet" / "scene0000_00" / "depth" / "1.png")
    with pytest.raises(RecordError, match=r"scene0000_00/depth/1\.png: implausible depth read as units of 0\.001 m"):
        list(scannet.examples(str(tmp_path / "scannet")))


@pytest.mark.parametrize("mode", ["L", "P"])
def test_grey_and_palette_rgb_become_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (48, 64), dtype=np.uint8)
    image = Image.fromarray(grey)
    if mode == "P":
        image = Image.fromarray(np.stack([grey, 255 - grey, grey // 2], -1)).convert("P", palette=Image.ADAPTIVE)
    _write_frames(tmp_path, [_room_depth_mm()], rgb=image)
    (ex,) = folder.examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001)
    frame = schema.decode_example(ex)
    np.testing.assert_array_equal(frame.rgb, np.asarray(image.convert("RGB")))


def _textured_rgb(h=240, w=320):
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, 128 + 60 * np.sin(xx / 9.0) * np.cos(yy / 7.0)], -1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def test_jpeg_source_is_stored_as_its_own_bytes(tmp_path):
    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    for i in range(3):
        Image.fromarray(np.roll(_textured_rgb(), 11 * i, axis=1)).save(tmp_path / "rgb" / f"{i}.jpg", quality=90)
        Image.fromarray(_room_depth_mm(240, 320, seed=i)).save(tmp_path / "depth" / f"{i}.png")
    examples = list(folder.examples(str(tmp_path), "rgb/*.jpg", "depth/*.png", 0.001))
    for ex in examples:
        jpg, png = tmp_path / "rgb" / f"{ex.frame_id}.jpg", tmp_path / "depth" / f"{ex.frame_id}.png"
        assert ex.rgb_format == "jpeg" and ex.rgb == jpg.read_bytes() and ex.depth == png.read_bytes()
        source_bytes = jpg.stat().st_size + png.stat().st_size
        assert len(schema.serialize_example(ex)) <= 1.2 * source_bytes
        np.testing.assert_array_equal(schema.decode_example(ex).rgb, np.asarray(Image.open(jpg)))


def test_scannet_colour_is_kept_as_its_jpeg_and_resized_when_read(tmp_path):
    _write_scannet_scene(tmp_path)
    scene = tmp_path / "scene0000_00"
    (ex,) = [e for e in scannet.examples(str(tmp_path), label_map=str(tmp_path / "labels.tsv"))
             if e.frame_id.endswith("/1")]
    assert ex.rgb == (scene / "color" / "1.jpg").read_bytes() and ex.rgb_format == "jpeg"
    assert ex.depth == (scene / "depth" / "1.png").read_bytes() and ex.resize_rgb_to_depth
    back = schema.parse_example(schema.serialize_example(ex))
    assert back == ex
    want = np.asarray(Image.open(scene / "color" / "1.jpg").resize((32, 24), Image.BILINEAR))
    assert np.abs(schema.decode_example(back).rgb.astype(int) - want).max() <= 2
    source_bytes = sum((scene / sub / f"1.{ext}").stat().st_size
                       for sub, ext in (("color", "jpg"), ("depth", "png"), ("label-filt", "png")))
    assert len(schema.serialize_example(ex)) <= 1.2 * source_bytes


def _mixed_folder(root, n=9, bad=None):
    """n frames of random RGB (PNG and JPEG), millimetre depth and labels; frame `bad` has no valid depth."""
    rng = np.random.default_rng(0)
    for sub in ("rgb", "depth", "label"):
        (root / sub).mkdir()
    for i in range(n):
        rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        rgb.save(root / "rgb" / (f"{i}.png" if i % 2 else f"{i}.jpg"))
        depth = rng.integers(500, 4000, (24, 32)).astype(np.uint16) * (i != bad)
        Image.fromarray(depth).save(root / "depth" / f"{i}.png")
        Image.fromarray(rng.integers(1, 5, (24, 32), dtype=np.uint8)).save(root / "label" / f"{i}.png")


@pytest.mark.parametrize("fmt", records.FORMATS)
def test_parallel_conversion_writes_the_same_shards(tmp_path, fmt):
    """--workers N: the same records in the same shards, in the same order, for any N; a bad frame
    found by a worker is the same one line, and --skip-bad leaves out the same frames. The command runs
    in its own process, as users run it (its workers are forked; this test process runs JAX)."""
    _mixed_folder(tmp_path, bad=None)

    def run(workers, out, *extra):
        return subprocess.run(
            [sys.executable, "-m", "mmcmae_jax.data.convert", "folder", "--root", str(tmp_path), "--rgb", "rgb/*",
             "--depth", "depth/*.png", "--label", "label/*.png", "--depth-scale", "0.001", "--num-shards", "2",
             "--format", fmt, "--out", str(tmp_path / out), "--workers", str(workers), *extra],
            capture_output=True, text=True, timeout=300)

    def shards(out):
        return [list(records.read_records(p)) for p in sorted(glob.glob(str(tmp_path / out / "*")))]

    assert run(1, "one").returncode == 0 and run(3, "three").returncode == 0
    one = shards("one")
    assert len(one) == 2 and sum(map(len, one)) == 9 and shards("three") == one
    if fmt == records.TFRECORD:
        return  # bad frames: the same for both formats
    Image.fromarray(np.zeros((24, 32), np.uint16)).save(tmp_path / "depth" / "4.png")  # no valid depth
    alone, parallel = run(1, "bad1"), run(2, "bad")
    assert alone.returncode == parallel.returncode == 1
    err = [line for line in parallel.stderr.splitlines() if line.strip()]
    assert err == [line for line in alone.stderr.splitlines() if line.strip()], parallel.stderr
    assert len(err) == 1 and "record 4: frame has no valid depth" in err[0], err
    assert not glob.glob(str(tmp_path / "bad" / "*.array_record"))
    assert run(1, "skip1", "--skip-bad").returncode == 0 and run(2, "skip2", "--skip-bad").returncode == 0
    assert shards("skip2") == shards("skip1") and sum(map(len, shards("skip2"))) == 8


def test_workers_must_be_a_whole_number_of_at_least_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        convert.main(["folder", "--root", str(tmp_path), "--rgb", "r/*", "--depth", "d/*", "--depth-scale", "1",
                      "--out", str(tmp_path / "o"), "--workers", "0"])
    assert info.value.code == 2 and "--workers: '0' is not a whole number >= 1" in capsys.readouterr().err
