"""The train step's matmuls, each timed alone in XLA and, at the same sizes, in PyTorch: how much of
the step is matmul time, and how XLA's GEMMs compare with PyTorch's on exactly this model's shapes.

    python benchmarks/matmuls_alone.py                       # stage 2, ViT-B/16, 224 px, batch 8
    python benchmarks/matmuls_alone.py --stage 1 --variant S/16 --image-size 128 --no-torch
    python benchmarks/matmuls_alone.py --host-blas      # also NumPy's BLAS, alone and from inside jit

Every `dot` of the compiled step's optimised HLO (fused or not) is read with its operand shapes and
dimension numbers. Each distinct one runs alone as the same `lax.dot_general` in XLA, and as a
contiguous (batch, M, K) @ (batch, K, N) matmul of the same sizes in PyTorch (MKL on the CPU), the
layout that suits its GEMM best. It prints the two sums, and an estimate of the JAX step with
PyTorch's matmul times in place of XLA's (step - XLA sum + PyTorch sum) against the PyTorch eager
step: the part of the gap that is the GEMM library's. The sums are not a strict floor: in the step,
independent matmuls may run side by side, which small ones use better than two threads each.

`--host-blas` asks whether the step could borrow a faster GEMM without a compiled extension: each
matmul also runs in NumPy (the BLAS NumPy links, OpenBLAS in its wheels), alone and as the only work
of a jitted `jax.pure_callback`, the way a model would call it from inside the step.

Convolutions (the patch embedding) are not timed; their share of the FLOPs is printed. CPU only: on
GPUs XLA hands matmuls to cuBLAS as custom calls, which this reader does not parse.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dot:
    dtype: str
    lhs: tuple
    rhs: tuple
    lhs_batch: tuple
    lhs_contract: tuple
    rhs_batch: tuple
    rhs_contract: tuple
    out_dtype: str = ""  # the result's type where it differs from the operands' (bf16 x bf16 -> f32)

    def sizes(self) -> tuple:
        """(batch, M, K, N): the products of the batch, lhs-free, contracting and rhs-free dimensions."""
        size = lambda shape, dims: math.prod(shape[d] for d in dims)
        lhs_free = [d for d in range(len(self.lhs)) if d not in self.lhs_batch + self.lhs_contract]
        rhs_free = [d for d in range(len(self.rhs)) if d not in self.rhs_batch + self.rhs_contract]
        return (size(self.lhs, self.lhs_batch), size(self.lhs, lhs_free), size(self.lhs, self.lhs_contract),
                size(self.rhs, rhs_free))

    @property
    def flops(self) -> int:
        return 2 * math.prod(self.sizes())


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]", re.M)
_OP = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\]\S* (dot|convolution)"
                 r"\(%([\w.\-]+), %([\w.\-]+)\)(.*)$", re.M)


def step_matmuls(hlo_text: str):
    """(Counter {Dot: occurrences}, convolution FLOPs) of an optimised HLO module's text."""
    shapes = {m.group(1): (m.group(2), tuple(int(d) for d in m.group(3).split(",") if d))
              for m in _INSTRUCTION.finditer(hlo_text)}
    dots, conv_flops = collections.Counter(), 0
    for m in _OP.finditer(hlo_text):
        out_dtype, out_shape, op, lhs, rhs, attrs = m.groups()
        (dtype, lhs_shape), (_, rhs_shape) = shapes[lhs], shapes[rhs]
        if op == "convolution":  # 2 x outputs x (kernel elements per output feature); no feature groups here
            labels = re.search(r"dim_labels=\w+_(\w+)->", attrs).group(1)
            out_elements = math.prod(int(d) for d in out_shape.split(","))
            conv_flops += 2 * out_elements * math.prod(rhs_shape) // rhs_shape[labels.index("o")]
            continue
        dims = {k: tuple(int(d) for d in v.split(",") if d) for k, v in re.findall(r"(\w+)_dims=\{([\d,]*)\}", attrs)}
        dots[Dot(dtype, lhs_shape, rhs_shape, dims.get("lhs_batch", ()), dims.get("lhs_contracting", ()),
                 dims.get("rhs_batch", ()), dims.get("rhs_contracting", ()),
                 "" if out_dtype == dtype else out_dtype)] += 1
    return dots, conv_flops


