"""`convert procedural`: the demo's procedural RGB-D rooms (mmcmae_jax/data/procedural.py renders them)."""

from __future__ import annotations

from mmcmae_jax.data import procedural
from mmcmae_jax.data.sources.source import Source


def _add_arguments(p):
    p.add_argument("--num-frames", type=int, required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth-noise", action="store_true", help="sensor-like noise and holes")
    p.add_argument("--style", choices=procedural.STYLES, default="rooms",
                   help="rooms: eye-level views of furnished rooms; varied: any camera pose, random colours "
                        "and textures, cluttered (docs/data.md)")
    p.add_argument("--workers", type=int, default=None)


def _write(args) -> list[str]:
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


SOURCE = Source(
    name="procedural",
    help="procedural RGB-D rooms (the demo data set)",
    add_arguments=_add_arguments,
    write=_write,
)
