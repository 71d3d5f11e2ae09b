"""`convert nyu-mat` writes NYU Depth V2's standard split with 40- or 13-class labels.

The fixtures are small files in the layouts of the files users download with the dataset (checked
against the originals): nyu_depth_v2_labeled.mat as MATLAB v7.3 (HDF5, arrays transposed), and
splits.mat, classMapping40.mat and class13Mapping.mat as MATLAB v5 (compressed, as MATLAB saves them):
  splits.mat          trainNdxs (n,1), testNdxs (m,1) uint16, 1-based frame numbers
  classMapping40.mat  mapClass (1,894) uint8 in 1..40, className (1,40) cell
  class13Mapping.mat  classMapping13: struct with labels13 (1,40) uint8 in 1..13, classNames (1,13) cell
The expected records are worked out here with NumPy indexing.
"""

import h5py
import numpy as np
import pytest
import scipy.io

from mmcmae_jax.data import convert, records, schema
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.sources import nyu_mat

N, H, W = 7, 12, 16
TRAIN, TEST = [2, 3, 5, 6], [1, 4, 7]


@pytest.fixture
def nyu(tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, (N, H, W, 3), dtype=np.uint8)
    depth = rng.uniform(0.7, 9.5, (N, H, W))
    labels = rng.integers(0, 895, (N, H, W))  # 0 = unlabelled, 1..894
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(mat, "w") as f:
        f["images"] = rgb.transpose(0, 3, 2, 1)
        f["depths"] = depth.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1).astype(np.uint16)
    scipy.io.savemat(tmp_path / "splits.mat", {
        "trainNdxs": np.array(TRAIN, np.uint16)[:, None], "testNdxs": np.array(TEST, np.uint16)[:, None]})
    map40 = rng.integers(1, 41, 894).astype(np.uint8)
    names40 = np.array([f"class{k}" for k in range(1, 41)], dtype=object)[None, :]
    scipy.io.savemat(tmp_path / "classMapping40.mat", {"mapClass": map40[None, :], "className": names40},
                     do_compression=True)
    map13 = rng.integers(1, 14, 40).astype(np.uint8)
    names13 = np.array([f"c{k}" for k in range(1, 14)], dtype=object)[None, :]
    scipy.io.savemat(tmp_path / "class13Mapping.mat",
                     {"classMapping13": {"labels13": map13[None, :], "classNames": names13}}, do_compression=True)
    return dict(tmp=tmp_path, mat=str(mat), rgb=rgb, depth=depth, labels=labels, map40=map40, map13=map13)


def _stored(one_based):
    """Records hold classes 0..K-1 and 255 for unlabelled."""
    return np.where(one_based > 0, one_based.astype(np.int64) - 1, 255)


def _expected_nyu40(raw, map40):
    return np.where(raw > 0, map40[np.maximum(raw, 1) - 1], 0)


def _read(out):
    frames = [schema.parse_example(r) for p in records.expand_paths(str(out)) for r in records.read_records(p)]
    return {ex.frame_id: ex for ex in frames}


def test_train_split_with_40_classes_in_one_command(nyu, capsys):
    out = nyu["tmp"] / "train"
    assert convert.main(["nyu-mat", "--mat", nyu["mat"], "--split", "train",
                         "--label-map", str(nyu["tmp"] / "classMapping40.mat"), "--out", str(out)]) == 0
    assert f"wrote {len(TRAIN)} frames ({len(TRAIN)} with a label map)" in capsys.readouterr().out
    frames = _read(out)
    assert sorted(frames) == [f"{k:04d}" for k in TRAIN]  # splits.mat beside the .mat, 1-based
    for k in TRAIN:
        ex = frames[f"{k:04d}"]
        frame = schema.decode_example(ex)
        assert ex.label_set == "nyu40"
        np.testing.assert_array_equal(frame.rgb, nyu["rgb"][k - 1])
        np.testing.assert_allclose(frame.depth_m, nyu["depth"][k - 1], atol=1e-4)
        np.testing.assert_array_equal(frame.label, _stored(_expected_nyu40(nyu["labels"][k - 1], nyu["map40"])))


