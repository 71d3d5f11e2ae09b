"""`convert sunrgbd`: SUN RGB-D, its colour and (bit-rotated millimetre) depth images of one split."""

from __future__ import annotations

from mmcmae_jax.data import depth_units
from mmcmae_jax.data.sources import folder
from mmcmae_jax.data.sources.source import Source


def examples(
    root: str,
    split: str = "train",
    raw_depth: bool = False,
    depth_limits: depth_units.PlausibleDepth = depth_units.PlausibleDepth(),
    skip_log=None,
):
    """SUN RGB-D as laid out in SUNRGBD/{split}/color/N.png and {split}_depth[_raw]/00000N.png."""
    return folder.examples(
        root,
        f"{split}/color/*",
        f"{split}_depth_raw/*.png" if raw_depth else f"{split}_depth/*.png",
        depth_units.SOURCE_SCALES["sunrgbd"],
        depth_encoding="sunrgbd",
        source="sunrgbd",
        depth_limits=depth_limits,
        skip_log=skip_log,
    )


def _add_arguments(p):
    p.add_argument("--root", required=True, help="the SUNRGBD folder")
    p.add_argument("--split", default="train")
    p.add_argument("--raw-depth", action="store_true", help="use *_depth_raw (with holes)")


def _frames(args, skip_log):
    return examples(args.root, args.split, args.raw_depth, depth_limits=args.plausible_depth, skip_log=skip_log)


SOURCE = Source(
    name="sunrgbd",
    help="SUN RGB-D (SUNRGBD/{split}/color, {split}_depth[_raw]; bit-rotated millimetres)",
    add_arguments=_add_arguments,
    frames=_frames,
)
