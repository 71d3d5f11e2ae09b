"""Bad input: each case is an error naming the file and the record, or, in skip mode, counted."""

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

from mmcmae_jax.data import convert, pipeline, records, schema, sources
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


def _run(path, **kw):
    return list(
        pipeline.make_pipeline(
            path, batch_size=1, image_size=8, train=False, shard_index=0, shard_count=1, **kw
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
            str(tmp_path / "missing.array_record"),
            batch_size=1,
            image_size=8,
            train=True,
            shard_index=0,
            shard_count=1,
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
        list(sources.folder_examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001))
    (tmp_path / "depth" / "1.png").write_bytes(b"not a png")
    with pytest.raises(RecordError, match=r"depth/1\.png: cannot decode"):
        list(sources.folder_examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001))


def test_converter_checks_frames_and_skips_when_asked(tmp_path):
    _folder(tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "depth" / "2.png")  # no valid depth
    Image.fromarray(np.full((6, 8), 700, np.uint16)).save(tmp_path / "depth" / "0.png")  # wrong size
    examples = sources.folder_examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001)
    with pytest.raises(RecordError, match="differs from rgb size"):
        convert.write_example_shards(examples, str(tmp_path / "out"), "x")
    log = pipeline.SkipLog()
    paths = convert.write_example_shards(
        sources.folder_examples(str(tmp_path), "rgb/*.png", "depth/*.png", 0.001, skip_log=log),
        str(tmp_path / "out2"),
        "x",
        source_path=str(tmp_path),
        skip_log=log,
    )
    assert log.count == 2 and records.count_records(paths[0]) == 1
    assert any("no valid depth" in e for e in log.errors)


def test_converter_rejects_non_finite_intrinsics(tmp_path):
    _folder(tmp_path, n=1)
    examples = sources.folder_examples(
        str(tmp_path), "rgb/*.png", "depth/*.png", 0.001, intrinsics=(500.0, math.inf, 4.0, 4.0)
    )
    with pytest.raises(RecordError, match=r"record 0.*intrinsics"):
        convert.write_example_shards(examples, str(tmp_path / "out"), "x", source_path=str(tmp_path))