def best_seconds(call, rounds: int, min_round_s: float = 0.02) -> float:
    """Seconds per call of call() (which blocks until done): the best of `rounds` rounds, each of as many
    calls as fill min_round_s. A matmul of the small stage-2 encoders takes well under a millisecond;
    timed three calls at a time, dispatch and the machine's noise made some of XLA's read 1.7x slower."""
    call()
    start = time.perf_counter()
    call()
    calls = max(1, math.ceil(min_round_s / max(time.perf_counter() - start, 1e-6)))
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def time_in_xla(dot: Dot, repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.key(0))
    types = {"f32": jnp.float32, "bf16": jnp.bfloat16}
    lhs, rhs = (jax.random.normal(k, s, types[dot.dtype]) for k, s in zip(keys, (dot.lhs, dot.rhs)))
    numbers = ((dot.lhs_contract, dot.rhs_contract), (dot.lhs_batch, dot.rhs_batch))
    out_type = types[dot.out_dtype] if dot.out_dtype else None
    run = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers, preferred_element_type=out_type))
    return best_seconds(lambda: run(lhs, rhs).block_until_ready(), repeats)


def time_in_torch(dot: Dot, repeats: int) -> float:
    import torch
    batch, m, k, n = dot.sizes()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dot.dtype]
    lhs, rhs = torch.randn(batch, m, k, dtype=dtype), torch.randn(batch, k, n, dtype=dtype)
    if batch == 1:
        lhs, rhs = lhs[0], rhs[0]
        return best_seconds(lambda: torch.mm(lhs, rhs), repeats)
    return best_seconds(lambda: torch.bmm(lhs, rhs), repeats)


def _contiguous_numpy(dot: Dot):
    batch, m, k, n = dot.sizes()
    rng = np.random.default_rng(0)
    dtype = {"f32": np.float32}[dot.dtype]  # NumPy has no bfloat16 GEMM
    return rng.standard_normal((batch, m, k), dtype), rng.standard_normal((batch, k, n), dtype)


def time_in_numpy(dot: Dot, repeats: int) -> float:
    lhs, rhs = _contiguous_numpy(dot)
    return best_seconds(lambda: np.matmul(lhs, rhs), repeats)


def time_through_callback(dot: Dot, repeats: int) -> float:
    """NumPy's matmul called from a jitted function, as a model would call it (forward only)."""
    import jax
    lhs, rhs = (jax.device_put(x) for x in _contiguous_numpy(dot))
    out = jax.ShapeDtypeStruct(lhs.shape[:2] + rhs.shape[2:], lhs.dtype)
    run = jax.jit(lambda a, b: jax.pure_callback(np.matmul, out, a, b))
    return best_seconds(lambda: run(lhs, rhs).block_until_ready(), repeats)


