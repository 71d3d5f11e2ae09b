"""Input-pipeline throughput: `python benchmarks/input_pipeline.py`.

For ArrayRecord and TFRecord shards of procedural frames, and for output sizes 224 and 128 px, runs
the training pipeline (decode, random resized crop, flip, colour jitter, depth standardisation,
batching) in this process and prints frames/s and frames/s per core (process CPU time, so the figure
is per core whatever the thread count).
"""

import argparse
import os
import tempfile
import time

from mmcmae_jax.data import data_options, pipeline, procedural


def measure(paths, image_size, batch_size, batches, read_threads):
    it = pipeline.make_pipeline(
        paths, data_options(read_threads=read_threads), batch_size=batch_size, image_size=image_size, seed=0,
        train=True, shard_index=0, shard_count=1,
    )
    next(it)  # warm-up: files opened, threads started
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    frames = batches * batch_size
    return frames / wall, frames / cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=512, help="frames in the test shards")
    parser.add_argument("--source-size", type=int, default=256, help="size of the stored frames")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--read-threads", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for fmt in ("array_record", "tfrecord"):
            paths = procedural.write_procedural_dataset(
                os.path.join(root, fmt),
                args.frames,
                args.source_size,
                seed=0,
                num_shards=4,
                format=fmt,
                depth_noise=True,
            )
            for size in (224, 128):
                fps, per_core = measure(paths, size, args.batch_size, args.batches, args.read_threads)
                print(
                    f"{fmt:12s} {args.source_size}px stored -> {size}px: {fps:7.1f} frames/s, "
                    f"{per_core:7.1f} frames/s per core"
                )


if __name__ == "__main__":
    main()
