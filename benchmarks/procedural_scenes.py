"""Time to make a procedural set, and how much of it the layout alone predicts.

    python benchmarks/procedural_scenes.py [--num-frames N --size 128 --style rooms]
    python benchmarks/procedural_scenes.py --num-frames 2000 --size 64 --style varied --describe

Writes N frames (default 10,000) at --size px into --shards ArrayRecord shards with all cores and
prints frames, seconds, frames/s. The target: 10,000 frames at 128x128 in under 2 minutes on 2 cores.
--describe also prints each class's share of the pixels and the image-blind predictor (per pixel, the
median depth and the most common class of the first half of the frames) scored on the second half.
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
    parser.add_argument("--style", default="rooms", choices=procedural.STYLES)
    parser.add_argument("--describe", action="store_true", help="class shares and the image-blind predictor")
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
            style=args.style,
        )
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        size_mb = sum(os.path.getsize(p) for p in paths) / 1e6
        if args.describe:
            describe(out, args.size)
    print(
        f"procedural: {args.num_frames} frames at {args.size}x{args.size}, style {args.style} "
        f"(depth_noise={args.depth_noise}, {args.workers or os.cpu_count()} workers): "
        f"{seconds:.1f} s wall, {args.num_frames / seconds:.0f} frames/s, {size_mb:.0f} MB; "
        f"{cpu:.1f} CPU-seconds in all ({1000 * cpu / args.num_frames:.1f} ms per frame per core)"
    )


def describe(path: str, size: int):
    """Class shares of the set in `path`, and the image-blind predictor of its first half on its second."""
    from mmcmae_jax.data import default_data_config
    from mmcmae_jax.transfer import probe
    data = default_data_config()
    data.path = path
    frames = probe.load_frames(data, size)
    shares = probe.class_shares(frames.label, procedural.CLASS_NAMES)
    objects = sum(v for k, v in shares.items() if k not in ("floor", "wall", "ceiling"))
    print("class shares: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()) + f"; objects {objects:.1%}")
    half = len(frames.rgb) // 2
    train, evaluation = (probe.Frames(*(a[:half] for a in frames)), probe.Frames(*(a[half:] for a in frames)))
    blind = probe.image_blind_metrics(train, evaluation, procedural.CLASS_NAMES)
    print(f"image-blind predictor ({half} frames -> {len(evaluation.rgb)} others): "
          + ", ".join(f"{k} {blind['depth'][k]:.3f}" for k in ("delta1", "abs_rel", "rmse")) + ", "
          + ", ".join(f"{k} {blind['segmentation'][k]:.3f}" for k in ("miou", "object_miou", "pixel_acc")))


if __name__ == "__main__":
    main()
