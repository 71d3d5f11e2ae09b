"""The paper's ablation at small scale: every pre-training objective at equal compute, then RGB-only
fine-tuning for depth and for segmentation on a small labelled split of procedural rooms.

    python benchmarks/ablation.py --workdir /tmp/m3_ablation             # 2 seeds, about 60 min on 2 cores
    python benchmarks/ablation.py --workdir /tmp/m3_ablation_smoke --smoke   # minutes; used by the tests

Model: ViT-Ti/16 at 64 px (4x4 patches), the same decoder for every stage-2 objective. Data: 2,000
procedural rooms for pre-training (no labels used), 10 % of them (200 frames) with depth and labels for
fine-tuning, 200 other rooms for evaluation. Objectives (configs/ names in brackets):
    scratch          no pre-training
    mae              RGB in, RGB reconstructed [mae]
    mask3d           RGB and depth in, depth reconstructed [mask3d]
    multimae         RGB and depth in, both reconstructed [multimae]
    m3_contrastive   stage 1 only [m3_contrastive_only]
    m3_no_denoise    stage 1, then stage 2 without denoising [m3_no_denoise]
    m3               stage 1, then stage 2: depth reconstruction, denoising, distillation [m3]
and, with --diagnose-stage1, a row that is not at equal compute, to see what stage 2 does to the encoder
it starts from (4 more fine-tunes, about 5 min):
    m3_stage1        M3's own stage 1 alone (--stage1-steps), fine-tuned as it is when stage 2 starts
Equal compute: M3 gets --stage1-steps then --stage2-steps at batch 32; every other objective gets the
number of steps whose train FLOPs (XLA's cost analysis of the compiled forward and backward) match
M3's total. The three M3 variants share one stage-1 run per seed. Every run is a work directory under
WORKDIR; re-running skips what is finished, so a WORKDIR keeps the settings it was made with
(settings.json) and refuses others. The table goes to WORKDIR/results.md and results.json.
M3's schedule can be varied, each setting in its own WORKDIR (docs/results.md has the runs):
    python benchmarks/ablation.py --workdir /tmp/m3_split --stage1-steps 160 --stage2-steps 102 \
        --objectives m3 --diagnose-stage1 [--m3-stage2-lr 1e-4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

OBJECTIVES = ("scratch", "mae", "mask3d", "multimae", "m3_contrastive", "m3_no_denoise", "m3")  # equal compute
DIAGNOSTICS = ("m3_stage1",)  # below M3's compute: outside the claim
STAGE1_SHARERS = ("m3_stage1", "m3_no_denoise", "m3")  # one stage-1 run per seed serves all three
STAGE2_OBJECTIVE = {"mae": "mae", "mask3d": "mask3d", "multimae": "multimae", "m3_no_denoise": "m3_no_denoise",
                    "m3": "m3"}  # ablation name -> config.OBJECTIVES key
METRICS = (("depth", "delta1", "δ1 ↑"), ("depth", "abs_rel", "AbsRel ↓"), ("depth", "rmse", "RMSE ↓"),
           ("segmentation", "miou", "mIoU ↑"), ("segmentation", "pixel_acc", "pixel acc ↑"))


def settings(smoke: bool) -> dict:
    if smoke:
        return dict(variant="64x2x2/8", image_size=32, frames=64, eval_frames=12, batch=8, stage1_steps=3,
                    stage2_steps=3, finetune_steps=3, label_fraction=0.5, head_features=16, pretrain_lr=5e-4,
                    m3_stage2_lr=5e-4)
    return dict(variant="Ti/16", image_size=64, frames=2000, eval_frames=200, batch=32, stage1_steps=100,
                stage2_steps=200, finetune_steps=80, label_fraction=0.1, head_features=64, pretrain_lr=5e-4,
                m3_stage2_lr=5e-4)


# Settings added with settings.json, at the values every run before them used.
_BEFORE_SETTINGS_JSON = dict(pretrain_lr=5e-4, m3_stage2_lr=5e-4)


def claim_workdir(workdir: str, s: dict) -> None:
    """Runs in a work directory are re-used by name, so one directory holds one set of settings."""
    path = os.path.join(workdir, "settings.json")
    earlier = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
    elif os.path.exists(os.path.join(workdir, "results.json")):  # made before settings.json existed
        with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
            earlier = {**_BEFORE_SETTINGS_JSON, **json.load(f)["settings"]}
    if earlier is not None and earlier != s:
        changed = ", ".join(f"{k}: {earlier.get(k)!r} there, {s.get(k)!r} now" for k in sorted(set(s) | set(earlier))
                            if earlier.get(k) != s.get(k))
        raise SystemExit(f"--workdir {workdir} holds runs made with other settings ({changed}); "
                         "its finished runs would be re-used as they are: give a new --workdir")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(s, f, indent=1)


def pretrain_config(s: dict, stage: int, objective: str, steps: int, seed: int, data_path: str):
    from mmcmae_jax.config import OBJECTIVES as CHANGES, training_config
    config = training_config(stage)
    config.model.update(variant=s["variant"], image_size=s["image_size"], proj_hidden=512, proj_dim=128,
                        decoder_depth=2, decoder_width=128, decoder_heads=4)
    if stage == 2:
        change = dict(CHANGES[objective])
        config.objective.weights.update(change.pop("weights", {}))
        config.objective.update(change)
    config.update(batch_size=s["batch"], total_steps=steps, seed=seed, log_every=max(steps // 5, 1),
                  image_every=0, checkpoint_every=steps, keep_checkpoints=1)
    config.optim.update(lr=s["pretrain_lr"], warmup_steps=max(steps // 10, 1))
    config.data.update(path=data_path, crop_scale=(0.5, 1.0))
    return config


def finetune_config(s: dict, task: str, init_from: str, seed: int, train_path: str, eval_path: str):
    from mmcmae_jax.data import PROCEDURAL_CLASS_NAMES
    from mmcmae_jax.transfer.config import finetune_config as base
    if task == "depth":
        config = base("depth")
    else:
        config = base("segmentation", num_classes=len(PROCEDURAL_CLASS_NAMES))
        config.class_names = tuple(PROCEDURAL_CLASS_NAMES)
    steps = s["finetune_steps"]
    config.model.update(variant=s["variant"], image_size=s["image_size"])
    config.head.features = s["head_features"]
    config.update(batch_size=s["batch"], total_steps=steps, seed=seed, log_every=max(steps // 4, 1),
                  checkpoint_every=steps, keep_checkpoints=1, init_from=init_from,
                  label_fraction=s["label_fraction"])
    config.optim.update(lr=5e-4, warmup_steps=max(steps // 8, 1))
    config.data.path = train_path
    config.eval_data.path = eval_path
    config.eval.batch_size = min(32, s["eval_frames"])
    return config


def objective_flops(s: dict) -> dict:
    """Train FLOPs per step of every pre-training objective, from XLA's cost analysis."""
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.train.cost import loss_and_grad_flops
    flops = {"stage1": loss_and_grad_flops(make_objective(pretrain_config(s, 1, "m3", 1, 0, "")), s["batch"],
                                           s["image_size"])}
    for name, key in STAGE2_OBJECTIVE.items():
        config = pretrain_config(s, 2, key, 1, 0, "")
        flops[name] = loss_and_grad_flops(make_objective(config), s["batch"], s["image_size"],
                                          tuple(config.objective.inputs))
    return flops


