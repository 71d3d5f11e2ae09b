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
import numpy as np


def frames(count=32, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [dict(rgb=rng.normal(size=(size, size, 3)).astype(np.float32),
                 depth=rng.normal(size=(size, size, 1)).astype(np.float32),
                 depth_valid=(rng.random((size, size, 1)) > 0.1).astype(np.float32)) for _ in range(count)]


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
    from mmcmae_jax.config import training_config
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.train.trainer import train

    config = training_config(args.stage)
    config.model.update(variant="64x2x2/8", image_size=32, proj_hidden=64, proj_dim=32,
                        decoder_depth=1, decoder_width=32, decoder_heads=2)
    config.objective.weights.distill = 0.0  # no stage-1 teacher in this tiny run
    config.update(batch_size=args.batch, total_steps=args.steps, log_every=1, checkpoint_every=args.checkpoint_every,
                  image_every=0, async_checkpoint=args.async_checkpoint)
    config.optim.warmup_steps = 1
    config.optim.lr = 1e-3
    config.mesh.fsdp = args.fsdp
    config.data.path = "in-memory"
    dataset = (grain.MapDataset.source(frames()).shuffle(seed=0).repeat().batch(args.batch, drop_remainder=True)
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
