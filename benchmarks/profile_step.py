"""Where the train step's time goes: one step of the trainer's compiled step under jax.profiler, its
kernels grouped by the part of the model they belong to.

    python benchmarks/profile_step.py                          # stage 2, ViT-B/16, 224 px, batch 8
    python benchmarks/profile_step.py --stage 1 --variant S/16 --image-size 128
    python benchmarks/profile_step.py --variant 64x2x2/16 --batch 2   # a quick check of the script

Each kernel of the trace is matched to its HLO instruction, whose op_name says where it came from:
the frozen teachers (the stage-1 encoders used for distillation), `rgb_encoder`, `depth_encoder`,
`decoder`, forward or backward (`transpose(...)` in the op_name), and everything else (losses,
masking, optimizer). Times are summed per part and per kind of kernel (`ynn_fusion` and `dot` are
matmuls). Independent kernels may run at the same time on different threads, so the sum of the kernel
times can exceed the step's wall time; the script prints both.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

PARTS = ("rgb_encoder", "depth_encoder", "decoder", "rgb_proj", "depth_proj")


def part_of(op_name: str) -> str:
    direction = "backward" if "transpose(" in op_name else "forward"
    if "ViTEncoder" in op_name:  # the teacher is a bare ViTEncoder applied outside the model
        return "teachers (forward)"
    for part in PARTS:
        if f"/{part}/" in op_name:
            return f"{part} ({direction})"
    return "losses, masking, optimizer"


def main():
    from train_speed import one_case_parser
    parser = one_case_parser(__doc__)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--top", type=int, default=12, help="kernel kinds listed")
    parser.add_argument("--trace-dir", default="", help="keep the trace here (for Perfetto or TensorBoard)")
    args = parser.parse_args()

    import jax
    from train_speed import jax_step, timed

    run, _, compiled = jax_step(args.stage, args.variant, args.image_size, args.batch, args.dtype, with_compiled=True,
                                matmul_precision="bfloat16" if args.bf16_matmuls else "default")
    wall = timed(run, 2, 1)
    instructions = {m.group(1): m.group(2) for m in
                    re.finditer(r"^\s*%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", compiled.as_text(), re.M)}
    with tempfile.TemporaryDirectory() as scratch:
        trace_dir = args.trace_dir or scratch
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run()
        traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
        events = json.load(gzip.open(traces[-1]))

    by_part, by_kind = collections.Counter(), collections.Counter()
    for event in events["traceEvents"]:
        if event.get("ph") == "X" and event.get("name") in instructions:
            part = part_of(instructions[event["name"]])
            by_part[part] += event["dur"] / 1e6
            by_kind[(part, re.sub(r"\.\d+$", "", event["name"]))] += event["dur"] / 1e6
    total = sum(by_part.values())
    if not total:
        raise SystemExit("no kernel of the trace carries the name of an HLO instruction (GPU kernels carry their "
                         "CUDA names); keep the trace with --trace-dir and open it in Perfetto instead")
    print(f"stage {args.stage} {args.variant} at {args.image_size} px, batch {args.batch}, {args.dtype}"
          f"{', bf16 matmuls' if args.bf16_matmuls else ''}: "
          f"step {wall:.2f} s wall, kernels {total:.2f} s summed over threads")
    for part, seconds in by_part.most_common():
        print(f"  {part:32s} {seconds:6.2f} s  {seconds / total:4.0%}")
    print(f"the {args.top} largest kinds of kernel:")
    for (part, kind), seconds in by_kind.most_common(args.top):
        print(f"  {part:32s} {kind:28s} {seconds:6.2f} s  {seconds / total:4.0%}")


if __name__ == "__main__":
    main()
