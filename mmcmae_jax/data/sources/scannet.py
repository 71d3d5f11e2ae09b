"""`convert scannet`: ScanNet frames exported by its SensReader, with the 2D label export."""

from __future__ import annotations

import csv
import glob
import os

import numpy as np
from PIL import Image

from mmcmae_jax.data import depth_units, schema
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.sources.images import one_based_labels, read_depth_png, read_image, read_rgb
from mmcmae_jax.data.sources.source import Frames, Source, guarded


def _label_map(tsv_path: str, column: str) -> dict[int, int]:
    with open(tsv_path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or column not in rows[0] or "id" not in rows[0]:
        raise RecordError(tsv_path, f"needs columns 'id' and {column!r}")
    return {int(r["id"]): int(r[column] or 0) for r in rows}


def _frame_number(path: str):
    """Sort key of an exported frame: by number (2.png before 10.png), other names after."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def examples(
    root: str,
    *,
    label_map: str | None = None,
    label_column: str = "nyu40id",
    label_set: str = "nyu40",
    depth_limits: depth_units.PlausibleDepth = depth_units.PlausibleDepth(),
    skip_log=None,
) -> Frames:
    """ScanNet frames exported by its SensReader (and the 2D label export), per scene:
    color/N.jpg, depth/N.png (uint16 mm), label-filt/N.png (ScanNet ids), intrinsic/intrinsic_depth.txt.

    The colour JPEG and the depth PNG are stored as their own bytes. Colour (1296x968) is resized to the
    depth size (640x480) when it is read (the record says so), labels when converted, so the three
    align, as ScanNet's own 2D benchmark does. Labels need the mapping tsv (ScanNet id -> nyu40id).
    """
    scenes = sorted(d for d in glob.glob(os.path.join(root, "*")) if os.path.isdir(os.path.join(d, "depth")))
    if os.path.isdir(os.path.join(root, "depth")):
        scenes = [root]
    if not scenes:
        raise RecordError(root, "no ScanNet scene folder (with depth/) found")
    mapping = _label_map(label_map, label_column) if label_map else None
    scene_info = {}  # scene folder -> (name, depth intrinsics or None)
    items = []
    for scene in scenes:
        intr_path = os.path.join(scene, "intrinsic", "intrinsic_depth.txt")
        intr = None
        if os.path.exists(intr_path):
            m = np.loadtxt(intr_path)
            intr = (m[0, 0], m[1, 1], m[0, 2], m[1, 2])
        scene_info[scene] = (os.path.basename(os.path.normpath(scene)), intr)
        items += [(scene, p) for p in sorted(glob.glob(os.path.join(scene, "depth", "*.png")), key=_frame_number)]

    def one(item):
        scene, depth_path = item
        name, intr = scene_info[scene]
        key = os.path.splitext(os.path.basename(depth_path))[0]
        depth, depth_png = read_depth_png(depth_path)
        scale = depth_units.SOURCE_SCALES["scannet"]
        depth_units.check_plausible(depth, scale, depth_path, depth_limits, raw=depth)
        rgb, rgb_bytes, rgb_format = read_rgb(os.path.join(scene, "color", key + ".jpg"))
        size = (depth.shape[1], depth.shape[0])
        label = None
        label_path = os.path.join(scene, "label-filt", key + ".png")
        if mapping is not None and os.path.exists(label_path):
            raw = read_image(label_path)
            if raw.shape != depth.shape:
                raw = np.asarray(Image.fromarray(raw.astype(np.int32)).resize(size, Image.NEAREST))
            lut = np.zeros(max(max(mapping) + 1, int(raw.max()) + 1), np.int64)
            for k, v in mapping.items():
                lut[k] = v
            label = one_based_labels(lut[raw])
        return schema.example_from_encoded(
            rgb_bytes,
            rgb_format,
            depth_png,
            scale,
            frame_id=f"{name}/{key}",
            source="scannet",
            label=label,
            label_set=label_set if label is not None else None,
            intrinsics=intr,
            resize_rgb_to_depth=rgb.shape[:2] != depth.shape,
        )

    return guarded(items, one, skip_log)


def _add_arguments(p):
    p.add_argument("--root", required=True, help="a scene folder, or a folder of scene folders")
    p.add_argument("--label-map", help="scannetv2-labels.combined.tsv")
    p.add_argument("--label-column", default="nyu40id")
    p.add_argument("--label-set", default="nyu40")


def _frames(args, skip_log):
    return examples(
        args.root,
        label_map=args.label_map,
        label_column=args.label_column,
        label_set=args.label_set,
        depth_limits=args.plausible_depth,
        skip_log=skip_log,
    )


SOURCE = Source(
    name="scannet",
    help="ScanNet exported frames (color/*.jpg, depth/*.png mm, label-filt/*.png)",
    add_arguments=_add_arguments,
    frames=_frames,
)
