"""TFRecord and ArrayRecord shard files: writers, readers, format detection.

TFRecord framing (as TensorFlow writes it), little-endian:
  uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
Both checksums are written and verified on read; a mismatch raises RecordError naming the file and the
record's byte offset. CRC32C comes from google-crc32c. ArrayRecord files are written and read with the
array_record package (its riegeli chunks carry their own checksums).
"""

from __future__ import annotations

import glob
import os
import struct
from typing import Iterable, Iterator, Sequence

import google_crc32c
from array_record.python import array_record_module

from mmcmae_jax.data.errors import RecordError

TFRECORD = "tfrecord"
ARRAY_RECORD = "array_record"
FORMATS = (TFRECORD, ARRAY_RECORD)
_EXTENSIONS = {TFRECORD: ".tfrecord", ARRAY_RECORD: ".array_record"}
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C: rotate right by 15 and add a constant, so CRCs of CRCs differ."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def shard_name(out_dir: str, prefix: str, index: int, count: int, fmt: str) -> str:
    return os.path.join(out_dir, f"{prefix}-{index:05d}-of-{count:05d}{_EXTENSIONS[fmt]}")


def detect_format(path: str) -> str:
    """Format from the file name: '.tfrecord' / '.tfrecords' or '.array_record'."""
    name = os.path.basename(path)
    if ".array_record" in name:
        return ARRAY_RECORD
    if ".tfrecord" in name:
        return TFRECORD
    raise ValueError(
        f"{path}: cannot tell the record format from the name; pass format= {' or '.join(FORMATS)}"
    )


def expand_paths(paths_or_pattern: str | Sequence[str]) -> list[str]:
    """Glob patterns and comma-separated lists to a sorted list of existing files.

    A pattern matching nothing or a named file that does not exist raises FileNotFoundError.
    """
    items = [paths_or_pattern] if isinstance(paths_or_pattern, (str, os.PathLike)) else list(paths_or_pattern)
    items = [p for item in items for p in str(item).split(",") if p]
    if not items:
        raise FileNotFoundError("no record files given")
    out = []
    for item in items:
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"pattern {item!r} matches no files")
            out.extend(matches)
        elif os.path.isdir(item):
            matches = sorted(
                p for p in glob.glob(os.path.join(item, "*")) if ".tfrecord" in p or ".array_record" in p
            )
            if not matches:
                raise FileNotFoundError(f"directory {item!r} holds no .tfrecord or .array_record files")
            out.extend(matches)
        elif not os.path.exists(item):
            raise FileNotFoundError(f"record file {item!r} does not exist")
        else:
            out.append(item)
    return out


class TFRecordWriter:
    """Writes records to one TFRecord file with both CRCs. Use as a context manager."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "wb")

    def write(self, data: bytes) -> None:
        length = struct.pack("<Q", len(data))
        self._file.write(
            length + struct.pack("<I", masked_crc32c(length)) + data + _FOOTER.pack(masked_crc32c(data))
        )

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArrayRecordWriter:
    """Writes records to one ArrayRecord file (group_size 1: every record randomly accessible)."""

    def __init__(self, path: str):
        self.path = path
        self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_writer(path: str, fmt: str | None = None):
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return TFRecordWriter(path) if fmt == TFRECORD else ArrayRecordWriter(path)


def write_records(path: str, records: Iterable[bytes], fmt: str | None = None) -> int:
    """Write all records to one file; returns how many."""
    n = 0
    with open_writer(path, fmt) as writer:
        for data in records:
            writer.write(data)
            n += 1
    return n


class FramingError(RecordError):
    """The record's length field is damaged: the rest of the file cannot be framed."""


def read_tfrecord_at(f, path: str):
    """Reads the record at f's position: (start offset, data), or None at the end of the file.

    A damaged length field raises FramingError; a damaged payload raises RecordError with the file
    positioned after the record, so a caller may go on to the next one.
    """
    start = f.tell()
    header = f.read(_HEADER.size)
    if not header:
        return None
    if len(header) != _HEADER.size:
        raise FramingError(path, "truncated record header", offset=start)
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise FramingError(path, "length CRC mismatch (corrupted record)", offset=start)
    body = f.read(length + _FOOTER.size)
    if len(body) != length + _FOOTER.size:
        raise FramingError(path, f"truncated record: expected {length} bytes", offset=start)
    data = body[:length]
    (data_crc,) = _FOOTER.unpack(body[length:])
    if masked_crc32c(data) != data_crc:
        raise RecordError(path, "data CRC mismatch (corrupted record)", offset=start)
    return start, data


def read_tfrecord(path: str, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yields (byte offset, record bytes) from `offset` on, verifying both CRCs of every record."""
    with open(path, "rb") as f:
        f.seek(offset)
        while (item := read_tfrecord_at(f, path)) is not None:
            yield item


def read_array_record(path: str) -> Iterator[bytes]:
    """All records of one ArrayRecord file, in order."""
    reader = array_record_module.ArrayRecordReader(path)
    try:
        for i in range(reader.num_records()):
            try:
                yield reader.read([i])[0]
            except Exception as e:  # riegeli reports corruption as a generic runtime error.
                raise RecordError(path, f"cannot read record ({e})", record=i) from None
    finally:
        reader.close()


def read_records(path: str, fmt: str | None = None) -> Iterator[bytes]:
    """All records of one file of either format."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"record file {path!r} does not exist")
    if (fmt or detect_format(path)) == TFRECORD:
        return (data for _, data in read_tfrecord(path))
    return read_array_record(path)


def count_records(path: str, fmt: str | None = None) -> int:
    if (fmt or detect_format(path)) == ARRAY_RECORD:
        reader = array_record_module.ArrayRecordReader(path)
        n = reader.num_records()
        reader.close()
        return n
    return sum(1 for _ in read_tfrecord(path))
