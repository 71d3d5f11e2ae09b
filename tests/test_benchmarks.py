"""The benchmarks' own logic: XLA FLOP counts, the ablation's equal-compute plan and its verdict, the
PyTorch reference, and a quick end-to-end run of each script on a tiny model."""
import importlib.util
import json
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcmae_jax.config import training_config
from mmcmae_jax.objectives import make_objective
from mmcmae_jax.train.cost import compiled_flops, loss_and_grad_flops
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("timm") is None,
                                 reason="the torch extra (torch, timm) is not installed")


def tiny_objective(stage, name="m3"):
    config = tiny_config(stage, name)
    return make_objective(config), tuple(config.objective.inputs)


def test_compiled_flops_of_a_matmul_are_2mnk():
    a, b = jax.ShapeDtypeStruct((64, 96), jnp.float32), jax.ShapeDtypeStruct((96, 32), jnp.float32)
    flops = compiled_flops(jax.jit(lambda x, y: x @ y).lower(a, b).compile())
    np.testing.assert_allclose(flops, 2 * 64 * 96 * 32, rtol=0.01)


@pytest.mark.slow
@needs_torch
def test_train_speed_with_bfloat16_matmuls_on_a_tiny_model():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "train_speed.py"), "--cases", "s2-S16-128",
                          "--variant", "64x2x2/16", "--batch", "2", "--steps", "1", "--no-compile", "--peak-size", "256", "--no-input",
                          "--bf16-matmuls"], capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "matmul precision bfloat16" in lines[0] and "AMX for bfloat16 matmuls" in lines[1], out.stdout
    stage2 = next(line for line in lines if line.startswith("s2-S16-128:"))
    assert "JAX/eager" in stage2 and "matmul util" in stage2, stage2


@pytest.mark.slow
def test_step_flops_scale_with_the_batch_and_follow_the_work():
    m3, inputs = tiny_objective(2, "m3")
    two, four = loss_and_grad_flops(m3, 2, 32, inputs), loss_and_grad_flops(m3, 4, 32, inputs)
    np.testing.assert_allclose(four / two, 2.0, rtol=0.05)
    mae, mae_inputs = tiny_objective(2, "mae")
    no_distill, _ = tiny_objective(2, "m3_no_distill")
    # MAE runs one encoder on 20 % of the patches; M3 runs two, plus the teachers on whole frames.
    assert loss_and_grad_flops(mae, 4, 32, mae_inputs) < loss_and_grad_flops(no_distill, 4, 32, inputs) < four


def test_study_plan_gives_every_baseline_m3s_compute():
    import pretraining_study as study
    s = study.settings("smoke")
    flops = {"stage1": 10.0, "m3": 4.0, "m3_recon_only": 3.5, "mae": 1.0, "mask3d": 2.5, "multimae": 3.0}
    arms = ("scratch", "mae", "mask3d", "multimae", "contrastive", "stage1", "recon", "m3")
    plan, budget = study.pretrain_plan(s, flops, arms)
    assert budget == 10.0 * s["stage1_steps"] + 4.0 * s["stage2_steps"]
    assert plan["scratch"] == []
    for name in ("mae", "mask3d", "multimae", "contrastive"):  # equal compute
        spent = sum(flops["stage1" if stage == 1 else key] * steps for stage, key, steps in plan[name])
        assert abs(spent - budget) <= max(flops.values()) / 2, (name, spent, budget)
    # The ablation arms share one stage 1 and differ in stage 2 only.
    assert plan["stage1"] == [plan["m3"][0]] == [plan["recon"][0]] == [(1, "", s["stage1_steps"])]
    assert plan["recon"][1] == (2, "m3_recon_only", s["stage2_steps"])


