"""`convert tum`: a TUM RGB-D sequence, colour and depth paired by nearest timestamp."""

from __future__ import annotations

import os
import re

from mmcmae_jax.data import depth_units, schema
from mmcmae_jax.data.errors import RecordError
from mmcmae_jax.data.sources.images import check_same_size, read_depth_png, read_rgb
from mmcmae_jax.data.sources.source import Frames, Source, guarded, intrinsics_argument


def _read_list(path: str) -> list[tuple[float, str]]:
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


def examples(
    root: str,
    *,
    max_difference: float = 0.02,
    intrinsics=None,
    depth_limits: depth_units.PlausibleDepth = depth_units.PlausibleDepth(),
    skip_log=None,
) -> Frames:
    """A TUM RGB-D sequence: rgb.txt and depth.txt ('timestamp filename'), depth uint16 / 5000 m."""
    rgb_list = _read_list(os.path.join(root, "rgb.txt"))
    depth_list = _read_list(os.path.join(root, "depth.txt"))
    pairs = associate_by_timestamp(rgb_list, depth_list, max_difference)
    if not pairs:
        raise RecordError(os.path.join(root, "rgb.txt"), f"no rgb/depth pair within {max_difference} s")

    def one(pair):
        i, j = pair
        rgb_path, depth_path = (os.path.join(root, rgb_list[i][1]), os.path.join(root, depth_list[j][1]))
        rgb, rgb_bytes, rgb_format = read_rgb(rgb_path)
        depth, depth_png = read_depth_png(depth_path)
        check_same_size(rgb, depth, rgb_path, depth_path)
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


def _add_arguments(p):
    p.add_argument("--root", required=True)
    p.add_argument("--max-difference", type=float, default=0.02, help="seconds, for association")
    p.add_argument("--intrinsics", type=intrinsics_argument, help="fx,fy,cx,cy")


def _frames(args, skip_log):
    return examples(
        args.root,
        max_difference=args.max_difference,
        intrinsics=args.intrinsics,
        depth_limits=args.plausible_depth,
        skip_log=skip_log,
    )


SOURCE = Source(
    name="tum",
    help="a TUM RGB-D sequence (rgb.txt, depth.txt; depth / 5000 = metres)",
    add_arguments=_add_arguments,
    frames=_frames,
)