def test_test_split_with_13_classes_in_one_command(nyu):
    splits = nyu["tmp"] / "elsewhere" / "splits.mat"
    splits.parent.mkdir()
    (nyu["tmp"] / "splits.mat").rename(splits)
    out = nyu["tmp"] / "test13"
    assert convert.main(["nyu-mat", "--mat", nyu["mat"], "--split", "test", "--splits", str(splits),
                         "--label-map", str(nyu["tmp"] / "classMapping40.mat"),
                         "--nyu40-to-13", str(nyu["tmp"] / "class13Mapping.mat"), "--out", str(out)]) == 0
    frames = _read(out)
    assert sorted(frames) == [f"{k:04d}" for k in TEST]
    for k in TEST:
        ex = frames[f"{k:04d}"]
        nyu40 = _expected_nyu40(nyu["labels"][k - 1], nyu["map40"])
        nyu13 = np.where(nyu40 > 0, nyu["map13"][np.maximum(nyu40, 1) - 1], 0)
        assert ex.label_set == "nyu13"
        np.testing.assert_array_equal(schema.decode_example(ex).label, _stored(nyu13))
    labels = np.concatenate([schema.decode_example(ex).label.ravel() for ex in frames.values()])
    assert labels[labels < 255].max() <= 12 and len(np.unique(labels[labels < 255])) > 3


def test_without_a_split_every_frame_is_written(nyu):
    assert [ex.frame_id for ex in nyu_mat.examples(nyu["mat"])] == [f"{k:04d}" for k in range(1, N + 1)]


def test_the_same_mapping_as_a_numpy_array(nyu):
    np.save(nyu["tmp"] / "map40.npy", nyu["map40"])
    from_mat = list(nyu_mat.examples(nyu["mat"], split="test", label_map=str(nyu["tmp"] / "classMapping40.mat")))
    from_npy = list(nyu_mat.examples(nyu["mat"], split="test", label_map=str(nyu["tmp"] / "map40.npy")))
    assert [schema.serialize_example(e) for e in from_mat] == [schema.serialize_example(e) for e in from_npy]


def _cli_error(nyu, capsys, *args):
    assert convert.main(["nyu-mat", "--mat", nyu["mat"], "--out", str(nyu["tmp"] / "out"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_bad_split_and_mapping_files_are_one_line_naming_the_file(nyu, capsys):
    tmp = nyu["tmp"]
    map40, map13 = str(tmp / "classMapping40.mat"), str(tmp / "class13Mapping.mat")
    err = _cli_error(nyu, capsys, "--label-map", map13)  # the 40 -> 13 file given as the 894-class one
    assert err.startswith(f"error: {map13}: maps 40 classes, not 894") and "--nyu40-to-13" in err
    err = _cli_error(nyu, capsys, "--nyu40-to-13", map13)
    assert err.startswith(f"error: {map13}:") and "--label-map classMapping40.mat" in err
    err = _cli_error(nyu, capsys, "--label-map", map40, "--nyu40-to-13", map40)
    assert err.startswith(f"error: {map40}: maps 894 classes, not 40")
    err = _cli_error(nyu, capsys, "--splits", str(tmp / "splits.mat"))
    assert err == f"error: {tmp / 'splits.mat'}: --splits needs --split train or --split test"

    scipy.io.savemat(tmp / "other.mat", {"mapping": np.arange(894)})
    err = _cli_error(nyu, capsys, "--label-map", str(tmp / "other.mat"))
    assert err.startswith(f"error: {tmp / 'other.mat'}: holds no class mapping") and "['mapping']" in err

    scipy.io.savemat(tmp / "splits.mat",
                     {"trainNdxs": np.array([[1], [8]], np.uint16), "testNdxs": np.ones((1, 1))})
    err = _cli_error(nyu, capsys, "--split", "train")
    assert err.startswith(f"error: {tmp / 'splits.mat'}: trainNdxs lists frame 8;") and f"has {N} frames" in err
    err = _cli_error(nyu, capsys, "--split", "test", "--splits", str(tmp / "missing.mat"))
    assert err == f"error: {tmp / 'missing.mat'}: file does not exist"

    with h5py.File(tmp / "v73.mat", "w") as f:  # MATLAB v7.3: an HDF5 file
        f["trainNdxs"] = np.array([[1, 2]], np.uint16)
    err = _cli_error(nyu, capsys, "--split", "train", "--splits", str(tmp / "v73.mat"))
    assert err.startswith(f"error: {tmp / 'v73.mat'}: cannot read as a MATLAB v5 .mat file")
    assert not (tmp / "out").exists() or not records.record_files_in(str(tmp / "out"))


def test_mapping_targets_must_be_classes(tmp_path):
    np.save(tmp_path / "bad.npy", np.full(40, 1.5))
    with pytest.raises(RecordError, match=r"bad\.npy: targets must be whole numbers"):
        nyu_mat.load_label_map(str(tmp_path / "bad.npy"), 40)
    np.save(tmp_path / "big.npy", np.full(40, 255))
    with pytest.raises(RecordError, match=r"big\.npy: targets must be whole numbers 0\.\.254"):
        nyu_mat.load_label_map(str(tmp_path / "big.npy"), 40)
