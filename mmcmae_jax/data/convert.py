"""Convert RGB-D sources to record shards: `python -m mmcmae_jax.data.convert SUBCOMMAND ...`.

Subcommands: folder, nyu-mat, sunrgbd, scannet, tum, procedural. See docs/data.md for each source's
layout and depth units. Every frame is decoded and checked before it is written (sizes, valid depth in
a plausible range, intrinsics), so a shard never holds a record the pipeline would reject. The shards
appear in --out only when the whole conversion succeeded; an --out that already holds record files is
refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Iterable

from mmcmae_jax.data import depth_units, procedural, records, schema, sources
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.pipeline import SkipLog


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
) -> list[str]:
    """Check and write examples round-robin into num_shards shards; returns the shard paths.

    A bad frame raises RecordError, or with skip_log is counted there and left out. The shards are
    moved into out_dir only when every example is written (records.ShardSetWriter): after an error
    out_dir holds no new shard. An out_dir that already holds record files is refused (RecordError)
    unless overwrite, which replaces them."""
    os.makedirs(out_dir, exist_ok=True)
    written = labelled = 0
    with records.ShardSetWriter(out_dir, prefix, num_shards, fmt, overwrite=overwrite) as shard_set:
        writers = [records.open_writer(p, fmt) for p in shard_set.temporary_paths]
        try:
            for ex in examples:
                try:
                    schema.decode_example(ex, path=source_path or ex.source, record=ex.frame_id)
                except RecordError as e:
                    if skip_log is None:
                        raise
                    skip_log.add(e)
                    continue
                writers[written % num_shards].write(schema.serialize_example(ex))
                written += 1
                labelled += ex.label is not None
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


def _floats(text: str):
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 4:
        raise argparse.ArgumentTypeError("intrinsics are fx,fy,cx,cy")
    return values


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

    def add(name, help_text, reads_depth=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the record files --out already holds (else such an --out is refused)")
        p.add_argument("--prefix", default=name.replace("-", "_"), help="shard file name prefix")
        p.add_argument("--num-shards", type=int, default=1)
        p.add_argument("--format", choices=records.FORMATS, default=records.ARRAY_RECORD)
        p.add_argument("--skip-bad", action="store_true", help="count, log and leave out bad frames")
        if reads_depth:
            default = depth_units.PlausibleDepth()
            p.add_argument(
                "--plausible-depth", type=_plausible_depth, default=default,
                metavar="MEDIAN_MIN,MEDIAN_MAX,MAXIMUM",
                help=f"metres; a frame whose valid depth has a median outside [MEDIAN_MIN, MEDIAN_MAX] or a "
                     f"maximum not under MAXIMUM is an error (default {default.median_min:g},"
                     f"{default.median_max:g},{default.maximum:g})",
            )
        return p

    p = add("folder", "a folder of paired RGB / depth (/ label) files, matched by file stem")
    p.add_argument("--root", required=True)
    p.add_argument("--rgb", required=True, help="glob under root, e.g. 'rgb/*.png'")
    p.add_argument("--depth", required=True, help="glob under root, e.g. 'depth/*.png' (uint16 PNG)")
    p.add_argument("--depth-scale", type=float, required=True, help="metres per depth unit, e.g. 0.001")
    p.add_argument("--depth-encoding", choices=depth_units.DEPTH_ENCODINGS, default="plain",
                   help="sunrgbd: SUN RGB-D's bit-rotated millimetres")
    p.add_argument("--label", help="glob of label PNGs under root")
    p.add_argument("--label-set", help="name of the labels' class set, e.g. nyu40")
    p.add_argument("--labels-one-based", action="store_true", help="labels are 1..K with 0 = unlabelled")
    p.add_argument("--intrinsics", type=_floats, help="fx,fy,cx,cy")
    p.add_argument("--source", default="folder", help="source name stored in each record")

    p = add("nyu-mat", "NYU Depth V2 labeled set (nyu_depth_v2_labeled.mat, v7.3; depth in metres)")
    p.add_argument("--mat", required=True)
    p.add_argument("--label-map", help="894 -> K class mapping (.json/.npy/.txt, 1-based targets)")
    p.add_argument("--label-set", default="nyu40", help="name of the mapped class set (nyu40, nyu13)")

    p = add("sunrgbd", "SUN RGB-D (SUNRGBD/{split}/color, {split}_depth[_raw]; bit-rotated millimetres)")
    p.add_argument("--root", required=True, help="the SUNRGBD folder")
    p.add_argument("--split", default="train")
    p.add_argument("--raw-depth", action="store_true", help="use *_depth_raw (with holes)")

    p = add("scannet", "ScanNet exported frames (color/*.jpg, depth/*.png mm, label-filt/*.png)")
    p.add_argument("--root", required=True, help="a scene folder, or a folder of scene folders")
    p.add_argument("--label-map", help="scannetv2-labels.combined.tsv")
    p.add_argument("--label-column", default="nyu40id")
    p.add_argument("--label-set", default="nyu40")

    p = add("tum", "a TUM RGB-D sequence (rgb.txt, depth.txt; depth / 5000 = metres)")
    p.add_argument("--root", required=True)
    p.add_argument("--max-difference", type=float, default=0.02, help="seconds, for association")
    p.add_argument("--intrinsics", type=_floats, help="fx,fy,cx,cy")

    p = add("procedural", "procedural RGB-D rooms (the demo data set)", reads_depth=False)
    p.add_argument("--num-frames", type=int, required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth-noise", action="store_true", help="sensor-like noise and holes")
    p.add_argument("--style", choices=procedural.STYLES, default="rooms",
                   help="rooms: eye-level views of furnished rooms; varied: any camera pose, random colours "
                        "and textures, cluttered (docs/data.md)")
    p.add_argument("--workers", type=int, default=None)
    return parser


def main(argv=None) -> int:
    """Run one conversion; bad input (RecordError) is printed as one line, and the exit status is 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        paths = convert(args)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def convert(args: argparse.Namespace) -> list[str]:
    """The conversion the parsed arguments ask for; returns the shard paths."""
    skip_log = SkipLog() if args.skip_bad else None
    if args.command == "procedural":
        return procedural.write_procedural_dataset(
            args.out,
            args.num_frames,
            args.size,
            args.seed,
            args.num_shards,
            args.format,
            args.depth_noise,
            args.workers,
            prefix=args.prefix,
            style=args.style,
            overwrite=args.overwrite,
        )
    limits = args.plausible_depth
    if args.command == "folder":
        examples = sources.folder_examples(
            args.root,
            args.rgb,
            args.depth,
            args.depth_scale,
            label_pattern=args.label,
            label_set=args.label_set,
            labels_one_based=args.labels_one_based,
            depth_encoding=args.depth_encoding,
            intrinsics=args.intrinsics,
            source=args.source,
            depth_limits=limits,
            skip_log=skip_log,
        )
        where = args.root
    elif args.command == "nyu-mat":
        examples = sources.nyu_mat_examples(
            args.mat, label_map=args.label_map, label_set=args.label_set, depth_limits=limits, skip_log=skip_log
        )
        where = args.mat
    elif args.command == "sunrgbd":
        examples = sources.sunrgbd_examples(
            args.root, args.split, args.raw_depth, depth_limits=limits, skip_log=skip_log
        )
        where = args.root
    elif args.command == "scannet":
        examples = sources.scannet_examples(
            args.root,
            label_map=args.label_map,
            label_column=args.label_column,
            label_set=args.label_set,
            depth_limits=limits,
            skip_log=skip_log,
        )
        where = args.root
    else:
        examples = sources.tum_examples(
            args.root,
            max_difference=args.max_difference,
            intrinsics=args.intrinsics,
            depth_limits=limits,
            skip_log=skip_log,
        )
        where = args.root
    return write_example_shards(
        examples,
        args.out,
        args.prefix,
        args.num_shards,
        args.format,
        source_path=where,
        skip_log=skip_log,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(main())