def time_step_matmuls(hlo_text: str, with_torch: bool = True, repeats: int = 3, show: int = 0,
                      host_blas: bool = False) -> dict:
    """Seconds of the step's matmuls run one by one in XLA (and PyTorch), with the FLOPs they cover."""
    dots, conv_flops = step_matmuls(hlo_text)
    out = collections.Counter(matmul_flops=sum(d.flops * n for d, n in dots.items()), conv_flops=conv_flops)
    rows = []
    for dot, count in dots.items():
        row = dict(dot=dot, count=count, xla=time_in_xla(dot, repeats) * count)
        if with_torch:
            row["torch"] = time_in_torch(dot, repeats) * count
        if host_blas:
            row["numpy"] = time_in_numpy(dot, repeats) * count
            row["callback"] = time_through_callback(dot, repeats) * count
        for name in ("xla", "torch", "numpy", "callback"):
            out[name + "_s"] += row.get(name, 0.0)
        rows.append(row)
    rows.sort(key=lambda r: -r["xla"])
    for row in rows[:show]:
        batch, m, k, n = row["dot"].sizes()
        line = (f"    {row['count']:3d} x (batch {batch}) {m}x{k} @ {k}x{n}: XLA "
                f"{row['dot'].flops * row['count'] / row['xla'] / 1e9:5.0f} GFLOP/s")
        for name, label in (("torch", "PyTorch"), ("numpy", "NumPy"), ("callback", "NumPy via pure_callback")):
            if name in row:
                line += f", {label} {row['dot'].flops * row['count'] / row[name] / 1e9:5.0f} GFLOP/s"
        print(line, flush=True)
    return dict(out)


def report(c: dict, batch: int, jax_step_s: float, torch_step_s: float = 0.0) -> str:
    """The line train_speed.py and this script print for one case."""
    share = c["matmul_flops"] / (c["matmul_flops"] + c["conv_flops"])
    rate = lambda seconds: f"{c['matmul_flops'] / seconds / 1e9:.0f} GFLOP/s"
    line = (f"  the step's matmuls, each run alone ({c['matmul_flops'] / 1e9:.0f} GFLOP, {share:.1%} of matmul + "
            f"conv FLOPs): XLA {c['xla_s']:.2f} s ({rate(c['xla_s'])}) = {c['xla_s'] / jax_step_s:.0%} of the JAX step")
    if c.get("torch_s"):
        line += (f"; PyTorch {c['torch_s']:.2f} s ({rate(c['torch_s'])}), XLA at {c['torch_s'] / c['xla_s']:.2f}x "
                 f"its speed")
        if torch_step_s:
            swapped = jax_step_s - c["xla_s"] + c["torch_s"]
            line += (f"; with PyTorch's matmul times the JAX step would take about {swapped:.2f} s = "
                     f"{torch_step_s / swapped:.2f}x the PyTorch eager step")
    if c.get("numpy_s"):
        line += (f"\n  through NumPy's BLAS: {c['numpy_s']:.2f} s alone ({rate(c['numpy_s'])}), "
                 f"{c['callback_s']:.2f} s as jax.pure_callback from jit ({rate(c['callback_s'])}, "
                 f"{c['xla_s'] / c['callback_s']:.2f}x XLA's speed)")
    return line


def main():
    from train_speed import one_case_parser
    parser = one_case_parser(__doc__)
    parser.add_argument("--show", type=int, default=8, help="the matmuls listed, largest XLA time first")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch (its matmuls and its step)")
    parser.add_argument("--host-blas", action="store_true",
                        help="also time each matmul in NumPy's BLAS, alone and through jax.pure_callback")
    args = parser.parse_args()

    from train_speed import jax_step, timed, torch_step
    run, _, compiled = jax_step(args.stage, args.variant, args.image_size, args.batch, "float32", with_compiled=True,
                                matmul_precision="bfloat16" if args.bf16_matmuls else "default")
    jax_s = timed(run, 3, 1)
    torch_s = 0.0
    if not args.no_torch and args.stage == 2:
        torch_s = timed(torch_step(args.stage, args.variant, args.image_size, args.batch, "cpu", False,
                                   args.bf16_matmuls), 3, 1)
    print(f"stage {args.stage} {args.variant} at {args.image_size} px, batch {args.batch}: JAX step {jax_s:.2f} s"
          + (f", PyTorch eager step {torch_s:.2f} s" if torch_s else ""), flush=True)
    c = time_step_matmuls(compiled.as_text(), with_torch=not args.no_torch, show=args.show,
                          host_blas=args.host_blas)
    print(report(c, args.batch, jax_s, torch_s), flush=True)


if __name__ == "__main__":
    main()
