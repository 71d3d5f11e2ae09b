"""Readers of each source's on-disk layout, yielding RGBDExample records.

Depth units go through depth_units (the one place they are decoded); labels become class indices
0..K-1 with 255 = unlabelled. Every missing or unreadable input raises RecordError naming the file.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
from typing import Iterator

import numpy as np
from PIL import Image

from mmcmae_jax.data import depth_units, schema
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.schema import IGNORE_LABEL

# NYU Depth V2 RGB camera (the dataset toolbox's camera_params.m).
NYU_INTRINSICS = (518.8579, 519.4696, 325.5824, 253.7362)


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


def read_bytes(path: str) -> bytes:
    """A file's bytes; a missing or unreadable file raises RecordError naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RecordError(path, "file does not exist") from None
    except OSError as e:
        raise RecordError(path, f"cannot read file ({e})") from None


def _open_image(path: str, data: bytes) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Exception as e:  # PIL raises several types for corrupt data.
        raise RecordError(path, f"cannot decode image ({type(e).__name__}: {e})") from None


def read_image(path: str) -> np.ndarray:
    """Pixels of an image file; a missing or undecodable file raises RecordError naming it."""
    return np.asarray(_open_image(path, read_bytes(path)))


def read_rgb(path: str) -> tuple[np.ndarray, bytes, str]:
    """A colour image's pixels (uint8 (H, W, 3)) and what a record stores of it: (bytes, format).

    A JPEG or PNG of 8-bit RGB or grey is stored as its own bytes, never decoded and re-encoded (grey
    becomes RGB when read); palette, grey with alpha, RGBA, CMYK and other formats are converted to RGB
    and stored as PNG. An image of more than 8 bits per channel raises RecordError naming the file.
    """
    data = read_bytes(path)
    im = _open_image(path, data)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise RecordError(path, f"rgb image has {im.mode} pixels; colour images need 8 bits per channel")
    rgb = np.asarray(im.convert("RGB"))
    stored_format = {"JPEG": "jpeg", "PNG": "png"}.get(im.format)
    if stored_format is not None and im.mode in ("RGB", "L"):
        return rgb, data, stored_format
    return rgb, schema.encode_png(rgb), "png"


def read_depth_png(path: str) -> tuple[np.ndarray, bytes]:
    """A depth image's uint16 values and the file's bytes; anything but a one-channel 16-bit PNG (an
    8-bit PNG, a colour image, a PGM) raises RecordError naming the file."""
    data = read_bytes(path)
    im = _open_image(path, data)
    raw = np.asarray(im)
    if im.format == "PNG" and im.mode.startswith("I;16"):
        return raw.astype(np.uint16), data
    what = f"a {im.format or 'unknown'} image of mode {im.mode}"
    if im.mode in ("L", "P", "1"):
        what += " (8 bits: at most 255 depth units)"
    hint = ""
    if raw.ndim == 2 and raw.dtype.itemsize > 1 and raw.size and 0 <= raw.min() and raw.max() <= 65535:
        disparity = depth_units.kinect_disparity(raw.astype(np.uint16))
        hint = f"; its values look like {disparity}" if disparity else ""
    raise RecordError(path, f"depth must be a one-channel 16-bit PNG; this is {what}{hint}")


def one_based_labels(label: np.ndarray) -> np.ndarray:
    """Labels stored 1..K with 0 = unlabelled (NYU, ScanNet nyu40) -> 0..K-1 with 255 = unlabelled."""
    label = np.asarray(label).astype(np.int64)
    return np.where(label > 0, label - 1, IGNORE_LABEL).astype(np.uint8)


def _check_same_size(rgb, depth, rgb_path, depth_path):
    if rgb.shape[:2] != depth.shape[:2]:
        raise RecordError(
            depth_path, f"depth size {depth.shape[:2]} differs from rgb size {rgb.shape[:2]} of {rgb_path}"
        )


