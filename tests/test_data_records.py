"""Schema round trip and the two shard formats, including CRC checks."""

import os

import numpy as np
import pytest

from mmcmae_jax.data import depth_units, records, schema
from mmcmae_jax.data.errors import RecordError


def _example(i=0, h=6, w=8, **kw):
    rng = np.random.default_rng(i)
    return schema.example_from_arrays(
        rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        rng.integers(1, 5000, (h, w)).astype(np.uint16),
        0.001,
        frame_id=f"f{i}",
        source="test",
        **kw,
    )


def test_example_round_trip_keeps_every_field():
    label = np.full((6, 8), 255, np.uint8)
    label[2:4] = 7
    ex = _example(label=label, label_set="nyu40", intrinsics=(500.0, 501.0, 3.5, 2.5))
    back = schema.parse_example(schema.serialize_example(ex))
    assert back == ex
    frame = schema.decode_example(back)
    assert frame.rgb.shape == (6, 8, 3) and frame.depth_m.dtype == np.float32
    np.testing.assert_array_equal(frame.label, label)


def test_jpeg_rgb_decodes_to_same_size():
    ex = _example(rgb_format="jpeg")
    assert ex.rgb[:2] == b"\xff\xd8"
    assert schema.decode_example(schema.parse_example(schema.serialize_example(ex))).rgb.shape == (6, 8, 3)


@pytest.mark.parametrize("fmt", records.FORMATS)
def test_shard_round_trip(tmp_path, fmt):
    path = records.shard_name(str(tmp_path), "t", 0, 1, fmt)
    data = [schema.serialize_example(_example(i)) for i in range(5)]
    assert records.write_records(path, data) == 5
    assert records.detect_format(path) == fmt
    assert list(records.read_records(path)) == data
    assert records.count_records(path) == 5


def test_tfrecord_crc_matches_tensorflow_reference():
    # The masked CRC32C of b"" and of b"abc" as TensorFlow's crc32c::Mask computes them.
    assert records.masked_crc32c(b"") == ((0 >> 15 | 0 << 17) + 0xA282EAD8) & 0xFFFFFFFF
    crc = 0x364B3FB7  # CRC32C("abc")
    assert records.masked_crc32c(b"abc") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_flipped_byte_reports_file_and_offset(tmp_path):
    path = str(tmp_path / "x.tfrecord")
    data = [schema.serialize_example(_example(i)) for i in range(3)]
    records.write_records(path, data)
    second = 12 + len(data[0]) + 4  # header + payload + footer of the first record
    raw = bytearray(open(path, "rb").read())
    raw[second + 12 + 20] ^= 0xFF  # inside the second record's payload
    open(path, "wb").write(bytes(raw))
    with pytest.raises(RecordError, match=r"x\.tfrecord.*byte offset %d.*CRC" % second) as info:
        list(records.read_records(path))
    assert info.value.offset == second


def test_missing_files_and_empty_patterns_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tfrecord"):
        records.expand_paths(str(tmp_path / "nope.tfrecord"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        records.expand_paths(str(tmp_path / "*.array_record"))


def test_depth_units_sunrgbd_rotation_and_quantisation():
    mm = np.array([0, 1, 1000, 8000], np.uint16)
    encoded = ((mm.astype(np.uint32) << 3) | (mm.astype(np.uint32) >> 13)) & 0xFFFF
    np.testing.assert_array_equal(depth_units.sunrgbd_to_millimetres(encoded), mm)
    units = depth_units.metres_to_units(np.array([0.0, np.nan, 1.2345, 20.0]), depth_units.FINE_UNIT)
    np.testing.assert_array_equal(units, [0, 0, 6172, 0])  # 20 m is out of range: no measurement


def test_shard_set_appears_whole_or_not_at_all(tmp_path):
    data = [schema.serialize_example(_example(i)) for i in range(2)]
    with pytest.raises(RuntimeError, match="stopped"):
        with records.ShardSetWriter(str(tmp_path), "s", 2, records.TFRECORD) as shard_set:
            records.write_records(shard_set.temporary_paths[0], data)
            raise RuntimeError("stopped before the second shard")
    assert os.listdir(tmp_path) == []
    with records.ShardSetWriter(str(tmp_path), "s", 2, records.TFRECORD) as shard_set:
        for path in shard_set.temporary_paths:
            records.write_records(path, data)
    assert records.expand_paths(str(tmp_path)) == shard_set.paths
    assert [records.count_records(p) for p in shard_set.paths] == [2, 2]
    with pytest.raises(RecordError, match=r"already holds 2 record files \(s-00000-of-00002\.tfrecord, "):
        records.ShardSetWriter(str(tmp_path), "other", 1, records.TFRECORD)
    with records.ShardSetWriter(str(tmp_path), "other", 1, records.TFRECORD, overwrite=True) as shard_set:
        records.write_records(shard_set.temporary_paths[0], data)
    assert records.expand_paths(str(tmp_path)) == [str(tmp_path / "other-00000-of-00001.tfrecord")]