def pretrain_plan(s: dict, flops: dict) -> dict:
    """{objective: [(stage, objective key, steps), ...]} at the compute of M3's two stages."""
    budget = flops["stage1"] * s["stage1_steps"] + flops["m3"] * s["stage2_steps"]
    plan = {"scratch": []}
    for name in ("mae", "mask3d", "multimae"):
        plan[name] = [(2, name, max(1, round(budget / flops[name])))]
    plan["m3_contrastive"] = [(1, "m3", max(1, round(budget / flops["stage1"])))]
    for name in ("m3_no_denoise", "m3"):
        plan[name] = [(1, "m3", s["stage1_steps"]), (2, name, s["stage2_steps"])]
    plan["m3_stage1"] = [(1, "m3", s["stage1_steps"])]
    return plan, budget


def timed_stage(config, workdir: str, name: str) -> float:
    """Run one pre-training stage (or find it finished); returns the seconds its run took."""
    from mmcmae_jax import pretrain
    record = os.path.join(workdir, "ablation_seconds.json")
    if os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            return json.load(f)["seconds"]
    start = time.perf_counter()
    pretrain.run_stage(config, workdir, name)
    seconds = time.perf_counter() - start
    with open(record, "w", encoding="utf-8") as f:
        json.dump({"seconds": seconds}, f)
    return seconds


