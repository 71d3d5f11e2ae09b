"""Speed of the compiled train step, against the machine's matmul peak and a PyTorch reference.

    python benchmarks/train_speed.py                      # CPU, float32: every case, batch 8
    python benchmarks/train_speed.py --cases s2-B16-224 --batch 4 --steps 2   # one case, quicker
    python benchmarks/train_speed.py --gpu                # GPU, bfloat16: ViT-B/16 stage 2, batch 256,
                                                          # then the largest batch that fits
    python benchmarks/train_speed.py --gpu --largest-batch-only --no-torch --batch 512   # only the search
    python benchmarks/train_speed.py --bf16-matmuls --cases s2-B16-224 s2-S16-128   # CPU, bfloat16 matmuls

For every case (stage, ViT, image size) it compiles the trainer's own step (mmcmae_jax.train.trainer:
forward, backward, clipping, AdamW, non-finite guard, on a mesh) with the paper-scale model config, and
prints images/s and achieved FLOP/s, where FLOPs come from XLA's cost analysis of the compiled step
(on GPUs that count leaves out the cuBLAS matmuls, so it is printed but not used). Measured in the same
run: the machine's peak matmul FLOP/s (square matmuls, JAX and PyTorch), the PyTorch reference of the
same model (benchmarks/torch_reference.py: timm blocks, same shapes and masking; stage 2, eager and
torch.compile), and the input pipeline's frames/s per core at each image size, with the cores it needs
to feed the measured step. "matmul util" counts matmul and
convolution FLOPs only (PyTorch's FlopCounterMode on the reference, within 1-5 % of XLA's count of
everything on CPU) against the better measured matmul peak; on a GPU it is the model-FLOP utilisation
against the dense bf16 peak of the spec sheet. `--variant 64x2x2/16` swaps in a tiny ViT for a quick
check of the script itself.

`--bf16-matmuls` runs both sides with bfloat16 matmuls: the trainer's step with
model.matmul_precision = "bfloat16" (float32 activations, bf16 operands, float32 sums; models/matmul.py),
PyTorch under torch.autocast(bfloat16), and the matmul peak as bf16 matmuls. On CPUs with AMX (the
script says whether this one has it) that is where both run fastest.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

CASES = {  # name -> (stage, variant, image size)
    "s1-S16-224": (1, "S/16", 224), "s2-S16-224": (2, "S/16", 224),
    "s1-B16-224": (1, "B/16", 224), "s2-B16-224": (2, "B/16", 224),
    "s1-S16-128": (1, "S/16", 128), "s2-S16-128": (2, "S/16", 128),
}


def one_case_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a script that studies one step (profile_step.py)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2))
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16-matmuls", action="store_true",
                        help="model.matmul_precision='bfloat16' (and PyTorch under bf16 autocast)")
    return parser


def timed(step, steps: int, warmup: int) -> float:
    """Seconds per call of step() (which blocks until its work is done), after `warmup` calls."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def matmul_peak(size: int, dtype: str, repeats: int = 5, float32_sums: bool = False) -> dict:
    """FLOP/s of a square matmul in JAX and (if installed) PyTorch; the machine's practical peak.
    float32_sums: JAX's matmul returns float32 (bf16 operands: what XLA's CPU backend runs on AMX)."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32 if float32_sums else None))
    out = {"jax": 2 * size ** 3 / timed(lambda: f(a, a).block_until_ready(), repeats, 2)}
    try:
        from mmcmae_jax.port.timm_import import import_timm
        _, torch = import_timm()
        device = "cuda" if jax.default_backend() == "gpu" else "cpu"
        t = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def torch_mm():
            torch.mm(t, t)
            sync()
        out["torch"] = 2 * size ** 3 / timed(torch_mm, repeats, 2)
    except ImportError:
        pass
    return out


def jax_step(stage: int, variant: str, image_size: int, batch: int, dtype: str, with_compiled: bool = False,
             matmul_precision: str = "default"):
    """(run one step, XLA FLOPs per step[, the compiled step]): the trainer's compiled step on random data."""
    import jax
    import jax.numpy as jnp
    from mmcmae_jax.config import training_config
    from mmcmae_jax.device_batch import prepare_batch, random_host_batch
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.train import sharding
    from mmcmae_jax.train.cost import compiled_flops
    from mmcmae_jax.train.trainer import make_train_step, make_trainer_optimizer

    config = training_config(stage)
    config.model.update(variant=variant, image_size=image_size, dtype=dtype, matmul_precision=matmul_precision)
    config.batch_size = batch
    objective = make_objective(config)
    mesh = sharding.make_mesh(1)
    optimizer, schedule = make_trainer_optimizer(config)
    host = random_host_batch(np.random.default_rng(0), batch, image_size)
    data = sharding.global_batch(host, mesh)  # compact, as the pipeline sends it
    inputs = jax.jit(lambda b: prepare_batch(b, objective.batch_keys, config.data.depth_trim))(data)

    def init_state(key):
        params = objective.init(key, inputs)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

    state_sharding = sharding.state_shardings(jax.eval_shape(init_state, jax.random.key(0)), mesh)
    state = jax.jit(init_state, out_shardings=state_sharding)(jax.random.key(0))
    frozen = {}
    if objective.teacher is not None:  # random stand-ins for the stage-1 encoders: the same work
        frozen = {f"{m}_encoder": objective.teacher.init(jax.random.key(1), inputs[m])["params"]
                  for m in config.objective.inputs}
    frozen_sharding = sharding.state_shardings(jax.eval_shape(lambda: frozen), mesh)
    frozen = sharding.put_global(frozen, frozen_sharding)
    seed = jax.random.key(2)
    train_step, initial_watch = make_train_step(objective, optimizer, schedule, state_sharding, frozen_sharding,
                                                mesh, config.data.depth_trim)
    watch = initial_watch(state, frozen, data, seed)  # the trainer's on-device record of a non-finite step
    start = time.perf_counter()
    compiled = train_step.lower(state, frozen, data, seed, watch).compile()
    print(f"  compiled stage {stage} {variant} at {image_size}px, batch {batch} in {time.perf_counter() - start:.0f} s",
          flush=True)
    holder = {"state": state, "watch": watch}

    def run():
        holder["state"], metrics, holder["watch"] = compiled(holder["state"], frozen, data, seed, holder["watch"])
        metrics["loss"].block_until_ready()
    if with_compiled:
        return run, compiled_flops(compiled), compiled
    return run, compiled_flops(compiled)


