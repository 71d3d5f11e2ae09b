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
from typing import Callable, Iterable

from mmcmae_jax.data import schema
from mmcmae_jax.data.errors import RecordError


@dataclasses.dataclass(frozen=True)
class Source:
    """A convert subcommand.

    name: the subcommand (its default shard prefix with '-' as '_').
    help: one line for `convert --help` and the subcommand's description.
    add_arguments(parser): adds the subcommand's own arguments.
    frames(args, skip_log): the frames the parsed command line asks for; a bad frame raises
      RecordError, or with a skip_log is counted there and left out (`guarded`). Its depth is checked
      against args.plausible_depth.
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


def guarded(items, make_example, skip_log=None):
    """make_example(item) for each item; a RecordError stops the conversion, unless skip_log is given
    (skip mode): then it is counted and logged there and the frame left out."""
    for item in items:
        try:
            example = make_example(item)
        except RecordError as e:
            if skip_log is None:
                raise
            skip_log.add(e)
            continue
        yield example


def intrinsics_argument(text: str) -> tuple[float, float, float, float]:
    """argparse type of --intrinsics: 'fx,fy,cx,cy' in pixels."""
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 4:
        raise argparse.ArgumentTypeError("intrinsics are fx,fy,cx,cy")
    return values
