"""Convert RGB-D sources to record shards: `python -m mmcmae_jax.data.convert SUBCOMMAND ...`.

One subcommand per source, each defined by its own module in mmcmae_jax/data/sources/ (its arguments
and how it reads frames) and listed in sources.SOURCES; see docs/data.md for each source's layout and
depth units. Every frame is decoded and checked before it is written (sizes, valid depth in a
plausible range, intrinsics), so a shard never holds a record the pipeline would reject. The shards
appear in --out only when the whole conversion succeeded; an --out that already holds record files is
refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Iterable

from mmcmae_jax.data import depth_units, records, schema, sources
from mmcmae_jax.data.sources.source import Frames
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.pipeline import SkipLog
from mmcmae_jax.errors import run_reporting


def write_example_shards(
    examples: Iterable[schema.RGBDExample],
    out_dir: str,
    prefix: str,
    num_shards: int = 1,
    fmt: str = records.ARRAY_RECORD,
    *,
    source_path: str = "",
    skip_log: SkipLog | None = None,
    overwrite: bool = False,
    workers: int = 1,
) -> list[str]:
    """Check and write examples round-robin into num_shards shards; returns the shard paths.

    A bad frame raises RecordError, or with skip_log is counted there and left out. A source's Frames
    are made and checked by `workers` processes (the shards are the same for any number). The shards are
    moved into out_dir only when every example is written (records.ShardSetWriter): after an error
    out_dir holds no new shard. An out_dir that already holds record files is refused (RecordError)
    unless overwrite, which replaces them."""
    os.makedirs(out_dir, exist_ok=True)
    written = labelled = 0
    with records.ShardSetWriter(out_dir, prefix, num_shards, fmt, overwrite=overwrite) as shard_set:
        writers = [records.open_writer(p, fmt) for p in shard_set.temporary_paths]
        if not isinstance(examples, Frames):  # any iterable of examples: checked here, in this process
            examples = Frames(examples, lambda example: example, skip_log)
        try:
            for record, has_label in examples.records(workers, source_path):
                writers[written % num_shards].write(record)
                written += 1
                labelled += has_label
        finally:
            for w in writers:
                w.close()
        if not written:
            raise RecordError(source_path or out_dir, "no frame was written: nothing to convert")
    paths = shard_set.paths
    # Printed, not logged: how many frames (and label maps) a pattern matched is what a user checks first.
    skipped = f", {skip_log.count} bad frames skipped" if skip_log is not None and skip_log.count else ""
    print(f"wrote {written} frames ({labelled} with a label map{skipped}) to {num_shards} {fmt} shards in "
          f"{out_dir}", flush=True)
    return paths


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _plausible_depth(text: str) -> depth_units.PlausibleDepth:
    try:
        return depth_units.PlausibleDepth.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmcmae_jax.data.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for source in sources.SOURCES.values():
        p = sub.add_parser(source.name, help=source.help, description=source.help)
        _add_shared_arguments(p, source)
        source.add_arguments(p)
    return parser


def _add_shared_arguments(p: argparse.ArgumentParser, source: sources.Source):
    """The options of every subcommand; --plausible-depth only where frames are read and checked here
    (a source that writes its own shards generates its depth)."""
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the record files --out already holds (else such an --out is refused)")
    p.add_argument("--prefix", default=source.name.replace("-", "_"), help="shard file name prefix")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--format", choices=records.FORMATS, default=records.ARRAY_RECORD)
    p.add_argument("--skip-bad", action="store_true", help="count, log and leave out bad frames")
    if source.frames is not None:  # a source that writes its own shards has its own --workers
        p.add_argument("--workers", type=_positive_int, default=1,
                       help="processes that read, check and serialize frames (the shards are the same for "
                            "any number; docs/data.md has the speed-up)")
    p.add_argument("--debug", action="store_true", help="a failure's traceback instead of its one line "
                   "(also MMCMAE_DEBUG=1)")
    if source.frames is not None:
        default = depth_units.PlausibleDepth()
        p.add_argument(
            "--plausible-depth", type=_plausible_depth, default=default,
            metavar="MEDIAN_MIN,MEDIAN_MAX,MAXIMUM",
            help=f"metres; a frame whose valid depth has a median outside [MEDIAN_MIN, MEDIAN_MAX] or a "
                 f"maximum not under MAXIMUM is an error (default {default.median_min:g},"
                 f"{default.median_max:g},{default.maximum:g})",
        )


def main(argv=None) -> int:
    """Run one conversion; bad input (RecordError, a file that cannot be read or written) is printed as
    one line, and the exit status is 1 (mmcmae_jax/errors.py; --debug for the traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)

    def convert_and_print():
        for path in convert(args):
            print(path)
    return run_reporting(convert_and_print, args.debug)


def convert(args: argparse.Namespace) -> list[str]:
    """The conversion the parsed arguments ask for; returns the shard paths."""
    source = sources.SOURCES[args.command]
    if source.write is not None:
        return source.write(args)
    skip_log = SkipLog() if args.skip_bad else None
    return write_example_shards(
        source.frames(args, skip_log),
        args.out,
        args.prefix,
        args.num_shards,
        args.format,
        source_path=getattr(args, source.input_argument),
        skip_log=skip_log,
        overwrite=args.overwrite,
        workers=args.workers,
    )


if __name__ == "__main__":
    sys.exit(main())