def run_pretraining(s, plan, seed, root, data_path, log, objectives=OBJECTIVES) -> dict:
    """Pre-train every objective for one seed; returns {objective: (encoder work directory or "", seconds)}."""
    encoders = {"scratch": ("", 0.0)}
    shared_stage1 = os.path.join(root, f"seed{seed}", "pretrain", "m3_stage1")
    for name in [n for n in objectives if n != "scratch"]:
        seconds, previous = 0.0, ""
        for stage, key, steps in plan[name]:
            shared = stage == 1 and name in STAGE1_SHARERS
            workdir = shared_stage1 if shared else os.path.join(root, f"seed{seed}", "pretrain", name)
            config = pretrain_config(s, stage, key, steps, seed, data_path)
            if stage == 2 and previous:  # M3's stage 2, continuing from its stage 1
                config.init_from = previous
                config.optim.lr = s["m3_stage2_lr"]
            seconds += timed_stage(config, workdir, f"{name} seed {seed}")
            previous = workdir
        encoders[name] = (previous, seconds)
        log(f"pre-trained {name} (seed {seed}) in {seconds:.0f} s -> {previous}")
    return encoders


def run_finetuning(s, encoders, seed, root, train_path, eval_path, log, objectives=OBJECTIVES) -> dict:
    """Fine-tune every encoder for both tasks; returns {objective: {task: metrics}} (cached per run)."""
    from mmcmae_jax.finetune import run_finetune
    results = {}
    for name in objectives:
        results[name] = {}
        for task in ("depth", "segmentation"):
            workdir = os.path.join(root, f"seed{seed}", "finetune", f"{name}_{task}")
            done = os.path.join(workdir, "ablation_result.json")
            if os.path.exists(done):
                with open(done, encoding="utf-8") as f:
                    results[name][task] = json.load(f)
                continue
            config = finetune_config(s, task, encoders[name][0], seed, train_path, eval_path)
            config.subset_dir = os.path.join(root, f"labelled_{task}")  # one labelled split for every run
            _, evaluation = run_finetune(config, workdir, f"{name} {task} seed {seed}")
            results[name][task] = evaluation["metrics"]
            with open(done, "w", encoding="utf-8") as f:
                json.dump(evaluation["metrics"], f)
        log(f"fine-tuned {name} (seed {seed}): "
            + ", ".join(f"{label} {results[name][task][key]:.4f}" for task, key, label in METRICS))
    return results


