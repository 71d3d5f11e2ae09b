"""`convert folder`: a folder of paired RGB / depth (/ label) files, matched by file stem."""

from __future__ import annotations

import glob
import os

from mmcmae_jax.data import depth_units, schema
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.sources.images import (
    check_same_size,
    one_based_labels,
    read_depth_png,
    read_image,
    read_rgb,
)
from mmcmae_jax.data.sources.source import Frames, Source, guarded, intrinsics_argument


def _stem_key(path: str) -> str:
    """Pairing key of a frame file: its name without extension and leading zeros of a number."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return str(int(stem)) if stem.isdigit() else stem


def _files_by_key(root: str, pattern: str) -> dict[str, str]:
    return {_stem_key(p): p for p in sorted(glob.glob(os.path.join(root, pattern)))}


def examples(
    root: str,
    rgb_pattern: str,
    depth_pattern: str,
    depth_scale: float,
    *,
    label_pattern: str | None = None,
    label_set: str | None = None,
    labels_one_based: bool = False,
    depth_encoding: str = "plain",
    intrinsics=None,
    source: str = "folder",
    depth_limits: depth_units.PlausibleDepth = depth_units.PlausibleDepth(),
    skip_log=None,
) -> Frames:
    """Paired files under root, matched by file stem (leading zeros ignored: 0001.png ~ 000001.png).

    depth_encoding "plain": the 16-bit PNG holds units of depth_scale metres (its bytes are stored as
    they are); "sunrgbd": SUN RGB-D's rotated bits (then depth_scale is 0.001). Depth outside
    depth_limits is an error. A frame without a label file gets no label.
    """
    if depth_encoding not in depth_units.DEPTH_ENCODINGS:
        raise ValueError(f"depth encoding must be one of {depth_units.DEPTH_ENCODINGS}, got {depth_encoding!r}")
    rgb_files = _files_by_key(root, rgb_pattern)
    if not rgb_files:
        raise RecordError(os.path.join(root, rgb_pattern), "pattern matches no rgb files")
    depth_files = _files_by_key(root, depth_pattern)
    label_files = _files_by_key(root, label_pattern) if label_pattern else {}

    def one(item):
        key, rgb_path = item
        if key not in depth_files:
            raise RecordError(rgb_path, f"no depth file matching {depth_pattern!r} for frame {key}")
        depth_path = depth_files[key]
        rgb, rgb_bytes, rgb_format = read_rgb(rgb_path)
        raw, depth_png = read_depth_png(depth_path)
        check_same_size(rgb, raw, rgb_path, depth_path)
        units = depth_units.decode_raw(raw, depth_encoding)
        depth_units.check_plausible(units, depth_scale, depth_path, depth_limits, raw=raw, encoding=depth_encoding)
        label = None
        if key in label_files:
            label = read_image(label_files[key])
            check_same_size(rgb, label, rgb_path, label_files[key])
            label = one_based_labels(label) if labels_one_based else label
        return schema.example_from_encoded(
            rgb_bytes,
            rgb_format,
            depth_png if depth_encoding == "plain" else schema.encode_png(units),
            depth_scale,
            frame_id=key,
            source=source,
            label=label,
            label_set=label_set if label is not None else None,
            intrinsics=intrinsics,
        )

    return guarded(rgb_files.items(), one, skip_log)


def _add_arguments(p):
    p.add_argument("--root", required=True)
    p.add_argument("--rgb", required=True, help="glob under root, e.g. 'rgb/*.png'")
    p.add_argument("--depth", required=True, help="glob under root, e.g. 'depth/*.png' (uint16 PNG)")
    p.add_argument("--depth-scale", type=float, required=True, help="metres per depth unit, e.g. 0.001")
    p.add_argument("--depth-encoding", choices=depth_units.DEPTH_ENCODINGS, default="plain",
                   help="sunrgbd: SUN RGB-D's bit-rotated millimetres")
    p.add_argument("--label", help="glob of label PNGs under root")
    p.add_argument("--label-set", help="name of the labels' class set, e.g. nyu40")
    p.add_argument("--labels-one-based", action="store_true", help="labels are 1..K with 0 = unlabelled")
    p.add_argument("--intrinsics", type=intrinsics_argument, help="fx,fy,cx,cy")
    p.add_argument("--source", default="folder", help="source name stored in each record")


def _frames(args, skip_log):
    return examples(
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
        depth_limits=args.plausible_depth,
        skip_log=skip_log,
    )


SOURCE = Source(
    name="folder",
    help="a folder of paired RGB / depth (/ label) files, matched by file stem",
    add_arguments=_add_arguments,
    frames=_frames,
)
