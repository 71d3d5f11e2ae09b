"""What a converter source is: one `convert` subcommand, defined by its own module.

Each module of this package (folder.py, nyu_mat.py, ...) defines SOURCE, a Source that adds the
subcommand's own arguments and turns the parsed command line into frames; sources/__init__.py lists
them in SOURCES, the one table `convert` reads. The options every subcommand shares (--out,
--num-shards, --format, --overwrite, --skip-bad, --plausible-depth) and the checked, atomic writing of
the frames are convert's.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
from typing import Callable, Iterable, Iterator

from mmcmae_jax.data import schema
from mmcmae_jax.data.errors import RecordError


@dataclasses.dataclass(frozen=True)
class Source:
    """A convert subcommand.

    name: the subcommand (its default shard prefix with '-' as '_').
    help: one line for `convert --help` and the subcommand's description.
    add_arguments(parser): adds the subcommand's own arguments.
    frames(args, skip_log): the frames the parsed command line asks for, as Frames (`guarded`): a bad
      frame raises RecordError, or with a skip_log is counted there and left out. Its depth is checked
      against args.plausible_depth. Frames are made in args.workers processes.
    input_argument: the argument naming the input (a folder or file), which an error about the whole
      input (no frame at all) names.
    write(args): instead of frames, for a source that writes its own shards (the procedural set renders
      each shard in its own process); returns the shard paths. It takes no --plausible-depth.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    frames: Callable[[argparse.Namespace, object], Iterable[schema.RGBDExample]] | None = None
    input_argument: str = "root"
    write: Callable[[argparse.Namespace], list[str]] | None = None

    def __post_init__(self):
        if (self.frames is None) == (self.write is None):
            raise TypeError(f"source {self.name!r} needs exactly one of frames and write")


class Frames:
    """The frames of a source: its items (files, frame numbers) and how one item becomes an example.

    Iterating gives the examples in item order; a bad frame raises RecordError, or with a skip_log is
    counted there and left out. `records(workers)` gives each frame checked as the pipeline will decode
    it and serialized, made by `workers` processes, in the same order whatever their number."""

    def __init__(self, items, make_example: Callable, skip_log=None):
        self.items, self.make_example, self.skip_log = items, make_example, skip_log

    def __iter__(self) -> Iterator[schema.RGBDExample]:
        for item in self.items:
            try:
                example = self.make_example(item)
            except RecordError as e:
                self._skip_or_raise(e)
                continue
            yield example

    def records(self, workers: int = 1, source_path: str = "") -> Iterator[tuple[bytes, bool]]:
        """(serialized record, has a label map) of every frame that passes the check, in item order.
        workers > 1 forks this process: call it from one that has not started JAX computations (the
        convert command does not), as forked children of a running XLA runtime can deadlock."""
        if workers <= 1:
            for example in self:
                try:
                    yield checked_record(example, source_path)
                except RecordError as e:
                    self._skip_or_raise(e)
            return
        global _FORKED_WORK
        _FORKED_WORK = (self.make_example, source_path)
        # Forked, not spawned: make_example is a closure over the source's tables and open files, which the
        # workers inherit; only items and finished records cross between processes.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for record, error in pool.imap(_forked_record, self.items, chunksize=4):
                if error is None:
                    yield record
                else:
                    path, reason, where, offset = error
                    self._skip_or_raise(RecordError(path, reason, record=where, offset=offset))

    def _skip_or_raise(self, error: RecordError):
        if self.skip_log is None:
            raise error
        self.skip_log.add(error)


def guarded(items, make_example, skip_log=None) -> Frames:
    """The frames make_example(item) makes of `items` (see Frames)."""
    return Frames(items, make_example, skip_log)


def checked_record(example: schema.RGBDExample, source_path: str = "") -> tuple[bytes, bool]:
    """The example decoded as the training pipeline will decode it (RecordError naming `source_path` or
    the example's source when it cannot be), then serialized: (record, has a label map)."""
    schema.decode_example(example, path=source_path or example.source, record=example.frame_id)
    return schema.serialize_example(example), example.label is not None


_FORKED_WORK = None  # (make_example, source_path) of the Frames whose records forked workers make


def _forked_record(item):
    make_example, source_path = _FORKED_WORK
    try:
        return checked_record(make_example(item), source_path), None
    except RecordError as e:  # sent back as its fields: the error's constructor takes keywords
        return None, (e.path, e.reason, e.record, e.offset)


def intrinsics_argument(text: str) -> tuple[float, float, float, float]:
    """argparse type of --intrinsics: 'fx,fy,cx,cy' in pixels."""
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 4:
        raise argparse.ArgumentTypeError("intrinsics are fx,fy,cx,cy")
    return values
