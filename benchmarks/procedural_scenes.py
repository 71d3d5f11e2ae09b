"""Time to make the procedural demo set: `python benchmarks/procedural_scenes.py [--num-frames N]`.

Writes N frames (default 10,000) at --size px into --shards ArrayRecord shards with all cores and
prints frames, seconds, frames/s. The target: 10,000 frames at 128x128 in under 2 minutes on 2 cores.
"""

import argparse
import os
import resource
import tempfile
import time

from mmcmae_jax.data import procedural


def _cpu_seconds():
    """CPU time of this process and its finished workers: a figure that other load cannot inflate."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-frames", type=int, default=10000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--depth-noise", action="store_true")
    parser.add_argument("--format", default="array_record", choices=("array_record", "tfrecord"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        paths = procedural.write_procedural_dataset(
            out,
            args.num_frames,
            args.size,
            seed=0,
            num_shards=args.shards,
            format=args.format,
            depth_noise=args.depth_noise,
            num_workers=args.workers,
        )
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        size_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    print(
        f"procedural: {args.num_frames} frames at {args.size}x{args.size} "
        f"(depth_noise={args.depth_noise}, {args.workers or os.cpu_count()} workers): "
        f"{seconds:.1f} s wall, {args.num_frames / seconds:.0f} frames/s, {size_mb:.0f} MB; "
        f"{cpu:.1f} CPU-seconds in all ({1000 * cpu / args.num_frames:.1f} ms per frame per core)"
    )


if __name__ == "__main__":
    main()
