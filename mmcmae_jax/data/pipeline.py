"""The grain input pipeline: record shards in, fixed-shape batches of the batch contract out.

ArrayRecord: random access, so a global shuffle (a new permutation every epoch).
TFRecord: sequential reads with CRC checks, shards interleaved, then a window shuffle.
Both: sharded per JAX process, decoded, augmented, batched with drop_remainder (fixed shapes).

Randomness is a pure function of (seed, the element's position in the stream), never of a thread or
worker, so a run restored from `get_state()` sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import grain
import numpy as np

from mmcmae_jax.data import augment, records, schema
from mmcmae_jax.data.errors import RecordError

_ARRAY_RECORD_STREAM, _TFRECORD_STREAM = 0, 1


class SkipLog:
    """Counts and logs records skipped in skip mode (in this process; grain workers log their own)."""

    def __init__(self):
        self.count = 0
        self.errors: list[str] = []

    def add(self, error: Exception) -> None:
        self.count += 1
        if len(self.errors) < 100:
            self.errors.append(str(error))
        logging.warning("skipping bad record (%d skipped so far): %s", self.count, error)


@dataclasses.dataclass(frozen=True)
class _Element:
    """A raw record with where it came from and the key that seeds its augmentation."""

    rng_key: tuple
    path: str
    record: int
    offset: int | None
    data: bytes | None
    error: RecordError | None = None


class _ArrayRecordSource(grain.sources.RandomAccessDataSource):
    """grain's ArrayRecordDataSource over many files, returning elements that know their file/record."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int]):
        self._paths = list(paths)
        self._source = grain.sources.ArrayRecordDataSource(self._paths)
        self._ends = np.cumsum(counts)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int) -> _Element:
        file_index = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[file_index - 1]) if file_index else 0)
        path = self._paths[file_index]
        try:
            return _Element((), path, local, None, self._source[index])
        except Exception as e:  # riegeli reports corruption as a generic error
            return _Element(
                (), path, local, None, None, RecordError(path, f"cannot read record ({e})", record=local)
            )


class _TFRecordIterator(grain.DatasetIterator):
    """Reads one TFRecord file, verifying CRCs; keeps every `stride`-th record from `first`.

    State: the byte offset and number of the next record, so restoring is a seek.
    """

    def __init__(self, path, file_index, epoch, first, stride):
        super().__init__()
        self._path, self._file_index, self._epoch = path, file_index, epoch
        self._first, self._stride = first, stride
        self._offset, self._record, self._done = 0, 0, False
        self._file = None

    def __next__(self) -> _Element:
        if self._file is None:
            self._file = open(self._path, "rb")
        f = self._file
        while not self._done:
            if f.tell() != self._offset:
                f.seek(self._offset)
            record = self._record
            try:
                item = records.read_tfrecord_at(f, self._path)
                error = None
            except records.FramingError as e:
                # The rest of the file cannot be framed: report it once, then end this file.
                self._done = True
                return _Element(
                    (),
                    self._path,
                    record,
                    e.offset,
                    None,
                    RecordError(self._path, e.reason, record=record, offset=e.offset),
                )
            except RecordError as e:  # damaged payload: the file is positioned at the next record
                item, error = (
                    (e.offset, None),
                    RecordError(self._path, e.reason, record=record, offset=e.offset),
                )
            if item is None:
                self._done = True
                break
            self._offset, self._record = f.tell(), record + 1
            if record % self._stride != self._first:
                continue
            return _Element(
                (_TFRECORD_STREAM, self._file_index, self._epoch, record),
                self._path,
                record,
                item[0],
                item[1],
                error,
            )
        self._close()
        raise StopIteration

    def _close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        self._close()

    def get_state(self):
        return {"offset": self._offset, "record": self._record, "done": self._done}

    def set_state(self, state):
        self._offset, self._record, self._done = state["offset"], state["record"], state["done"]


class CheckedTFRecordIterDataset(grain.IterDataset):
    """One TFRecord file as a grain IterDataset, CRC-checked, optionally record-sharded."""

    def __init__(self, path: str, file_index: int = 0, epoch: int = 0, first: int = 0, stride: int = 1):
        super().__init__()
        self._args = (path, file_index, epoch, first, stride)

    def __iter__(self):
        return _TFRecordIterator(*self._args)


class _FrameTransform:
    """Raw element -> batch-contract dict (or None in skip mode), seeded by the element's key."""

    def __init__(self, image_size, train, seed, options, skip_bad_records, skip_log, labels):
        self.image_size, self.train, self.seed = image_size, train, seed
        self.options, self.skip, self.skip_log = options, skip_bad_records, skip_log
        self.labels = labels

    def __call__(self, element: _Element):
        try:
            if element.error is not None:
                raise element.error
            ex = schema.parse_example(element.data, path=element.path, record=element.record)
            frame = schema.decode_example(ex, path=element.path, record=element.record, labels=self.labels)
            rng = np.random.default_rng([self.seed, *element.rng_key]) if self.train else None
            try:
                return augment.transform_frame(frame, rng, self.image_size, self.options, self.labels)
            except augment.BatchRangeError as e:
                raise RecordError(element.path, str(e), record=element.record) from None
        except RecordError as e:
            if element.offset is not None and e.offset is None:
                e = RecordError(e.path, e.reason, record=e.record, offset=element.offset)
            if not self.skip:
                raise e from None
            self.skip_log.add(e)
            return None