def test_study_workdir_refuses_runs_made_with_other_settings(tmp_path):
    import pretraining_study as study
    s = study.settings("smoke")
    study.claim_workdir(str(tmp_path), s)
    study.claim_workdir(str(tmp_path), dict(s))  # the same settings again: its runs are re-used
    with pytest.raises(SystemExit, match=r"stage1_steps: 3 there, 7 now.*give a new --workdir"):
        study.claim_workdir(str(tmp_path), dict(s, stage1_steps=7))
    assert study.settings("quick") == study.settings("full")  # a quick run grows into a full one
    # A fine-tuning read-out of another length claims nothing: its results are kept apart by name.
    study.claim_workdir(str(tmp_path), dict(s, finetune_steps=11))
    assert study.readout_name("finetune", dict(s, finetune_steps=11)) == "finetune11"
    assert study.readout_name("probe", s) == "probe"


def test_study_budget_is_set_by_m3s_steps_per_stage_and_losses_keep_their_diagnostics(tmp_path):
    import pretraining_study as study
    assert study.settings("quick")["stage1_steps"] == study.settings("quick")["stage2_steps"] == study.STAGE_STEPS
    assert study.settings("full", 150)["stage1_steps"] == study.settings("full", 150)["stage2_steps"] == 150
    logged = [{"step": 5, "loss": 9.0, "contrastive": 9.0},
              {"step": 10, "loss": 3.2, "contrastive": 3.2, "contrastive_trivial": 7.6,
               "contrastive_other_frame": 4.1, "grad_norm": 1.0, "learning_rate": 1e-4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in logged))
    # The last logged step; the loss terms with their trivial values and the other-frame diagnostic only.
    assert study.final_losses(str(tmp_path)) == {"contrastive": 3.2, "contrastive_trivial": 7.6,
                                                 "contrastive_other_frame": 4.1}


def test_study_never_records_a_preempted_run_as_finished_nor_trains_one_run_twice(tmp_path, monkeypatch):
    import pretraining_study as study
    from mmcmae_jax import pretrain
    from mmcmae_jax.train.trainer import TrainResult
    s = study.settings("smoke")
    monkeypatch.setattr(pretrain, "run_stage", lambda config, workdir, name: TrainResult(2, {}, [], preempted=True))
    with pytest.raises(SystemExit, match=r"mae seed 0 stopped at step 2 of 3.*run the same command again"):
        study.run_pretraining(s, {"mae": [(2, "mae", 3)]}, "mae", 0, str(tmp_path), "", print)
    assert not (tmp_path / "seed0" / "pretrain" / "mae" / "done.json").exists()
    run = str(tmp_path / "run")
    with study.run_lock(run):  # a second process (here: a second open file) is refused while the first trains
        with pytest.raises(SystemExit, match="being trained by another study process"):
            with study.run_lock(run):
                pass
    with study.run_lock(run):  # released when the first one ends
        pass
    # The study's own workers (--jobs) wait for a run another worker trains, then find it finished.
    entered = threading.Event()

    def second_worker():
        with study.run_lock(run, wait=True):
            entered.set()
    with study.run_lock(run, wait=True):
        waiting = threading.Thread(target=second_worker)
        waiting.start()
        assert not entered.wait(0.5)
    assert entered.wait(10)
    waiting.join()


def test_study_keeps_its_flop_counts_and_counts_only_the_missing_ones(tmp_path):
    import pretraining_study as study
    path = tmp_path / "flops.json"
    path.write_text(json.dumps({"stage1": 3.0, "m3": 2.0, "mae": 1.0}))
    s = study.settings("smoke")
    assert study.step_flops(s, ("scratch", "mae", "m3"), str(path)) == {"stage1": 3.0, "m3": 2.0, "mae": 1.0}
    counted = study.step_flops(s, ("mask3d",), str(path))  # counts mask3d, keeps the others
    assert counted["stage1"] == 3.0 and counted["mask3d"] > 0
    assert json.loads(path.read_text()) == {"stage1": 3.0, "m3": 2.0, "mae": 1.0, "mask3d": counted["mask3d"]}