def torch_step(stage: int, variant: str, image_size: int, batch: int, device: str, compile: bool, bf16: bool):
    import torch_reference as ref
    step, _ = ref.make_step(stage, variant, image_size, device, compile, bf16)
    data = ref.random_batch(batch, image_size, device)
    sync = ref.torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        step(data)
        sync()
    return run


def cpu_has_amx() -> bool:
    """Whether the CPU lists the AMX bfloat16 instructions (Linux; False where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def fmt(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.2f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


def input_keeps_up(rows: list, batch: int):
    """Frames/s per core of the training input pipeline (benchmarks/input_pipeline.py, ArrayRecord, in
    this run) at each case's image size, and the cores it needs to feed the measured step."""
    import os
    import tempfile

    from input_pipeline import measure
    from mmcmae_jax.data import procedural
    print("input pipeline (ArrayRecord, 256 px stored, decode + crop + batch, compact) against the step:", flush=True)
    with tempfile.TemporaryDirectory() as root:
        paths = procedural.write_procedural_dataset(os.path.join(root, "frames"), 256, 256, seed=0, num_shards=2,
                                                    depth_noise=True)
        per_core = {}
        for row in rows:
            size = CASES[row["case"]][2]
            if size not in per_core:
                per_core[size] = measure(paths, size, 32, 8, 4, host_float=False)[1]
            need = row["jax_img_s"] / per_core[size]
            print(f"  {row['case']}: {per_core[size]:.0f} frames/s per core at {size}px; the step's "
                  f"{row['jax_img_s']:.1f} img/s needs {need:.2f} cores", flush=True)