def _stem_key(path: str) -> str:
    """Pairing key of a frame file: its name without extension and leading zeros of a number."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return str(int(stem)) if stem.isdigit() else stem


def _files_by_key(root: str, pattern: str) -> dict[str, str]:
    return {_stem_key(p): p for p in sorted(glob.glob(os.path.join(root, pattern)))}


def folder_examples(
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
) -> Iterator[schema.RGBDExample]:
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
        _check_same_size(rgb, raw, rgb_path, depth_path)
        units = depth_units.decode_raw(raw, depth_encoding)
        depth_units.check_plausible(units, depth_scale, depth_path, depth_limits, raw=raw, encoding=depth_encoding)
        label = None
        if key in label_files:
            label = read_image(label_files[key])
            _check_same_size(rgb, label, rgb_path, label_files[key])
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


def sunrgbd_examples(
    root: str,
    split: str = "train",
    raw_depth: bool = False,
    depth_limits: depth_units.PlausibleDepth = depth_units.PlausibleDepth(),
    skip_log=None,
):
    """SUN RGB-D as laid out in SUNRGBD/{split}/color/N.png and {split}_depth[_raw]/00000N.png."""
    return folder_examples(
        root,
        f"{split}/color/*",
        f"{split}_depth_raw/*.png" if raw_depth else f"{split}_depth/*.png",
        depth_units.SOURCE_SCALES["sunrgbd"],
        depth_encoding="sunrgbd",
        source="sunrgbd",
        depth_limits=depth_limits,
        skip_log=skip_log,
    )


def load_label_map(path: str) -> np.ndarray:
    """A class mapping: .json / .txt / .npy array where entry k-1 is the target (1-based, 0 =
    unlabelled) of source class k; NYU's classMapping40.mat-style arrays saved as JSON or NPY."""
    if not os.path.exists(path):
        raise RecordError(path, "label mapping file does not exist")
    if path.endswith(".npy"):
        table = np.load(path)
    elif path.endswith(".json"):
        with open(path) as f:
            table = np.asarray(json.load(f))
    else:
        table = np.loadtxt(path, dtype=np.int64)
    return np.concatenate([[0], np.asarray(table, np.int64).ravel()])  # index 0: unlabelled stays 0


def nyu_mat_examples(
    mat_path: str,
    *,
    label_map: str | None = None,
    label_set: str = "nyu40",
    frames: list[int] | None = None,
    depth_limits: depth_units.PlausibleDepth = depth_units.PlausibleDepth(),
    skip_log=None,
) -> Iterator[schema.RGBDExample]:
    """NYU Depth V2 labeled set (nyu_depth_v2_labeled.mat, MATLAB v7.3 = HDF5).

    MATLAB stores arrays transposed: images (N,3,W,H) uint8, depths (N,W,H) float metres, labels
    (N,W,H) with 894 classes. Labels are kept only with a mapping (e.g. to 40 or 13 classes).
    """
    import h5py

    if not os.path.exists(mat_path):
        raise RecordError(mat_path, "file does not exist")
    mapping = load_label_map(label_map) if label_map else None
    if mapping is None:
        logging.info("%s: no --label-map given, labels are not stored", mat_path)
    scale = depth_units.SOURCE_SCALES["nyu_mat"]
    with h5py.File(mat_path, "r") as f:
        for name in ("images", "depths"):
            if name not in f:
                raise RecordError(mat_path, f"no dataset {name!r}: not the NYU labeled .mat layout")
        n = f["images"].shape[0]

        def one(i):
            rgb = np.ascontiguousarray(f["images"][i].transpose(2, 1, 0)).astype(np.uint8)
            depth = np.asarray(f["depths"][i]).T
            if depth.shape != rgb.shape[:2]:
                raise RecordError(
                    mat_path, f"depth size {depth.shape} differs from rgb size {rgb.shape[:2]}", record=i
                )
            label = None
            if mapping is not None and "labels" in f:
                raw = np.asarray(f["labels"][i]).T.astype(np.int64)
                if raw.max() >= len(mapping):
                    raise RecordError(
                        label_map, f"maps {len(mapping) - 1} classes, frame has class {raw.max()}", record=i
                    )
                label = one_based_labels(mapping[raw])
            units = depth_units.metres_to_units(depth, scale)
            if not units.any():
                raise RecordError(mat_path, "frame has no valid depth", record=i)
            depth_units.check_plausible(units, scale, mat_path, depth_limits, record=i)
            return schema.example_from_arrays(
                rgb,
                units,
                scale,
                frame_id=f"{i + 1:04d}",
                source="nyu_depth_v2",
                label=label,
                label_set=label_set if label is not None else None,
                intrinsics=NYU_INTRINSICS,
            )

        yield from guarded(frames if frames is not None else range(n), one, skip_log)