def test_study_runs_each_seeds_shared_stage1_before_the_arms_that_wait_for_it():
    import pretraining_study as study
    plan, _ = study.pretrain_plan(study.settings("smoke"), {"stage1": 2.0, "m3": 1.0, "m3_recon_only": 1.0, "mae": 1.0},
                                  ("scratch", "mae", "recon", "m3", "stage1"))
    assert study.unit_order(plan, ("scratch", "mae", "recon", "m3", "stage1"), (0, 1)) == [
        (0, "stage1"), (0, "scratch"), (0, "mae"), (0, "recon"), (0, "m3"),
        (1, "stage1"), (1, "scratch"), (1, "mae"), (1, "recon"), (1, "m3")]
    assert study.unit_order(plan, ("recon", "mae"), (0,)) == [(0, "recon"), (0, "mae")]


def test_study_arm_changes_reach_its_own_stage_only(tmp_path, monkeypatch):
    """stage1_position trains its own stage 1 with position negatives; the shared stage 1 under the
    stage-2 arms stays M3's (batch negatives), whatever changes those arms make to their stage 2."""
    import pretraining_study as study
    from mmcmae_jax import pretrain
    from mmcmae_jax.train.trainer import TrainResult
    s = study.settings("smoke")
    seen = {}

    def run_stage(config, workdir, name):
        seen[os.path.relpath(workdir, tmp_path)] = config
        return TrainResult(config.total_steps, {}, [], preempted=False)
    monkeypatch.setattr(pretrain, "run_stage", run_stage)
    arms = ("stage1_position", "m3_teacher_visible", "m3_norm_pix")
    plan, _ = study.pretrain_plan(s, {"stage1": 2.0, "m3": 1.0}, arms)
    assert plan["stage1_position"] == [(1, "", s["stage1_steps"])]
    for arm in arms:
        study.run_pretraining(s, plan, arm, 0, str(tmp_path), "", print)
    own, shared, stage2, norm_pix = (seen[os.path.join("seed0", "pretrain", name)]
                                     for name in ("stage1_position", "stage1") + arms[1:])
    assert own.objective.negatives == "position" and shared.objective.negatives == "batch"
    assert shared.objective.distill_teacher_input == "full" and not shared.objective.norm_pix_targets
    assert stage2.objective.distill_teacher_input == "visible" and stage2.init_from.endswith("stage1")
    assert norm_pix.objective.norm_pix_targets and not stage2.objective.norm_pix_targets
    assert norm_pix.objective.weights.denoise > 0 and norm_pix.init_from.endswith("stage1")  # M3 otherwise


def test_study_verdict_needs_three_spreads_and_respects_each_metrics_direction():
    import pretraining_study as study
    scratch = np.array([0.50, 0.52, 0.48])  # sample std 0.02
    assert study.verdict(scratch + 0.07, scratch, True)[2] == "holds"          # 0.07 > 3 x 0.02
    assert study.verdict(scratch + 0.05, scratch, True)[2] == "within noise"
    assert study.verdict(scratch - 0.07, scratch, True)[2] == "reversed"
    gain, noise, word = study.verdict(scratch - 0.07, scratch, False)  # lower is better (AbsRel)
    assert word == "holds" and np.isclose(gain, 0.07) and np.isclose(noise, 0.02)
    noisy = np.array([0.40, 0.60, 0.70])  # the larger spread of the two arms counts
    assert study.verdict(noisy, scratch, True)[2] == "within noise"
    assert study.verdict(scratch[:1] + 1, scratch[:1], True)[2] == "one seed: no spread"


