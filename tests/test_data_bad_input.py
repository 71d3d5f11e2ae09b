"""Bad input: each case is an error naming the file and the record, or, in skip mode, counted."""

import dataclasses
import math
import os

import numpy as np
import pytest
from PIL import Image

from mmcmae_jax.data import convert, data_options, pipeline, records, schema
from mmcmae_jax.data.sources import folder
from mmcmae_jax.data.errors import RecordError


def _good(i):
    rng = np.random.default_rng(i)
    return schema.example_from_arrays(
        rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
        np.full((16, 16), 1000 + i, np.uint16),
        0.001,
        frame_id=f"f{i}",
        source="test",
    )


def _bad(kind):
    ex = _good(99)
    if kind == "undecodable":
        return dataclasses.replace(ex, rgb=b"\x89PNG not really")
    if kind == "size":
        return dataclasses.replace(ex, depth=schema.encode_png(np.ones((8, 16), np.uint16)))
    if kind == "no_depth":
        return dataclasses.replace(ex, depth=schema.encode_png(np.zeros((16, 16), np.uint16)))
    if kind == "intrinsics":
        return dataclasses.replace(ex, intrinsics=(math.nan, 500.0, 8.0, 8.0))
    raise ValueError(kind)


CASES = {
    "undecodable": "cannot decode rgb",
    "size": "differ",
    "no_depth": "no valid depth",
    "intrinsics": "intrinsics",
}


def _shard(tmp_path, fmt, bad_kind, bad_at=2, n=6):
    path = records.shard_name(str(tmp_path), "bad", 0, 1, fmt)
    data = [schema.serialize_example(_bad(bad_kind) if i == bad_at else _good(i)) for i in range(n)]
    records.write_records(path, data)
    return path


def _run(path, skip_log=None, **options):
    return list(
        pipeline.make_pipeline(
            path, data_options(**options), batch_size=1, image_size=8, seed=0, train=False, shard_index=0,
            shard_count=1, skip_log=skip_log,
        )
    )


@pytest.mark.parametrize("fmt", records.FORMATS)
@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_record_names_file_and_record(tmp_path, fmt, kind):
    path = _shard(tmp_path, fmt, kind)
    with pytest.raises(RecordError, match=CASES[kind]) as info:
        _run(path)
    assert info.value.path == path and info.value.record == 2
    assert path in str(info.value) and "record 2" in str(info.value)


@pytest.mark.parametrize("fmt", records.FORMATS)
def test_skip_mode_counts_and_goes_on(tmp_path, fmt):
    path = _shard(tmp_path, fmt, "no_depth")
    log = pipeline.SkipLog()
    batches = _run(path, skip_bad_records=True, skip_log=log)
    assert len(batches) == 5 and log.count == 1 and "record 2" in log.errors[0]


def test_corrupted_tfrecord_in_pipeline(tmp_path):
    path = _shard(tmp_path, "tfrecord", "size", bad_at=-1)
    raw = bytearray(open(path, "rb").read())
    raw[40] ^= 0x01  # inside the first record's payload
    open(path, "wb").write(bytes(raw))
    with pytest.raises(RecordError, match="CRC") as info:
        _run(path)
    assert info.value.path == path and info.value.offset == 0 and info.value.record == 0
    log = pipeline.SkipLog()
    assert len(_run(path, skip_bad_records=True, skip_log=log)) == 5 and log.count == 1


def test_missing_record_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.array_record"):
        pipeline.make_pipeline(
            str(tmp_path / "missing.array_record"), data_options(), batch_size=1, image_size=8, seed=0,
            train=True, shard_index=0, shard_count=1,
        )


def _folder(tmp_path, n=3):
    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    for i in range(n):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb" / f"{i}.png")
        Image.fromarray(np.full((8, 8), 700, np.uint16)).save(tmp_path / "depth" / f"{i}.png")


def test_converter_missing_and_undecodable_files(tmp_path):
    _folder(tmp_path)
    (tmp_path / "depth" / "1.png").unlink()
    with pytest.raises(RecordError, match=r"rgb/1\.png.*no depth file"):
        list(folder.examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001))
    (tmp_path / "depth" / "1.png").write_bytes(b"not a png")
    with pytest.raises(RecordError, match=r"depth/1\.png: cannot decode"):
        list(folder.examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001))


def test_converter_checks_frames_and_skips_when_asked(tmp_path):
    _folder(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "depth" / "2.png")  # no valid depth
    Image.fromarray(np.full((6, 8), 700, np.uint16)).save(tmp_path / "depth" / "0.png")  # wrong size
    examples = folder.examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001)
    with pytest.raises(RecordError, match="differs from rgb size"):
        convert.write_example_shards(examples, str(tmp_path / "out"), "x")
    log = pipeline.SkipLog()
    paths = convert.write_example_shards(
        folder.examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001, skip_log=log),
        str(tmp_path / "out2"),
        "x",
        source_path=str(tmp_path),
        skip_log=log,
    )
    assert log.count == 2 and records.count_records(paths[0]) == 1
    assert any("no valid depth" in e for e in log.errors)