@dataclasses.dataclass(frozen=True)
class _FileDataset:
    """(position in the file stream, file index) -> that file's dataset; picklable for grain workers."""

    files: Sequence[str]
    first: int
    stride: int

    def __call__(self, position: int, file_index: int) -> CheckedTFRecordIterDataset:
        epoch = position // len(self.files)
        return CheckedTFRecordIterDataset(self.files[file_index], file_index, epoch, self.first, self.stride)


def _with_key(index, element: _Element) -> _Element:
    return dataclasses.replace(element, rng_key=(_ARRAY_RECORD_STREAM, int(index)))


def _not_none(x) -> bool:
    return x is not None


def check_shards(paths: Sequence[str], fmt: str, skip_log: SkipLog | None = None) -> tuple[list[str], list[int]]:
    """Check every shard before reading (records.check_shard): a missing, truncated or unreadable file
    raises RecordError naming it, or with skip_log is counted there and left out.

    Returns the usable paths and their record counts."""
    usable, counts = [], []
    for path in paths:
        try:
            counts.append(records.check_shard(path, fmt))
        except RecordError as e:
            if skip_log is None:
                raise
            skip_log.add(e)
            continue
        usable.append(path)
    if not usable:
        raise RecordError(paths[0], f"none of the {len(paths)} record files can be read")
    return usable, counts


def _process_shard(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax  # only when the caller does not say: tests and tools need no JAX here

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    return shard_index, shard_count


def make_pipeline(
    paths_or_pattern,
    options,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    train: bool,
    shard_index: int | None = None,
    shard_count: int | None = None,
    skip_log: SkipLog | None = None,
    labels: bool = True,
) -> grain.DatasetIterator:
    """An iterator of batches: dicts of compact NumPy arrays (rgb uint8, color_jitter, depth_units uint16,
    depth_scale, label uint8; device_batch.py and docs/data.md), which device_batch.prepare_batch normalises.

    Every shard is checked before the iterator is returned (check_shards), and a directory's shards must
    form one set (records.expand_paths).

    Args:
      paths_or_pattern: record files, glob patterns, comma-separated lists or directories.
      options: the data options (`data.default_data_config()`, validated): format, augmentation,
        readers, workers, epochs, skipping of bad records.
      batch_size, image_size: per process; seed: of the shuffle and the augmentation.
      train: random augmentation and shuffling; else central crop, file order, no randomness.
      shard_index, shard_count: this process's part; default jax.process_index()/process_count().
      skip_log: receives the skipped records' errors (only with options.worker_count=0).
      labels: decode the class labels and send them (pre-training reads none).
    Returns:
      A grain DatasetIterator; get_state()/set_state() round-trip, and grain.checkpoint.CheckpointSave
      / CheckpointRestore (orbax) save it with the model.
    """
    format, num_epochs, skip_bad_records = options.format, options.num_epochs, options.skip_bad_records
    paths = records.expand_paths(paths_or_pattern)
    formats = {records.detect_format(p) for p in paths} if format == "auto" else {format}
    if len(formats) != 1 or not formats <= set(records.FORMATS):
        raise ValueError(
            f"format must be one of {records.FORMATS} (or 'auto' with one kind of file); "
            f"got {format!r} for {paths[:3]}..."
        )
    fmt = formats.pop()
    shard_index, shard_count = _process_shard(shard_index, shard_count)
    if num_epochs is None and not train:
        num_epochs = 1
    skip_log = skip_log or SkipLog()
    transform = _FrameTransform(image_size, train, seed, augment.AugmentOptions.from_config(options),
                                skip_bad_records, skip_log, labels)
    paths, counts = check_shards(paths, fmt, skip_log if skip_bad_records else None)

    if fmt == records.ARRAY_RECORD:
        ds = grain.MapDataset.source(_ArrayRecordSource(paths, counts))
        per_shard = len(ds) // shard_count  # equal parts, so every process takes the same number of steps
        if per_shard == 0:
            raise ValueError(f"{len(ds)} records cannot be split over {shard_count} processes")
        ds = ds[shard_index * per_shard : (shard_index + 1) * per_shard]
        if train:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(num_epochs).map_with_index(_with_key).map(transform)
        if skip_bad_records:
            ds = ds.filter(_not_none)
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=options.read_threads, prefetch_buffer_size=2 * batch_size)
        )
    else:
        if len(paths) % shard_count == 0:
            files, first, stride = paths[shard_index::shard_count], 0, 1
        else:  # files do not divide evenly: every process reads all files, keeping every k-th record
            files, first, stride = paths, shard_index, shard_count
        file_order = grain.MapDataset.range(len(files))
        if train:
            file_order = file_order.shuffle(seed=seed)
        n_files = len(files)
        datasets = file_order.repeat(num_epochs).map_with_index(_FileDataset(files, first, stride))
        ds = grain.experimental.InterleaveIterDataset(datasets, cycle_length=min(options.cycle_length, n_files))
        if train and options.shuffle_buffer > 1:
            ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=options.shuffle_buffer, seed=seed)
        ds = ds.map(transform)
        if skip_bad_records:
            ds = ds.filter(_not_none)
    ds = ds.batch(batch_size, drop_remainder=True)
    if options.worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.worker_count))
    return iter(ds)