def table(results: dict, seeds, plan, flops, pretrain_seconds, objectives=OBJECTIVES) -> str:
    """Markdown: one row per objective, mean ± half the range over seeds, and the pre-training cost."""
    header = "| objective | pre-train steps | pre-train TFLOPs | pre-train s | " + " | ".join(l for _, _, l in METRICS) + " |"
    lines = [header, "|" + "---|" * (4 + len(METRICS))]
    for name in objectives:
        steps = " + ".join(str(steps) for _, _, steps in plan[name]) or "0"
        tflops = sum(flops["stage1" if stage == 1 else key] * steps for stage, key, steps in plan[name]) / 1e12
        seconds = np.mean([pretrain_seconds[seed][name] for seed in seeds])
        cells = []
        for task, key, _ in METRICS:
            values = np.array([results[seed][name][task][key] for seed in seeds])
            cells.append(f"{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}")
        label = f"{name} (diagnostic)" if name in DIAGNOSTICS else name
        lines.append(f"| {label} | {steps} | {tflops:.1f} | {seconds:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim(results: dict, seeds, objectives=None) -> str:
    """Does full M3 match or beat every other equal-compute objective on both tasks (seed means)? And,
    where M3's stage 1 was fine-tuned alone, what stage 2 changed. `objectives`: all in `results`."""
    objectives = list(results[seeds[0]]) if objectives is None else objectives
    lines, compared = [], [n for n in objectives if n not in DIAGNOSTICS]
    for task, key, label in METRICS:
        better_low = "↓" in label
        mean = {n: np.mean([results[seed][n][task][key] for seed in seeds]) for n in objectives}
        beaten_by = [n for n in compared
                     if n != "m3" and (mean[n] < mean["m3"] if better_low else mean[n] > mean["m3"])]
        if len(compared) == 1:
            verdict = "no other objective at equal compute was run"
        elif not beaten_by:
            verdict = "at least as good as every other objective"
        else:
            verdict = "beaten by " + ", ".join(f"{n} ({mean[n]:.3f})" for n in beaten_by)
        line = f"- {task} {label}: M3 {mean['m3']:.3f}; {verdict}"
        if "m3_stage1" in objectives:
            improved = mean["m3"] < mean["m3_stage1"] if better_low else mean["m3"] > mean["m3_stage1"]
            line += (f"; stage 2 took it from {mean['m3_stage1']:.3f} (stage 1 alone) to {mean['m3']:.3f}: "
                     + ("better" if improved else "no better"))
        lines.append(line)
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, a few steps (tests)")
    parser.add_argument("--stage1-steps", type=int, help="M3's stage-1 steps (default 100; smoke 3)")
    parser.add_argument("--stage2-steps", type=int, help="M3's stage-2 steps (default 200; smoke 3); the two "
                        "set the compute every other objective gets")
    parser.add_argument("--m3-stage2-lr", type=float, help="peak learning rate of M3's stage 2 (default 5e-4, "
                        "that of every pre-training run)")
    parser.add_argument("--diagnose-stage1", action="store_true",
                        help="also fine-tune M3's stage 1 alone: what stage 2 starts from (outside the claim)")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES + DIAGNOSTICS,
                        help="a subset, for a quick look (the claim needs m3)")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    from mmcmae_jax.data import procedural, records

    if args.diagnose_stage1 and "m3_stage1" not in args.objectives:
        args.objectives.append("m3_stage1")
    s = settings(args.smoke)
    for stage in (1, 2):
        steps = getattr(args, f"stage{stage}_steps")
        if steps is not None:
            if steps < 1:
                parser.error(f"--stage{stage}-steps must be at least 1, got {steps}")
            s[f"stage{stage}_steps"] = steps
    if args.m3_stage2_lr is not None:
        if not args.m3_stage2_lr > 0:
            parser.error(f"--m3-stage2-lr must be positive, got {args.m3_stage2_lr}")
        s["m3_stage2_lr"] = args.m3_stage2_lr
    claim_workdir(args.workdir, s)
    started = time.perf_counter()
    log_path = os.path.join(args.workdir, "ablation.log")

    def log(message):
        line = f"[ablation {time.perf_counter() - started:6.0f} s] {message}"
        print(line, flush=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    data = {}
    for split, frames, seed in (("pretrain", s["frames"], 0), ("eval", s["eval_frames"], 1)):
        directory = os.path.join(args.workdir, "data", split)
        procedural.ensure_procedural_dataset(directory, frames, s["image_size"], seed, 4 if split == "pretrain" else 1,
                                             records.ARRAY_RECORD, True)
        data[split] = directory
    flops = objective_flops(s)
    plan, budget = pretrain_plan(s, flops)
    log(f"settings {s}; budget {budget / 1e12:.2f} TFLOPs per objective; plan "
        + "; ".join(f"{n}: {' + '.join(str(st) for _, _, st in p) or 0} steps" for n, p in plan.items()))

    results, pretrain_seconds = {}, {}
    for seed in args.seeds:
        encoders = run_pretraining(s, plan, seed, args.workdir, data["pretrain"], log, args.objectives)
        pretrain_seconds[seed] = {n: secs for n, (_, secs) in encoders.items()}
        results[seed] = run_finetuning(s, encoders, seed, args.workdir, data["pretrain"], data["eval"], log,
                                       args.objectives)

    text = table(results, args.seeds, plan, flops, pretrain_seconds, args.objectives)
    verdict = claim(results, args.seeds, args.objectives) if "m3" in args.objectives else "(m3 not run)"
    total = time.perf_counter() - started
    report = (f"Seeds {args.seeds}; mean ± half the range over seeds. Total wall time {total / 60:.1f} min.\n\n"
              f"{text}\n\nThe claim, full M3 at least as good as every other objective:\n{verdict}\n")
    with open(os.path.join(args.workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(dict(settings=s, seeds=args.seeds, flops_per_step=flops, plan=plan, budget_flops=budget,
                       pretrain_seconds=pretrain_seconds, results=results, total_seconds=total), f, indent=1)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