def test_study_report_pairs_each_claim_over_the_seeds_both_arms_finished():
    """--report-only meets arms with fewer seeds: each row says how many, and a claim is read over the
    seeds both of its arms have (here one: no spread, so no verdict)."""
    import pretraining_study as study
    metrics = {"depth": {"delta1": 0.3, "abs_rel": 0.5, "rmse": 0.7},
               "segmentation": {"miou": 0.2, "object_miou": 0.1, "pixel_acc": 0.6}}

    def shifted(by):
        return {"probe": {task: {k: v + by for k, v in m.items()} for task, m in metrics.items()}}
    results = {"0": {"scratch": shifted(0.0), "mae": shifted(0.05)}, "1": {"scratch": shifted(0.01)},
               "2": {"scratch": shifted(-0.01)}}
    blind = metrics
    plan = {"scratch": [], "mae": [(2, "mae", 10)]}
    text = study.report(results, blind, ("scratch", "mae"), ("probe",), (0, 1, 2), plan, {"mae": 1e12}, {}, {})
    assert "| scratch | 3 | 0.300 ± 0.010 |" in text and "| mae | 1 | 0.350 ± 0.000 |" in text
    claim = next(line for line in text.splitlines() if line.startswith("| positive control: MAE"))
    assert "| probe | 1 | +0.050 (±nan) one seed: no spread |" in claim


def test_study_shows_each_arms_fine_tuning_curve(tmp_path):
    import pretraining_study as study
    logged = [{"stage": "finetune depth", "step": 2, "loss": 3.0},
              {"stage": "finetune depth_eval", "step": 2, "frames": 8, "delta1": 0.2, "abs_rel": 0.7},
              {"stage": "finetune depth_eval", "step": 4, "frames": 8, "delta1": 0.3, "abs_rel": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in logged))
    curve = study.evaluation_curve(str(tmp_path))
    assert curve == {"2": {"frames": 8, "delta1": 0.2, "abs_rel": 0.7}, "4": {"frames": 8, "delta1": 0.3, "abs_rel": 0.6}}

    def finetune(shift):
        depth = {step: {"delta1": m["delta1"] + shift, "abs_rel": m["abs_rel"]} for step, m in curve.items()}
        seg = {step: {"miou": 0.1 + shift, "pixel_acc": 0.5} for step in curve}
        return {"finetune": {"depth": {"curve": depth}, "segmentation": {"curve": seg}}}
    results = {"0": {"mae": finetune(0.0)}, "1": {"mae": finetune(0.1)}}
    lines = study.convergence_table(results, ("mae",), (0, 1))
    assert "after 2 → 4 steps" in lines[0]
    assert "| mae | 0.250 → 0.350 | 0.700 → 0.600 | 0.150 → 0.150 | 0.500 → 0.500 |" in lines


def test_object_miou_leaves_out_floor_wall_and_ceiling():
    from mmcmae_jax.transfer.probe import with_object_miou
    seg = {"miou": 0.5, "per_class_iou": {"floor": 0.9, "wall": 0.8, "ceiling": None, "table": 0.2, "chair": 0.4,
                                          "lamp": None}}
    assert np.isclose(with_object_miou(seg)["object_miou"], 0.3)


@pytest.mark.slow
def test_study_fine_tunes_both_tasks_with_the_projects_fine_tuning(tmp_path):
    import pretraining_study as study
    s = study.settings("smoke")
    sets = study.make_data(str(tmp_path), s)
    out = study.finetune_readout(s, "", 0, sets, str(tmp_path / "ft"))
    assert 0 <= out["depth"]["delta1"] <= 1 and out["depth"]["abs_rel"] > 0
    assert 0 <= out["segmentation"]["object_miou"] <= out["segmentation"]["pixel_acc"] + 1
    config = json.loads((tmp_path / "ft" / "segmentation" / "config.json").read_text())
    assert config["head"]["kind"] == "linear" and config["layer_decay"] == 1.0 and config["init_from"] == ""
    # Evaluated on the way and at the end (the curve), the last evaluation being the result.
    assert list(out["depth"]["curve"]) == [str(step) for step in range(1, s["finetune_steps"] + 1)]
    assert out["depth"]["curve"][str(s["finetune_steps"])]["delta1"] == out["depth"]["delta1"]


@pytest.mark.slow
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


