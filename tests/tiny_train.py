"""A tiny training run on in-memory frames, for the trainer's multi-device and multi-process tests.

    python tests/tiny_train.py --stage 1 --steps 4 --fsdp 2 --out losses.json [--process_id I --num_processes N --port P]

Every process reads its own slice of the same global batches, as a data loader sharded per process
does, and process 0 writes the logged losses as JSON.
"""
import argparse
import json
import sys
import time

import grain


def process_slice(batch, index, count):
    per = len(batch["rgb"]) // count
    return {k: v[index * per:(index + 1) * per] for k, v in batch.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--checkpoint_every", type=int, default=100)
    parser.add_argument("--async_checkpoint", action="store_true")
    parser.add_argument("--seconds_per_batch", type=float, default=0.0,
                        help="slow input down, so a test can interrupt the run mid-way")
    args = parser.parse_args()

    import jax
    if args.num_processes > 1:
        jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    from conftest import random_frames, tiny_config  # this script's folder is tests/
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.train.trainer import train

    config = tiny_config(args.stage)
    stacked = random_frames(batch=32, valid_fraction=0.9)
    frames = [{k: v[i] for k, v in stacked.items()} for i in range(32)]
    config.objective.weights.distill = 0.0  # no stage-1 teacher in this tiny run
    config.update(batch_size=args.batch, total_steps=args.steps, log_every=1, checkpoint_every=args.checkpoint_every,
                  image_every=0, async_checkpoint=args.async_checkpoint)
    config.optim.warmup_steps = 1
    config.optim.lr = 1e-3
    config.mesh.fsdp = args.fsdp
    config.data.path = "in-memory"
    dataset = (grain.MapDataset.source(frames).shuffle(seed=0).repeat().batch(args.batch, drop_remainder=True)
               .map(lambda b: process_slice(b, args.process_id, args.num_processes)))
    if args.seconds_per_batch:
        dataset = dataset.map(lambda b: time.sleep(args.seconds_per_batch) or b)
    result = train(config, args.workdir, iter(dataset.to_iter_dataset()), make_objective(config))
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump({"devices": jax.device_count(), "history": result.history, "preempted": result.preempted}, f)
    return 143 if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
