"""Errors of the data layer: every bad input names the file and the record it came from."""

from __future__ import annotations

from mmcmae_jax.errors import RunError


class RecordError(RunError, ValueError):
    """A record (or a source frame) that cannot be used, with where it came from.

    Attributes:
      path: the file (shard, image, .mat) the bad input was read from.
      record: the record's index in that file, or a frame id, or None when the whole file is bad.
      offset: for TFRecord shards, the byte offset of the record; else None.
      reason: what is wrong, in words.
    """

    def __init__(self, path: str, reason: str, *, record=None, offset: int | None = None):
        self.path = str(path)
        self.record = record
        self.offset = offset
        self.reason = reason
        where = self.path
        if record is not None:
            where += f", record {record}"
        if offset is not None:
            where += f" (byte offset {offset})"
        super().__init__(f"{where}: {reason}")
