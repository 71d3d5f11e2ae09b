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
import re
import shutil
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


# PREFIX-00003-of-00008.array_record: (prefix, index, count, extension)
_SHARD_NAME = re.compile(r"^(.*)-(\d{5,})-of-(\d{5,})(\.array_record|\.tfrecords?)$")


def is_record_file(path: str) -> bool:
    """A file the readers take for records: its name holds '.tfrecord' or '.array_record'."""
    name = os.path.basename(path)
    return ".tfrecord" in name or ".array_record" in name


def record_files_in(directory: str) -> list[str]:
    """The record files in a directory, sorted."""
    return sorted(p for p in glob.glob(os.path.join(directory, "*")) if is_record_file(p) and os.path.isfile(p))


def check_one_set(paths: Sequence[str], where: str) -> None:
    """Raise RecordError naming `where` and the files unless the shard files in `paths` form one
    complete set: one prefix, one -of-N count, one format, every index 0..N-1 present.

    Files not named PREFIX-NNNNN-of-NNNNN.EXT are checked only against being mixed with a set."""
    sets: dict[tuple, list[int]] = {}
    others = []
    for path in paths:
        m = _SHARD_NAME.match(os.path.basename(path))
        if m is None:
            others.append(os.path.basename(path))
            continue
        prefix, index, count, ext = m.groups()
        sets.setdefault((prefix, int(count), ext), []).append(int(index))
    if not sets:
        return
    names = [f"{prefix}-*-of-{count:05d}{ext} ({len(idx)} files)" for (prefix, count, ext), idx in sorted(sets.items())]
    if len(sets) > 1 or others:
        raise RecordError(
            where,
            f"holds shards of more than one set: {', '.join(names + others)}; a folder must hold one set "
            f"(convert again with --overwrite, or name the files to read)",
        )
    ((prefix, count, ext), indices), = sets.items()
    missing = sorted(set(range(count)) - set(indices))
    if missing:
        shown = ", ".join(f"{prefix}-{i:05d}-of-{count:05d}{ext}" for i in missing[:5])
        raise RecordError(
            where,
            f"the set {names[0]} is incomplete: missing {shown}{' ...' if len(missing) > 5 else ''}",
        )


class ShardSetWriter:
    """Writes one set of shards so that it appears whole or not at all.

    The shards are written under temporary names in a hidden folder of out_dir and moved into out_dir
    by `commit()`; `discard()` (or leaving the `with` block with an exception) removes them. An
    out_dir that already holds record files is refused with RecordError, unless overwrite: then
    commit() removes them first.

      with ShardSetWriter(out_dir, prefix, num_shards, fmt) as shard_set:
          for path in shard_set.temporary_paths: ...write...
      shard_set.paths  # the final names
    """

    def __init__(self, out_dir: str, prefix: str, num_shards: int, fmt: str, *, overwrite: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        existing = record_files_in(out_dir) if os.path.isdir(out_dir) else []
        if existing and not overwrite:
            shown = ", ".join(os.path.basename(p) for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
            raise RecordError(
                out_dir,
                f"already holds {len(existing)} record files ({shown}); pass --overwrite to replace them, "
                f"or choose another output folder",
            )
        self.out_dir, self.overwrite = out_dir, overwrite
        self.paths = [shard_name(out_dir, prefix, i, num_shards, fmt) for i in range(num_shards)]
        self._tmp_dir = os.path.join(out_dir, f".{prefix}.partial")
        shutil.rmtree(self._tmp_dir, ignore_errors=True)  # left by a conversion that was killed
        os.makedirs(self._tmp_dir)
        self.temporary_paths = [os.path.join(self._tmp_dir, os.path.basename(p)) for p in self.paths]

    def commit(self) -> list[str]:
        """Move the written shards into out_dir (after removing its old record files when overwrite)."""
        missing = [p for p in self.temporary_paths if not os.path.isfile(p)]
        if missing:
            raise RecordError(missing[0], "shard was not written; nothing was moved into the output folder")
        if self.overwrite:
            for path in record_files_in(self.out_dir):
                os.remove(path)
        for tmp, path in zip(self.temporary_paths, self.paths):
            os.replace(tmp, path)
        os.rmdir(self._tmp_dir)
        return self.paths

    def discard(self) -> None:
        shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.commit()
        else:
            self.discard()


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

    A pattern matching nothing or a named file that does not exist raises FileNotFoundError. The record
    files of a directory, and those a pattern matches in each directory, must form one complete set of
    shards (check_one_set), else RecordError names them.
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
            by_directory: dict[str, list[str]] = {}
            for path in matches:
                by_directory.setdefault(os.path.dirname(path), []).append(path)
            for directory, paths in by_directory.items():
                check_one_set(paths, f"{directory or '.'} (pattern {item!r})")
            out.extend(matches)
        elif os.path.isdir(item):
            matches = record_files_in(item)
            if not matches:
                raise FileNotFoundError(f"directory {item!r} holds no .tfrecord or .array_record files")
            check_one_set(matches, item)
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


def _read_length(f, path: str):
    """Reads a record's header at f's position: (start offset, payload length), or None at the end of
    the file; a cut or damaged header raises FramingError."""
    start = f.tell()
    header = f.read(_HEADER.size)
    if not header:
        return None
    if len(header) != _HEADER.size:
        raise FramingError(path, "truncated record header", offset=start)
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise FramingError(path, "length CRC mismatch (corrupted record)", offset=start)
    return start, length


def read_tfrecord_at(f, path: str):
    """Reads the record at f's position: (start offset, data), or None at the end of the file.

    A damaged length field raises FramingError; a damaged payload raises RecordError with the file
    positioned after the record, so a caller may go on to the next one.
    """
    framed = _read_length(f, path)
    if framed is None:
        return None
    start, length = framed
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
    """How many records a file holds, checking that the whole file can be framed (check_shard)."""
    return check_shard(path, fmt)


def check_shard(path: str, fmt: str | None = None) -> int:
    """Open a shard and check its structure without decoding records; returns its record count.

    ArrayRecord: the file opens (its footer, lost when a file is truncated, is read). TFRecord: every
    record's length field and its checksum are read, and the last record ends at the end of the file.
    A missing, unreadable, truncated or damaged file raises RecordError naming it.
    """
    fmt = fmt or detect_format(path)
    if not os.path.isfile(path):
        raise RecordError(path, "record file does not exist")
    if fmt == ARRAY_RECORD:
        try:  # riegeli reports a truncated or foreign file as a generic error, at the latest on close
            reader = array_record_module.ArrayRecordReader(path)
            try:
                count = reader.num_records()
            finally:
                reader.close()
        except Exception as e:
            raise RecordError(path, f"cannot open as an ArrayRecord file: truncated or damaged ({e})") from None
        return count
    size, n = os.path.getsize(path), 0
    try:
        with open(path, "rb") as f:
            while (framed := _read_length(f, path)) is not None:
                start, length = framed
                if start + _HEADER.size + length + _FOOTER.size > size:
                    raise FramingError(path, f"truncated record: expected {length} bytes", offset=start)
                f.seek(length + _FOOTER.size, os.SEEK_CUR)
                n += 1
    except OSError as e:
        raise RecordError(path, f"cannot read file ({e})") from None
    return n
