"""Conversion throughput: `python benchmarks/convert_speed.py [--frames 200] [--workers 1 2]`.

Writes a ScanNet-layout scene of synthetic frames shaped as ScanNet's SensReader export (1296x968
colour JPEG, 640x480 millimetre depth PNG, label-filt PNG, the label tsv), then converts it with
`python -m mmcmae_jax.data.convert scannet` (in this process) for each --workers value and prints the
wall-clock frames/s, the frames/s per core (CPU time of this process and its workers), the speed-up
over the first --workers value, and the core-hours ScanNet's 2.5 M frames would take at that rate.
Every run must write the same records. Run it with nothing else on the machine: wall time is shared.
"""

import argparse
import glob
import os
import resource
import tempfile
import time

import numpy as np
from PIL import Image

from mmcmae_jax.data import convert, records

SCANNET_FRAMES = 2_500_000


def smooth_field(rng, height, width, cells=(12, 16)):
    """A random low-frequency field in [0, 1], so the JPEG and PNG sizes are those of a room, not noise."""
    small = rng.random(cells).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def write_scene(root: str, frames: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    scene = os.path.join(root, "scene0000_00")
    for sub in ("color", "depth", "label-filt", "intrinsic"):
        os.makedirs(os.path.join(scene, sub))
    for i in range(frames):
        colour = np.stack([smooth_field(rng, 968, 1296) for _ in range(3)], -1)
        colour = colour * 200 + rng.normal(0, 6, colour.shape)
        Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8)).save(
            os.path.join(scene, "color", f"{i}.jpg"), quality=90)
        depth = (500 + 3500 * smooth_field(rng, 480, 640)).astype(np.uint16)
        depth[rng.random(depth.shape) < 0.05] = 0  # sensor holes
        Image.fromarray(depth).save(os.path.join(scene, "depth", f"{i}.png"))
        label = (1 + 39 * smooth_field(rng, 968, 1296)).astype(np.uint16)
        Image.fromarray(label).save(os.path.join(scene, "label-filt", f"{i}.png"))
    np.savetxt(os.path.join(scene, "intrinsic", "intrinsic_depth.txt"),
               np.array([[577.6, 0, 319.5, 0], [0, 578.7, 239.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    with open(os.path.join(root, "labels.tsv"), "w") as f:
        f.write("id\traw_category\tnyu40id\n" + "".join(f"{k}\tclass{k}\t{k}\n" for k in range(1, 41)))
    return root


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the conversion's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_scene(os.path.join(tmp, "scannet"), args.frames)
        print(f"{args.frames} synthetic ScanNet frames (1296x968 JPEG colour, 640x480 depth, labels); "
              f"{os.cpu_count()} cores")
        reference, first = None, None
        for workers in args.workers:
            out = os.path.join(tmp, f"out{workers}")
            wall, cpu = time.perf_counter(), cpu_seconds()
            status = convert.main(["scannet", "--root", root, "--label-map", os.path.join(root, "labels.tsv"),
                                   "--out", out, "--num-shards", "4", "--workers", str(workers)])
            wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
            if status:
                raise SystemExit(f"the conversion with --workers {workers} failed")
            written = [list(records.read_records(p)) for p in sorted(glob.glob(os.path.join(out, "*")))]
            reference = reference or written
            if written != reference:
                raise SystemExit(f"--workers {workers} wrote other records than --workers {args.workers[0]}")
            fps, per_core = args.frames / wall, args.frames / cpu
            first = first or fps
            print(f"--workers {workers}: {fps:6.1f} frames/s, {per_core:6.1f} frames/s per core, speed-up "
                  f"{fps / first:4.2f}x; ScanNet's 2.5 M frames: {SCANNET_FRAMES / per_core / 3600:6.1f} core-hours, "
                  f"{SCANNET_FRAMES / fps / 3600:6.1f} h at this speed")


if __name__ == "__main__":
    main()
