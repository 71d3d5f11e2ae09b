"""Input-pipeline throughput and the bytes it hands the device: `python benchmarks/input_pipeline.py`.

For ArrayRecord and TFRecord shards of procedural frames stored at 256 px, at output sizes 224 and 128
px, runs the training pipeline in this process and prints frames/s and frames/s per core (process CPU
time, so the figure is per core whatever the thread count), for:
  compact     what the trainer reads for pre-training: decode, random resized crop, flip, the colour
              jitter drawn; uint8 RGB and uint16 depth out (device_batch.py), normalised on the device;
  host float  the reference, measured in the same run: labels decoded too, and every model field made
              on the host in float32 (device_batch.prepare_batch_numpy: colour jitter, normalisation,
              per-frame depth standardisation), as the pipeline did before the compact contract.
Bytes per frame are those of the fields a pre-training step reads, as sent to the device.
"""

import argparse
import os
import tempfile
import time

from mmcmae_jax.data import data_options, pipeline, procedural
from mmcmae_jax.device_batch import MODEL_FIELDS, host_fields, prepare_batch_numpy
from mmcmae_jax.modalities import BATCH_KEYS

PRETRAIN_HOST_FIELDS = host_fields(BATCH_KEYS)


def measure(paths, image_size, batch_size, batches, read_threads, host_float: bool):
    """(frames/s, frames/s per core, bytes per frame sent to the device)."""
    options = data_options(read_threads=read_threads)
    it = pipeline.make_pipeline(paths, options, batch_size=batch_size, image_size=image_size, seed=0, train=True,
                                shard_index=0, shard_count=1, labels=host_float)

    def next_batch():
        batch = next(it)
        if host_float:
            return prepare_batch_numpy(batch, MODEL_FIELDS, options.depth_trim)
        return {k: batch[k] for k in PRETRAIN_HOST_FIELDS}

    next_batch()  # warm-up: files opened, threads started
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next_batch()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    frames = batches * batch_size
    sent = BATCH_KEYS if host_float else PRETRAIN_HOST_FIELDS
    return frames / wall, frames / cpu, sum(batch[k].nbytes for k in sent) / batch_size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=512, help="frames in the test shards")
    parser.add_argument("--source-size", type=int, default=256, help="size of the stored frames")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--read-threads", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128])
    parser.add_argument("--formats", nargs="+", default=["array_record", "tfrecord"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for fmt in args.formats:
            paths = procedural.write_procedural_dataset(os.path.join(root, fmt), args.frames, args.source_size,
                                                        seed=0, num_shards=4, format=fmt, depth_noise=True)
            for size in args.sizes:
                rows = {name: measure(paths, size, args.batch_size, args.batches, args.read_threads, host_float)
                        for name, host_float in (("host float", True), ("compact", False))}
                for name, (fps, per_core, nbytes) in rows.items():
                    print(f"{fmt:12s} {args.source_size}px -> {size}px {name:10s}: {fps:7.1f} frames/s, "
                          f"{per_core:7.1f} frames/s per core, {nbytes / 1024:7.1f} KiB per frame", flush=True)
                ref, new = rows["host float"], rows["compact"]
                print(f"{fmt:12s} {args.source_size}px -> {size}px compact / host float: {new[1] / ref[1]:.2f}x "
                      f"frames/s per core, {ref[2] / new[2]:.2f}x fewer bytes per frame", flush=True)


if __name__ == "__main__":
    main()