@pytest.mark.slow
@needs_torch
def test_train_speed_prints_every_figure_on_a_tiny_model():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "train_speed.py"), "--cases", "s1-S16-128",
                          "s2-S16-128", "--variant", "64x2x2/16", "--batch", "2", "--steps", "1", "--no-compile", "--peak-size", "256"],
                         capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("matmul peak: jax") and "torch" in line for line in lines), out.stdout
    stage2 = next(line for line in lines if line.startswith("s2-S16-128:"))
    for figure in ("JAX", "img/s", "XLA-counted", "matmul util", "PyTorch eager", "JAX/eager"):
        assert figure in stage2, stage2
    assert any("s1-S16-128" in line and "needs" in line and "cores" in line for line in lines), out.stdout


@pytest.mark.slow
def test_profile_step_splits_the_step_into_its_parts():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "profile_step.py"), "--variant", "64x2x2/16",
                          "--image-size", "64", "--batch", "2"], capture_output=True, text=True, timeout=600,
                         cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "s wall" in out.stdout and "summed over threads" in out.stdout, out.stdout
    for part in ("teachers (forward)", "rgb_encoder (backward)", "depth_encoder (forward)", "decoder (forward)",
                 "losses, masking, optimizer"):
        assert part in out.stdout, out.stdout


@pytest.mark.slow
def test_study_runs_end_to_end_on_a_tiny_model(tmp_path):
    """Two worker processes (--jobs 2), where recon waits for the stage 1 that m3 trains; then a re-run
    in one process finds everything finished and reports the same."""
    arms = ["--arms", "scratch", "mae", "m3", "recon", "--no-finetune"]
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "pretraining_study.py"), "--workdir",
                          str(tmp_path), "--mode", "smoke", "--jobs", "2"] + arms,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("pre-trained m3 seed 0 stage 1") == 1 and "pre-trained recon seed 0 stage 1" not in out.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert json.loads((tmp_path / "flops.json").read_text()).keys() == {"stage1", "m3", "mae", "m3_recon_only"}
    for seed in ("0", "1"):
        for arm in ("scratch", "mae", "m3", "recon"):
            probe = results["results"][seed][arm]["probe"]
            assert 0.0 <= probe["depth"]["delta1"] <= 1.0 and 0.0 <= probe["segmentation"]["miou"] <= 1.0
    assert results["plan"]["scratch"] == [] and results["plan"]["mae"][0][:2] == [2, "mae"]
    report = (tmp_path / "results.md").read_text()
    assert "| *image-blind* |" in report and "| mae |" in report and "rgb " in report  # loss / trivial
    assert "positive control: MAE pre-training beats none (mae vs scratch) | probe |" in report
    assert "class shares" in out.stdout and "image-blind predictor" in out.stdout
    # Re-running finds every run finished: nothing is trained again.
    again = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "pretraining_study.py"), "--workdir",
                            str(tmp_path), "--mode", "smoke"] + arms,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "pre-trained" not in again.stdout, again.stdout[-2000:]
    assert (tmp_path / "results.md").read_text().split("\n", 1)[1] == report.split("\n", 1)[1]


def test_procedural_scenes_describes_a_set(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "procedural_scenes.py"), "--num-frames", "8",
                          "--size", "16", "--shards", "1", "--workers", "1", "--style", "varied", "--describe"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    shares = out.stdout.split("class shares: ")[1].split(";")[0]
    assert abs(sum(float(part.split()[-1].rstrip("%")) for part in shares.split(", ")) - 100) < 0.5
    assert "image-blind predictor (4 frames -> 4 others): delta1" in out.stdout
    assert "8 frames at 16x16, style varied" in out.stdout


def test_convert_speed_times_each_worker_count_and_checks_their_records_agree():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "convert_speed.py"), "--frames", "3",
                          "--workers", "1", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("--workers")]
    assert [line.split(":")[0] for line in lines] == ["--workers 1", "--workers 2"]
    assert "speed-up 1.00x" in lines[0] and "core-hours" in lines[1]