def _scannet_label_map(tsv_path: str, column: str) -> dict[int, int]:
    with open(tsv_path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or column not in rows[0] or "id" not in rows[0]:
        raise RecordError(tsv_path, f"needs columns 'id' and {column!r}")
    return {int(r["id"]): int(r[column] or 0) for r in rows}


def scannet_examples(
    root: str,
    *,
    label_map: str | None = None,
    label_column: str = "nyu40id",
    label_set: str = "nyu40",
    depth_limits: depth_units.PlausibleDepth = depth_units.PlausibleDepth(),
    skip_log=None,
) -> Iterator[schema.RGBDExample]:
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
    mapping = _scannet_label_map(label_map, label_column) if label_map else None
    for scene in scenes:
        name = os.path.basename(os.path.normpath(scene))
        intr_path = os.path.join(scene, "intrinsic", "intrinsic_depth.txt")
        intr = None
        if os.path.exists(intr_path):
            m = np.loadtxt(intr_path)
            intr = (m[0, 0], m[1, 1], m[0, 2], m[1, 2])

        def one(depth_path, name=name, intr=intr, scene=scene):
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

        yield from guarded(
            sorted(glob.glob(os.path.join(scene, "depth", "*.png")), key=_stem_key_int), one, skip_log
        )


def _stem_key_int(path: str):
    stem = os.path.splitext(os.path.basename(path))[0]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _read_tum_list(path: str) -> list[tuple[float, str]]:
    if not os.path.exists(path):
        raise RecordError(path, "file does not exist")
    entries = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = re.split(r"[\s,]+", line)
            try:
                entries.append((float(parts[0]), parts[1]))
            except (ValueError, IndexError):
                raise RecordError(path, f"line {n} is not 'timestamp filename': {line!r}") from None
    return entries


def associate_by_timestamp(first, second, max_difference: float = 0.02):
    """Greedy nearest-timestamp matching, closest pairs first, each entry used once (the method of
    TUM RGB-D's associate.py)."""
    candidates = sorted(
        (abs(a - b), i, j)
        for i, (a, _) in enumerate(first)
        for j, (b, _) in enumerate(second)
        if abs(a - b) < max_difference
    )
    used_i, used_j, pairs = set(), set(), []
    for _, i, j in candidates:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            pairs.append((i, j))
    return sorted(pairs)


def tum_examples(
    root: str,
    *,
    max_difference: float = 0.02,
    intrinsics=None,
    depth_limits: depth_units.PlausibleDepth = depth_units.PlausibleDepth(),
    skip_log=None,
) -> Iterator[schema.RGBDExample]:
    """A TUM RGB-D sequence: rgb.txt and depth.txt ('timestamp filename'), depth uint16 / 5000 m."""
    rgb_list = _read_tum_list(os.path.join(root, "rgb.txt"))
    depth_list = _read_tum_list(os.path.join(root, "depth.txt"))
    pairs = associate_by_timestamp(rgb_list, depth_list, max_difference)
    if not pairs:
        raise RecordError(os.path.join(root, "rgb.txt"), f"no rgb/depth pair within {max_difference} s")

    def one(pair):
        i, j = pair
        rgb_path, depth_path = (os.path.join(root, rgb_list[i][1]), os.path.join(root, depth_list[j][1]))
        rgb, rgb_bytes, rgb_format = read_rgb(rgb_path)
        depth, depth_png = read_depth_png(depth_path)
        _check_same_size(rgb, depth, rgb_path, depth_path)
        scale = depth_units.SOURCE_SCALES["tum"]
        depth_units.check_plausible(depth, scale, depth_path, depth_limits, raw=depth)
        return schema.example_from_encoded(
            rgb_bytes,
            rgb_format,
            depth_png,
            scale,
            frame_id=f"{rgb_list[i][0]:.6f}",
            source="tum_rgbd",
            intrinsics=intrinsics,
        )

    return guarded(pairs, one, skip_log)