def largest_batch(stage, variant, image_size, dtype, start: int, limit: int) -> int:
    """The largest power-of-two multiple of `start` (up to `limit`) whose step compiles and runs."""
    best = 0
    batch = start
    while batch <= limit:
        try:
            run, _ = jax_step(stage, variant, image_size, batch, dtype)
            run()
        except Exception as err:  # XLA reports running out of memory as RESOURCE_EXHAUSTED
            if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
                raise
            print(f"  batch {batch}: out of memory", flush=True)
            break
        print(f"  batch {batch}: fits", flush=True)
        best, batch = batch, batch * 2
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="bfloat16 on the GPU: ViT-B/16 stage 2, largest batch")
    parser.add_argument("--cases", nargs="+", default=None, choices=sorted(CASES))
    parser.add_argument("--bf16-matmuls", action="store_true", help="bfloat16 matmuls on both sides: "
                        "model.matmul_precision='bfloat16', PyTorch under bf16 autocast, a bf16 matmul peak")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 256 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (3 CPU, 20 GPU)")
    parser.add_argument("--variant", default="", help="replace every case's ViT (e.g. 64x2x2/16 for a quick check)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--no-input", action="store_true", help="skip the input-pipeline comparison")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (eager only)")
    parser.add_argument("--peak-size", type=int, default=0, help="side of the square matmuls that measure the "
                        "peak (default 2048 on CPU, 8192 on GPU; small for a quick check of the script)")
    parser.add_argument("--max-batch", type=int, default=4096, help="GPU: largest batch tried")
    parser.add_argument("--largest-batch-only", action="store_true", help="GPU: only search the largest batch, "
                        "doubling from --batch")
    parser.add_argument("--peak", type=float, default=0.0,
                        help="GPU: the device's dense bf16 peak FLOP/s for model-FLOP utilisation "
                             "(default: 989e12 on an H100 SXM, 756e12 on an H100 PCIe, else the measured matmul peak)")
    args = parser.parse_args()

    import jax
    backend = jax.default_backend()
    gpu = args.gpu or backend == "gpu"
    cases = args.cases or (["s2-B16-224"] if gpu else list(CASES))
    batch = args.batch or (256 if gpu else 8)
    steps = args.steps or (20 if gpu else 3)
    dtype = "bfloat16" if gpu else "float32"
    precision = "bfloat16" if args.bf16_matmuls else "default"
    torch_bf16 = gpu or args.bf16_matmuls
    device = "cuda" if gpu else "cpu"
    import os
    print(f"backend {backend}: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {dtype}, matmul precision "
          f"{precision}, batch {batch}, {steps} timed steps", flush=True)
    if not gpu and args.bf16_matmuls:
        print(f"  this CPU {'has' if cpu_has_amx() else 'has no'} AMX for bfloat16 matmuls", flush=True)

    peaks = matmul_peak(args.peak_size or (8192 if gpu else 2048), "bfloat16" if torch_bf16 else dtype,
                        float32_sums=args.bf16_matmuls and not gpu)
    peak = max(peaks.values())
    print("matmul peak: " + ", ".join(f"{k} {fmt(v)}" for k, v in peaks.items()), flush=True)
    if gpu:
        kind = jax.devices()[0].device_kind
        spec = args.peak or (989e12 if "H100" in kind and "PCIe" not in kind else 756e12 if "H100" in kind else 0.0)
        mfu_peak = spec or peak
        print(f"model-FLOP utilisation against {fmt(mfu_peak)} ({'spec sheet, dense bf16' if spec else 'measured'})")
    else:
        mfu_peak = peak

    have_torch = not args.no_torch
    if have_torch:
        try:
            import torch_reference  # noqa: F401
        except ImportError as err:
            print(f"PyTorch reference skipped: {err}")
            have_torch = False

    rows = []
    for name in ([] if args.largest_batch_only else cases):
        stage, variant, size = CASES[name]
        variant = args.variant or variant
        run, xla_flops = jax_step(stage, variant, size, batch, dtype, matmul_precision=precision)
        seconds = timed(run, steps, 2)
        row = dict(case=name, jax_img_s=batch / seconds, xla_flops=xla_flops / seconds)
        if have_torch:
            import torch_reference as ref
            row["matmul_flops"] = ref.matmul_flops(stage, variant, size, batch) / seconds
            if stage == 2:
                print("  PyTorch eager ...", flush=True)
                row["torch_eager"] = batch / timed(torch_step(stage, variant, size, batch, device, False, torch_bf16),
                                                  steps, 2)
                if not args.no_compile:
                    print("  torch.compile ...", flush=True)
                    row["torch_compile"] = batch / timed(torch_step(stage, variant, size, batch, device, True, torch_bf16),
                                                         steps, 3)
        rows.append(row)
        line = (f"{name}: JAX {row['jax_img_s']:.2f} img/s, XLA-counted {fmt(row['xla_flops'])} "
                + ("(XLA's count leaves out cuBLAS calls on GPUs)" if gpu else f"({row['xla_flops'] / peak:.0%} of matmul peak)"))
        if "matmul_flops" in row:
            line += f", matmul {fmt(row['matmul_flops'])} = {row['matmul_flops'] / mfu_peak:.0%} matmul util"
        for key, label in (("torch_eager", "PyTorch eager"), ("torch_compile", "torch.compile")):
            if key in row:
                line += f" | {label} {row[key]:.2f} img/s, JAX/{label.split()[-1]} {row['jax_img_s'] / row[key]:.2f}x"
        print(line, flush=True)

    if rows and not args.no_input:
        input_keeps_up(rows, batch)
    if gpu:
        stage, variant, size = CASES[cases[0]]
        print(f"largest batch that fits, {cases[0]} ({dtype}):", flush=True)
        print(f"  -> {largest_batch(stage, variant, size, dtype, batch, args.max_batch)}", flush=True)


if __name__ == "__main__":
    main()