def test_converter_rejects_non_finite_intrinsics(tmp_path):
    _folder(tmp_path, n=1)
    examples = folder.examples(
        str(tmp_path), "rgb/*.png", "depth/*.png", 0.001, intrinsics=(500.0, math.inf, 4.0, 4.0)
    )
    with pytest.raises(RecordError, match=r"record 0.*intrinsics"):
        convert.write_example_shards(examples, str(tmp_path / "out"), "x", source_path=str(tmp_path))


def _folder_cli(tmp_path, out, *extra):
    return ["folder", "--root", str(tmp_path), "--rgb", "rgb/*.png", "--depth", "depth/*.png",
            "--depth-scale", "0.001", "--out", str(out), *extra]


def test_failed_conversion_leaves_no_shard(tmp_path, capsys):
    _folder(tmp_path, n=4)
    Image.fromarray(np.full((6, 8), 700, np.uint16)).save(tmp_path / "depth" / "3.png")  # the last frame is bad
    out = tmp_path / "out"
    assert convert.main(_folder_cli(tmp_path, out, "--num-shards", "2")) == 1
    assert f"{tmp_path / 'depth' / '3.png'}: depth size (6, 8) differs" in capsys.readouterr().err
    assert os.listdir(out) == []  # neither the 3 good frames' shards nor their temporary files


def test_reconverting_into_a_folder_with_shards_needs_overwrite(tmp_path, capsys):
    _folder(tmp_path, n=6)
    out = tmp_path / "out"
    assert convert.main(_folder_cli(tmp_path, out, "--num-shards", "3")) == 0
    first = records.record_files_in(str(out))
    assert convert.main(_folder_cli(tmp_path, out, "--num-shards", "2")) == 1
    err = capsys.readouterr().err
    assert f"error: {out}: already holds 3 record files" in err and "--overwrite" in err
    assert records.record_files_in(str(out)) == first
    assert convert.main(_folder_cli(tmp_path, out, "--num-shards", "2", "--overwrite")) == 0
    assert [os.path.basename(p) for p in records.record_files_in(str(out))] == [
        "folder-00000-of-00002.array_record", "folder-00001-of-00002.array_record"]
    assert len(_run(str(out))) == 6  # every frame once


@pytest.mark.parametrize("fmt", records.FORMATS)
def test_pipeline_refuses_a_folder_of_mixed_or_incomplete_sets(tmp_path, fmt):
    def write_set(prefix, count):
        for i in range(count):
            records.write_records(records.shard_name(str(tmp_path), prefix, i, count, fmt),
                                  [schema.serialize_example(_good(i))])

    write_set("nyu", 4)
    write_set("nyu", 2)
    ext = ".array_record" if fmt == records.ARRAY_RECORD else ".tfrecord"
    with pytest.raises(RecordError, match=rf"{tmp_path}: holds shards of more than one set: "
                                          rf"nyu-\*-of-00002{ext} \(2 files\), nyu-\*-of-00004{ext} \(4 files\)"):
        _run(str(tmp_path))
    with pytest.raises(RecordError, match="more than one set"):
        _run(str(tmp_path / f"*{ext}"))
    for i in range(2):
        os.remove(records.shard_name(str(tmp_path), "nyu", i, 2, fmt))
    os.remove(records.shard_name(str(tmp_path), "nyu", 2, 4, fmt))
    with pytest.raises(RecordError, match=rf"{tmp_path}: the set nyu-\*-of-00004{ext} \(3 files\) is incomplete: "
                                          rf"missing nyu-00002-of-00004{ext}"):
        _run(str(tmp_path))
    assert len(_run(records.shard_name(str(tmp_path), "nyu", 0, 4, fmt))) == 1  # a file named: read as given


@pytest.mark.parametrize("fmt", records.FORMATS)
def test_truncated_shard_is_named_before_reading(tmp_path, fmt):
    paths = [records.shard_name(str(tmp_path), "t", i, 2, fmt) for i in range(2)]
    for i, path in enumerate(paths):
        records.write_records(path, [schema.serialize_example(_good(3 * i + j)) for j in range(3)])
    with open(paths[1], "r+b") as f:
        f.truncate(os.path.getsize(paths[1]) * 2 // 3 - 7)  # inside a record: TFRecord cannot tell a cut between two
    with pytest.raises(RecordError, match="truncated") as info:
        pipeline.make_pipeline(str(tmp_path), data_options(), batch_size=1, image_size=8, seed=0, train=True,
                               shard_index=0, shard_count=1)
    assert info.value.path == paths[1] and str(info.value).startswith(paths[1])
    log = pipeline.SkipLog()
    assert len(_run(str(tmp_path), skip_bad_records=True, skip_log=log)) == 3  # the intact shard
    assert log.count == 1 and paths[1] in log.errors[0]
