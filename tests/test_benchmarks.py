"""The benchmarks' own logic: XLA FLOP counts, the ablation's equal-compute plan and its verdict, the
PyTorch reference, and a quick end-to-end run of each script on a tiny model."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcmae_jax.config import OBJECTIVES, training_config
from mmcmae_jax.objectives import make_objective
from mmcmae_jax.train.cost import compiled_flops, loss_and_grad_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("timm") is None,
                                 reason="the torch extra (torch, timm) is not installed")


def tiny_objective(stage, name="m3"):
    config = training_config(stage)
    config.model.update(variant="64x2x2/8", image_size=32, proj_hidden=64, proj_dim=32, decoder_depth=1,
                        decoder_width=32, decoder_heads=2)
    change = dict(OBJECTIVES[name])
    config.objective.weights.update(change.pop("weights", {}))
    config.objective.update(change)
    return make_objective(config), tuple(config.objective.inputs)


def test_compiled_flops_of_a_matmul_are_2mnk():
    a, b = jax.ShapeDtypeStruct((64, 96), jnp.float32), jax.ShapeDtypeStruct((96, 32), jnp.float32)
    flops = compiled_flops(jax.jit(lambda x, y: x @ y).lower(a, b).compile())
    np.testing.assert_allclose(flops, 2 * 64 * 96 * 32, rtol=0.01)


def test_matmuls_alone_reads_every_matmul_of_a_compiled_step():
    """The HLO reader finds each dot with its sizes (a plain matmul, a batched einsum with a transposed
    operand, a gradient's dots) and the convolution's FLOPs, matching counts made by hand."""
    import matmuls_alone

    def f(x, w, q, k, images, kernel):
        attention = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(x @ w) ** 2) + jnp.sum(attention) + jnp.sum(conv)

    shapes = dict(x=(24, 40), w=(40, 56), q=(2, 3, 10, 8), k=(2, 3, 12, 8), images=(2, 16, 16, 3), kernel=(4, 4, 3, 32))
    args = [jax.ShapeDtypeStruct(v, jnp.float32) for v in shapes.values()]
    hlo = jax.jit(jax.value_and_grad(f, argnums=1)).lower(*args).compile().as_text()  # d/dw adds x.T @ g
    dots, conv_flops = matmuls_alone.step_matmuls(hlo)
    sizes = sorted(d.sizes() for d, n in dots.items() for _ in range(n))
    assert sizes in (sorted([(1, 24, 40, 56), (1, 40, 24, 56), (6, 10, 8, 12)]),  # dW as x.T @ g or g.T @ x
                     sorted([(1, 24, 40, 56), (1, 56, 24, 40), (6, 10, 8, 12)])), sizes
    assert conv_flops == 2 * (2 * 4 * 4 * 32) * (4 * 4 * 3)
    ceiling = matmuls_alone.time_step_matmuls(hlo, with_torch=False, repeats=1)
    assert ceiling["matmul_flops"] == 2 * (2 * 24 * 40 * 56 + 6 * 10 * 8 * 12) and ceiling["xla_s"] > 0


def test_matmuls_alone_keeps_a_bfloat16_dots_float32_result():
    """Under model.matmul_precision="bfloat16" the step's dots are bf16 x bf16 -> f32, the form XLA's CPU
    backend runs on AMX; the reader keeps the result type, so the matmul timed alone is that same form."""
    import matmuls_alone
    a, b = jax.ShapeDtypeStruct((24, 40), jnp.bfloat16), jax.ShapeDtypeStruct((40, 56), jnp.bfloat16)
    hlo = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)).lower(a, b).compile().as_text()
    (dot, count), = matmuls_alone.step_matmuls(hlo)[0].items()
    assert (dot.dtype, dot.out_dtype, dot.sizes(), count) == ("bf16", "f32", (1, 24, 40, 56), 1)
    assert matmuls_alone.time_in_xla(dot, 1) > 0


@needs_torch
def test_train_speed_with_bfloat16_matmuls_on_a_tiny_model():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "train_speed.py"), "--cases", "s2-S16-128",
                          "--variant", "64x2x2/16", "--batch", "2", "--steps", "1", "--no-compile", "--no-input",
                          "--bf16-matmuls"], capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "matmul precision bfloat16" in lines[0] and "AMX for bfloat16 matmuls" in lines[1], out.stdout
    stage2 = next(line for line in lines if line.startswith("s2-S16-128:"))
    assert "JAX/eager" in stage2 and "matmul util" in stage2, stage2
    assert "x the PyTorch eager step" in lines[lines.index(stage2) + 1], out.stdout


@needs_torch
def test_matmuls_alone_prints_its_figures_on_a_tiny_model():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "matmuls_alone.py"), "--variant", "64x2x2/16",
                          "--image-size", "64", "--batch", "2", "--show", "3", "--host-blas"],
                         capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-3000:]
    listed = [line for line in out.stdout.splitlines() if " @ " in line and "GFLOP/s" in line]
    assert len(listed) == 3 and all("XLA" in line and "PyTorch" in line and "NumPy via pure_callback" in line
                                    for line in listed), out.stdout
    *_, swapped, host_blas = out.stdout.splitlines()
    assert "x the PyTorch eager step" in swapped, out.stdout
    assert host_blas.startswith("  through NumPy's BLAS: ") and "x XLA's speed" in host_blas, out.stdout


def test_step_flops_scale_with_the_batch_and_follow_the_work():
    m3, inputs = tiny_objective(2, "m3")
    two, four = loss_and_grad_flops(m3, 2, 32, inputs), loss_and_grad_flops(m3, 4, 32, inputs)
    np.testing.assert_allclose(four / two, 2.0, rtol=0.05)
    mae, mae_inputs = tiny_objective(2, "mae")
    no_distill, _ = tiny_objective(2, "m3_no_distill")
    # MAE runs one encoder on 20 % of the patches; M3 runs two, plus the teachers on whole frames.
    assert loss_and_grad_flops(mae, 4, 32, mae_inputs) < loss_and_grad_flops(no_distill, 4, 32, inputs) < four


def test_ablation_plan_gives_every_objective_m3s_compute():
    import ablation
    s = ablation.settings(smoke=True)
    flops = {"stage1": 10.0, "m3": 4.0, "m3_no_denoise": 3.9, "mae": 1.0, "mask3d": 2.5, "multimae": 3.0}
    plan, budget = ablation.pretrain_plan(s, flops)
    assert budget == 10.0 * s["stage1_steps"] + 4.0 * s["stage2_steps"]
    assert set(plan) == set(ablation.OBJECTIVES + ablation.DIAGNOSTICS) and plan["scratch"] == []
    for name, runs in plan.items():
        if name in ("scratch", "m3_no_denoise") + ablation.DIAGNOSTICS:
            continue
        spent = sum(flops["stage1" if stage == 1 else key] * steps for stage, key, steps in runs)
        cheapest_step = min(flops["stage1" if stage == 1 else key] for stage, key, _ in runs)
        assert abs(spent - budget) <= cheapest_step / 2 + 1e-9, (name, spent, budget)
    assert plan["m3_no_denoise"][0] == plan["m3"][0] == (1, "m3", s["stage1_steps"])  # one shared stage 1
    assert plan["m3_stage1"] == [plan["m3"][0]]  # the diagnostic is M3's own stage 1, nothing more


def test_ablation_workdir_refuses_runs_made_with_other_settings(tmp_path):
    import ablation
    s = ablation.settings(smoke=True)
    ablation.claim_workdir(str(tmp_path), s)
    ablation.claim_workdir(str(tmp_path), dict(s))  # the same settings again: its runs are re-used
    with pytest.raises(SystemExit, match=r"stage1_steps: 3 there, 7 now.*give a new --workdir"):
        ablation.claim_workdir(str(tmp_path), dict(s, stage1_steps=7))
    # A directory from before settings.json existed: its results.json holds the settings, without the
    # learning rates, which were 5e-4 then.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    before = {k: v for k, v in s.items() if k not in ("pretrain_lr", "m3_stage2_lr")}
    (legacy / "results.json").write_text(json.dumps({"settings": before, "results": {}}))
    with pytest.raises(SystemExit, match="m3_stage2_lr: 0.0005 there, 0.0001 now"):
        ablation.claim_workdir(str(legacy), dict(s, m3_stage2_lr=1e-4))
    with pytest.raises(SystemExit, match="stage2_steps: 3 there, 9 now"):
        ablation.claim_workdir(str(legacy), dict(s, stage2_steps=9))
    ablation.claim_workdir(str(legacy), s)
    assert json.loads((legacy / "settings.json").read_text()) == s


def test_ablation_verdict_respects_the_direction_of_each_metric():
    import ablation

    def metrics(delta1, abs_rel, miou):
        return {"depth": {"delta1": delta1, "abs_rel": abs_rel, "rmse": abs_rel * 3},
                "segmentation": {"miou": miou, "pixel_acc": miou + 0.5}}
    results = {0: {n: metrics(0.5, 0.3, 0.2) for n in ablation.OBJECTIVES}}
    results[0]["m3"] = metrics(0.6, 0.25, 0.1)
    results[0]["mae"] = metrics(0.55, 0.2, 0.15)    # worse δ1 but better AbsRel than M3
    verdict = dict(line.split(":", 1) for line in ablation.claim(results, [0]).splitlines())
    assert "at least as good" in verdict["- depth δ1 ↑"]
    assert "beaten by mae (0.200)" in verdict["- depth AbsRel ↓"]
    assert "scratch" in verdict["- segmentation mIoU ↑"] and "beaten" in verdict["- segmentation mIoU ↑"]
    assert "stage 2" not in verdict["- depth δ1 ↑"]  # no stage-1 diagnostic was run

    # The stage-1 diagnostic has less compute: it is not a rival in the claim, only M3's starting point.
    results[0]["m3_stage1"] = metrics(0.7, 0.28, 0.05)
    verdict = dict(line.split(":", 1) for line in ablation.claim(results, [0]).splitlines())
    assert "at least as good" in verdict["- depth δ1 ↑"] and "m3_stage1" not in verdict["- depth δ1 ↑"]
    assert verdict["- depth δ1 ↑"].endswith("from 0.700 (stage 1 alone) to 0.600: no better")
    assert verdict["- depth AbsRel ↓"].endswith("from 0.280 (stage 1 alone) to 0.250: better")
    assert verdict["- segmentation mIoU ↑"].endswith("to 0.100: better")

    # M3 alone (with its diagnostic) has no rival: the verdict must not call it the winner.
    alone = {0: {n: results[0][n] for n in ("m3", "m3_stage1")}}
    verdict = dict(line.split(":", 1) for line in ablation.claim(alone, [0]).splitlines())
    assert "no other objective at equal compute was run" in verdict["- depth δ1 ↑"]
    assert "at least as good" not in verdict["- depth δ1 ↑"]


@needs_torch
def test_torch_reference_steps_and_masks_like_ours():
    import torch_reference as ref
    for stage in (1, 2):
        step, _ = ref.make_step(stage, "64x2x2/8", 32, "cpu", compile=False, bf16=False)
        batch = ref.random_batch(2, 32, "cpu")
        losses = [float(step(batch)) for _ in range(3)]
        assert np.all(np.isfinite(losses)) and losses[0] != losses[-1]
    # The same work as ours: PyTorch's matmul count is XLA's count of everything, less the elementwise
    # few per cent. A missing mask, teacher or decoder block would move the ratio far outside.
    for stage in (1, 2):
        config = training_config(stage)
        config.model.update(variant="64x2x2/8", image_size=32)
        ratio = loss_and_grad_flops(make_objective(config), 2, 32) / ref.matmul_flops(stage, "64x2x2/8", 32, 2)
        assert 1.0 <= ratio < 1.1, (stage, ratio)
    masked = ref.random_masks(3, 16, 0.75, "cpu")
    assert masked[0].shape == (3, 4) and torch_equal(masked[2].sum(1), 12.0)
    assert torch_equal(masked[2].gather(1, masked[0]).sum(), 0.0)  # the kept patches are the unmasked ones


def torch_equal(tensor, value):
    return bool((tensor == value).all())


@needs_torch
def test_train_speed_prints_every_figure_on_a_tiny_model():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "train_speed.py"), "--cases", "s1-S16-128",
                          "s2-S16-128", "--variant", "64x2x2/16", "--batch", "2", "--steps", "1", "--no-compile"],
                         capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("matmul peak: jax") and "torch" in line for line in lines), out.stdout
    stage2 = next(line for line in lines if line.startswith("s2-S16-128:"))
    for figure in ("JAX", "img/s", "XLA-counted", "matmul util", "PyTorch eager", "JAX/eager"):
        assert figure in stage2, stage2
    ceiling = lines[lines.index(stage2) + 1]  # the step's matmuls timed alone, in XLA and PyTorch
    for figure in ("matmuls, each run alone", "XLA", "of the JAX step", "PyTorch", "x the PyTorch eager step"):
        assert figure in ceiling, ceiling
    assert any("s1-S16-128" in line and "needs" in line and "cores" in line for line in lines), out.stdout


def test_step_parts_compares_each_part_with_what_it_replaced():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "step_parts.py"), "--variant", "64x2x2/16",
                          "--batch", "2", "--repeats", "2"], capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    ours = [line for line in lines if line.strip().startswith("ours")]
    assert len(ours) == 4, out.stdout  # attention at two lengths, the encoder forward, the optimizer update
    assert all("x)" in line and "ms" in line for line in ours), out.stdout
    assert any("optimizer update" in line and "M parameters" in line for line in lines), out.stdout


def test_profile_step_splits_the_step_into_its_parts():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "profile_step.py"), "--variant", "64x2x2/16",
                          "--image-size", "64", "--batch", "2"], capture_output=True, text=True, timeout=600,
                         cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "s wall" in out.stdout and "summed over threads" in out.stdout, out.stdout
    for part in ("teachers (forward)", "rgb_encoder (backward)", "depth_encoder (forward)", "decoder (forward)",
                 "losses, masking, optimizer"):
        assert part in out.stdout, out.stdout


def test_ablation_runs_end_to_end_on_a_tiny_model(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "ablation.py"), "--workdir", str(tmp_path),
                          "--smoke", "--seeds", "0", "--objectives", "scratch", "m3", "--diagnose-stage1",
                          "--m3-stage2-lr", "2e-4"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("scratch", "m3", "m3_stage1"):
        for task, key in (("depth", "delta1"), ("segmentation", "miou")):
            assert 0.0 <= results["results"]["0"][name][task][key] <= 1.0
    assert results["plan"]["m3"] == [[1, "m3", 3], [2, "m3", 3]]
    # The diagnostic fine-tunes the stage-1 run that M3's stage 2 started from; it trains nothing itself.
    assert sorted(os.listdir(tmp_path / "seed0" / "pretrain")) == ["m3", "m3_stage1"]
    learning_rate = {name: json.loads((tmp_path / "seed0" / "pretrain" / name / "config.json").read_text())["optim"]["lr"]
                     for name in ("m3_stage1", "m3")}
    assert learning_rate == {"m3_stage1": 5e-4, "m3": 2e-4}  # --m3-stage2-lr reaches M3's stage 2 alone
    report = (tmp_path / "results.md").read_text()
    assert "| m3 | 3 + 3 |" in report and "| scratch | 0 |" in report and "The claim" in report
    assert "| m3_stage1 (diagnostic) | 3 |" in report and "(stage 1 alone) to" in report
