"""Does pre-training work? Every objective of the paper's tables, pre-trained on procedural RGB-D
rooms, then read out with RGB alone: frozen-feature probes and fine-tuning, beside the image-blind
predictor, over paired seeds.

    python benchmarks/pretraining_study.py --workdir /tmp/m3_study --mode quick   # positive control
    python benchmarks/pretraining_study.py --workdir /tmp/m3_study_full           # every arm
    python benchmarks/pretraining_study.py --workdir /tmp/m3_study_smoke --mode smoke   # seconds; tests

Data: the procedural "varied" style (any camera pose, random colours and textures, clutter: the image,
not the layout, says where things are): unlabelled frames with sensor-like depth for pre-training, a
labelled set with exact depth for the read-outs, and an evaluation set of other rooms. `--describe-data`
prints each set's class shares and the image-blind predictor and stops.

Model: a ViT of width 128, 4 blocks, 4 heads, 8 px patches at 64 px: an 8 x 8 grid, so 80 % masking
leaves 13 visible patches per modality. Every stage-2 objective has the same decoder.

Arms (`--arms`; ARMS below): scratch; the baselines MAE, MultiMAE-style, Mask3D-style and the
contrastive stage alone, each at M3's compute (XLA-counted train FLOPs of its two stages); and, on top
of one shared stage-1 run per seed, M3's stage-2 variants (the paper's ablation): reconstruction only,
+ distillation, + denoising, both (M3), noise without its loss, and the design choices (teacher on the
visible patches, log-normal σ, σ up to 3, norm-pix targets for the baselines and for M3's depth).

Read-outs, the same recipe for every arm: (a) linear probes on the frozen RGB encoder's final patch
tokens (transfer/probe.py: deterministic, so the spread is the encoder's); (b) fine-tuning of the whole
RGB encoder with a linear head (no layer decay: it would starve a random encoder's first blocks), by
the project's fine-tuning code. Metrics: δ1, AbsRel, RMSE; mIoU over all classes and over the six
object classes; pixel accuracy.

Verdicts: a difference counts only when it exceeds three times the seed-to-seed spread (the larger
sample standard deviation of the two arms). The positive control comes first: MAE and the contrastive
stage must beat scratch that way before any M3 claim is read.

Expected result (docs/results.md, "Does pre-training work?"): with the probes, the contrastive stage beats a
random encoder on every metric by more than three spreads and MAE on four of six (not δ1 and AbsRel); with
`--stage-steps 150` only the segmentation pixel accuracy separates them, and with a protocol 4x cheaper in
time (`--variant 64x4x4/8 --batch 16 --stage-steps 400`) MAE beats scratch on nothing in either read-out. M3
matches its own stage 1 within noise; reconstruction alone is worse than stage 1, distillation undoes that;
M3 does not beat MAE and loses to the contrastive stage alone on segmentation, but beats the Mask3D-style
baseline on 5 of 6 metrics and the MultiMAE-style one on AbsRel and RMSE. Noise without its loss, the
teacher on the visible patches and log-normal σ are all within noise of M3; σ up to 3 makes the denoising
loss learn (0.57 against E[σ²] 3.0) and changes no probe beyond noise (a δ1 drop of 0.0015 in one work
directory did not repeat in another). Norm-pix targets help both baselines (MAE on AbsRel and RMSE,
MultiMAE-style also on object mIoU), and with them both beat M3 on mIoU. Fine-tuned (400 steps, converged:
800 improve nothing), the contrastive stage and MAE with norm-pix targets beat scratch on four of six
metrics (plain MAE on two), M3 on the three depth metrics only; every step of M3's ablation is within noise,
the contrastive stage beats M3 on segmentation, Mask3D-style pre-training is worse than none on
segmentation, and no design choice (teacher on the visible patches, log-normal σ, σ up to 3, norm-pix depth
targets, negatives at the same position only) moves a metric beyond noise. At twice the
compute (`--stage-steps 1200`) M3's stage 2 still adds nothing beyond noise to its stage 1; fine-tuned,
M3 is within noise of the contrastive stage and of MAE with norm-pix targets, and beats scratch on five
of six metrics. Time on the 2-core CPU: about 26 min a seed for the quick mode's three arms on an idle machine; the fine-tuning read-out about 8 min an arm
and seed, two running in parallel.

`--jobs 2` pre-trains and reads out two arm-seeds at a time in worker processes; an arm that starts from
the shared stage 1 waits for the worker that trains it. Separate processes may also share a work
directory (`--seeds 1`, `--seeds 2`); a run being trained by one is refused by the others. Each process
keeps a compilation cache, so the arms after the first load their programs rather than compile them.

Every run is a work directory under WORKDIR; re-running skips what is finished and resumes what is not
(the trainer resumes from its checkpoints). `--report-only` trains nothing and reports the runs read
out so far: each arm over the seeds it has finished, each claim over the seeds both arms have. WORKDIR
keeps the settings it was made with and refuses others. The report goes to WORKDIR/results.md and
results.json and covers the command's arms only: after a run of a few arms, `--report-only` (all arms of
the mode, or `--arms ...`) reports them together with the others read out there.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time

import numpy as np

# Read-out metrics: (task, key, label, higher is better).
METRICS = (("depth", "delta1", "δ1", True), ("depth", "abs_rel", "AbsRel", False), ("depth", "rmse", "RMSE", False),
           ("segmentation", "miou", "mIoU", True), ("segmentation", "object_miou", "obj mIoU", True),
           ("segmentation", "pixel_acc", "pix acc", True))
READOUTS = ("probe", "finetune")
STUFF = ("floor", "wall", "ceiling")  # the procedural classes that are layout; the others are objects

# name -> (description, stage-2 objective key or None, starts from the shared stage 1, changes to it)
ARMS = {
    "scratch": ("no pre-training", None, False, {}),
    "mae": ("MAE: RGB in, RGB out; equal compute", "mae", False, {}),
    "multimae": ("MultiMAE-style: RGB+depth in, both out; equal compute", "multimae", False, {}),
    "mask3d": ("Mask3D-style: RGB+depth in, depth out; equal compute", "mask3d", False, {}),
    "contrastive": ("stage 1 alone at M3's compute", None, False, {}),
    "stage1": ("stage 1 alone, as M3's stage 2 starts from it", None, True, {}),
    "stage1_position": ("stage 1 alone, negatives only at the same position in the other frames", None, False,
                        {"negatives": "position"}),
    "recon": ("stage 1 + depth reconstruction", "m3_recon_only", True, {}),
    "distill": ("stage 1 + reconstruction + distillation", "m3_no_denoise", True, {}),
    "denoise": ("stage 1 + reconstruction + denoising", "m3_no_distill", True, {}),
    "m3": ("M3: stage 1 + reconstruction + denoising + distillation", "m3", True, {}),
    "noise_only": ("M3 with noise and σ embedded, no denoising loss", "m3_noise_only", True, {}),
    "m3_teacher_visible": ("M3, teacher sees the student's visible patches", "m3", True,
                           {"distill_teacher_input": "visible"}),
    "m3_lognormal_sigma": ("M3, log-normal σ", "m3", True, {"sigma_distribution": "lognormal"}),
    "m3_sigma_max3": ("M3, σ up to 3 (uniform)", "m3", True, {"sigma_max": 3.0}),
    "m3_norm_pix": ("M3, per-patch normalised depth targets", "m3", True, {"norm_pix_targets": True}),
    "mae_norm_pix": ("MAE with norm-pix targets; equal compute", "mae_norm_pix", False, {}),
    "multimae_norm_pix": ("MultiMAE-style with norm-pix targets; equal compute", "multimae_norm_pix", False, {}),
}
MODE_ARMS = {
    "smoke": ("scratch", "mae", "contrastive", "stage1", "m3"),
    "quick": ("scratch", "mae", "contrastive"),  # the positive control
    "full": tuple(ARMS),
}
# Claims: (better arm, worse arm, what the paper says). Checked on every read-out and metric.
CLAIMS = (
    ("mae", "scratch", "positive control: MAE pre-training beats none"),
    ("contrastive", "scratch", "positive control: the contrastive stage beats none"),
    ("mae_norm_pix", "scratch", "positive control: MAE with norm-pix targets beats none"),
    ("m3", "scratch", "M3 beats no pre-training"),
    ("m3", "mae", "M3 beats MAE"),
    ("m3", "multimae", "M3 beats MultiMAE-style"),
    ("m3", "mask3d", "M3 beats Mask3D-style"),
    ("m3", "contrastive", "M3 beats the contrastive stage alone at equal compute"),
    ("m3", "stage1", "M3's stage 2 adds to its stage 1"),
    ("stage1", "scratch", "M3's stage 1 alone beats no pre-training"),
    ("contrastive", "stage1", "stage 1 at M3's whole compute beats stage 1 at M3's stage-1 steps"),
    ("recon", "stage1", "reconstruction adds to stage 1"),
    ("distill", "recon", "distillation adds to reconstruction"),
    ("denoise", "recon", "denoising adds to reconstruction"),
    ("m3", "distill", "denoising adds to reconstruction + distillation"),
    ("m3", "denoise", "distillation adds to reconstruction + denoising"),
    ("m3", "noise_only", "the denoising loss adds to noise and σ alone"),
    ("noise_only", "distill", "noise and σ, without their loss, add to reconstruction + distillation"),
    ("m3_teacher_visible", "m3", "a teacher on the visible patches beats one on the full frame"),
    ("stage1_position", "stage1", "negatives at the same position only beat the whole batch's (stage 1)"),
    ("m3_lognormal_sigma", "m3", "log-normal σ beats uniform σ"),
    ("m3_sigma_max3", "m3", "σ up to 3 beats σ up to 1"),
    ("m3_norm_pix", "m3", "norm-pix depth targets help M3"),
    ("mae_norm_pix", "mae", "norm-pix targets help MAE"),
    ("m3", "mae_norm_pix", "M3 beats MAE with norm-pix targets (its published setting)"),
    ("m3", "multimae_norm_pix", "M3 beats MultiMAE-style with norm-pix targets (its published setting)"),
    ("multimae_norm_pix", "multimae", "norm-pix targets help MultiMAE-style"),
)


VARIANT, BATCH = "128x4x4/8", 32  # the encoders (width x depth x heads / patch) and the batch of every stage
STAGE_STEPS = 600  # M3's steps per stage; they set every arm's budget (docs/results.md: 150 is too few)
FINETUNE_STEPS = 400  # the fine-tuning read-out's steps (26 epochs of the 500 labelled frames at batch 32)
CURVE_POINTS = 4  # the fine-tuning read-out evaluates this many times, the last at its end: is it converged?
# Read-out settings that do not claim the work directory: their results are kept apart (finetune400.json).
READOUT_SETTINGS = ("finetune_steps",)


def settings(mode: str, stage_steps: int = STAGE_STEPS, finetune_steps: int = FINETUNE_STEPS,
             variant: str = VARIANT, batch: int = BATCH) -> dict:
    """quick and full share their settings (a quick run's work directory grows into a full one).
    `stage_steps`: M3's steps per stage, which fix the pre-training compute of every arm."""
    if mode == "smoke":
        return dict(variant="64x2x2/8", image_size=32, pretrain_frames=64, labelled_frames=24, eval_frames=16,
                    batch=8, stage1_steps=3, stage2_steps=3, finetune_steps=3, probe_steps=20, lr=5e-4,
                    finetune_lr=5e-4)
    return dict(variant=variant, image_size=64, pretrain_frames=4000, labelled_frames=500, eval_frames=300,
                batch=batch, stage1_steps=stage_steps, stage2_steps=stage_steps, finetune_steps=finetune_steps,
                probe_steps=300, lr=5e-4, finetune_lr=5e-4)


def claim_workdir(workdir: str, s: dict) -> None:
    """Finished runs are re-used by name, so one work directory holds one set of pre-training and probe
    settings; fine-tuning read-outs of other lengths sit beside each other (READOUT_SETTINGS)."""
    path = os.path.join(workdir, "settings.json")
    s = {k: v for k, v in s.items() if k not in READOUT_SETTINGS}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            earlier = {k: v for k, v in json.load(f).items() if k not in READOUT_SETTINGS}
        if earlier != s:
            changed = ", ".join(f"{k}: {earlier.get(k)!r} there, {s.get(k)!r} now"
                                for k in sorted(set(s) | set(earlier)) if earlier.get(k) != s.get(k))
            raise SystemExit(f"error: --workdir {workdir} holds runs made with other settings ({changed}); "
                             "its finished runs would be re-used as they are: give a new --workdir")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(s, f, indent=1)


# ---------------------------------------------------------------------------------------------- data

def make_data(workdir: str, s: dict) -> dict:
    """{set name: records directory}: pre-training frames (sensor-like depth, holes), a labelled set and
    an evaluation set of other rooms (exact depth)."""
    from mmcmae_jax.data import procedural, records
    sets = {}
    for name, frames, seed, noise in (("pretrain", s["pretrain_frames"], 0, True),
                                      ("labelled", s["labelled_frames"], 2, False),
                                      ("eval", s["eval_frames"], 1, False)):
        directory = os.path.join(workdir, "data", name)
        procedural.ensure_procedural_dataset(directory, frames, s["image_size"], seed, 4 if frames > 100 else 1,
                                             records.ARRAY_RECORD, noise, style="varied")
        sets[name] = directory
    return sets


def data_config(path: str):
    from mmcmae_jax.data import default_data_config
    config = default_data_config()
    config.path = path
    return config


def load_frames(sets: dict, s: dict) -> dict:
    from mmcmae_jax.transfer import probe
    return {name: probe.load_frames(data_config(path), s["image_size"]) for name, path in sets.items()}


def describe_data(sets: dict, s: dict, log) -> dict:
    """Class shares of each set and the image-blind predictor of the labelled set on the evaluation set."""
    from mmcmae_jax.data import PROCEDURAL_CLASS_NAMES
    from mmcmae_jax.transfer import probe
    frames = load_frames(sets, s)
    for name, f in frames.items():
        shares = probe.class_shares(f.label, PROCEDURAL_CLASS_NAMES)
        objects = sum(v for k, v in shares.items() if k not in STUFF)
        log(f"{name} set: {len(f.rgb)} frames; class shares " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
            + f"; objects {objects:.1%}")
    blind = probe.image_blind_metrics(frames["labelled"], frames["eval"], PROCEDURAL_CLASS_NAMES)
    log("image-blind predictor (labelled -> eval): " + ", ".join(
        f"{label} {blind[task][key]:.3f}" for task, key, label, _ in METRICS))
    return dict(frames=frames, blind=blind)


# ------------------------------------------------------------------------------------- pre-training

def pretrain_config(s: dict, stage: int, key: str, steps: int, seed: int, data_path: str, changes=None):
    from mmcmae_jax.config import OBJECTIVES, training_config
    config = training_config(stage)
    config.model.update(variant=s["variant"], image_size=s["image_size"], proj_hidden=512, proj_dim=128,
                        decoder_depth=2, decoder_width=128, decoder_heads=4)
    if stage == 2:
        change = dict(OBJECTIVES[key])
        config.objective.weights.update(change.pop("weights", {}))
        config.objective.update(change)
    config.objective.update(changes or {})
    config.update(batch_size=s["batch"], total_steps=steps, seed=seed, log_every=max(steps // 5, 1),
                  image_every=0, checkpoint_every=max(steps // 2, 1), keep_checkpoints=1)
    config.optim.update(lr=s["lr"], warmup_steps=max(steps // 10, 1))
    config.data.update(path=data_path, crop_scale=(0.5, 1.0))
    return config


def step_flops(s: dict, arms, path: str = "") -> dict:
    """Train FLOPs per step of stage 1 and of each stage-2 objective the arms use (XLA cost analysis).
    `path`: a JSON file that keeps the counts already made with these settings (each takes a compile)."""
    from mmcmae_jax.objectives import make_objective
    from mmcmae_jax.train.cost import loss_and_grad_flops
    known = {}
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
    flops = {}
    for key in ["stage1"] + sorted({ARMS[a][1] for a in arms if ARMS[a][1]} | {"m3"}):
        if key not in known:
            config = pretrain_config(s, 1 if key == "stage1" else 2, key, 1, 0, "")
            inputs = ("rgb", "depth") if key == "stage1" else tuple(config.objective.inputs)
            known[key] = loss_and_grad_flops(make_objective(config), s["batch"], s["image_size"], inputs)
        flops[key] = known[key]
    if path:  # whole or not at all: study processes of other seeds may read it meanwhile
        with open(f"{path}.{os.getpid()}", "w", encoding="utf-8") as f:
            json.dump(known, f, indent=1)
        os.replace(f"{path}.{os.getpid()}", path)
    return flops


def pretrain_plan(s: dict, flops: dict, arms) -> tuple[dict, float]:
    """{arm: [(stage, objective key, steps), ...]}: M3's two stages set the budget of the baselines."""
    budget = flops["stage1"] * s["stage1_steps"] + flops["m3"] * s["stage2_steps"]
    plan = {}
    for arm in arms:
        _, key, on_stage1, _ = ARMS[arm]
        if arm == "scratch":
            plan[arm] = []
        elif arm == "contrastive":
            plan[arm] = [(1, "", max(1, round(budget / flops["stage1"])))]
        elif key is None:  # stage 1 alone at M3's stage-1 steps: the shared run, or one with its own changes
            plan[arm] = [(1, "", s["stage1_steps"])]
        elif on_stage1:
            plan[arm] = [(1, "", s["stage1_steps"]), (2, key, s["stage2_steps"])]
        else:
            plan[arm] = [(2, key, max(1, round(budget / flops[key])))]
    return plan, budget


def final_losses(workdir: str) -> dict:
    """The last logged value of every loss term, of its trivial prediction, and of the contrastive loss
    against another frame's depth (as low as the loss itself: patches matched by position alone)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        last = json.loads(f.readlines()[-1])
    return {k: v for k, v in last.items() if f"{k}_trivial" in last or k.endswith(("_trivial", "_other_frame"))}


@contextlib.contextmanager
def run_lock(workdir: str, wait: bool = False):
    """Holds one run for one trainer: two trainers in one work directory would overwrite each other's
    checkpoints. Another study process is refused; with `wait` (the study's own workers, --jobs) it waits
    until the first one has finished the run."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "study.lock")
    with open(path, "w", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: {workdir} is being trained by another study process; give the processes "
                             "different --seeds") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stage_workdir(arm: str, stage: int, seed: int, root: str) -> str:
    """Where one stage of an arm trains: the shared stage-1 run of the arms that start from it, else the
    arm's own directory."""
    shared = stage == 1 and ARMS[arm][2]
    return os.path.join(root, f"seed{seed}", "pretrain", "stage1" if shared else arm)


def encoder_workdir(plan: dict, arm: str, seed: int, root: str) -> str:
    """The work directory whose RGB encoder an arm is read out from ("" for scratch)."""
    return stage_workdir(arm, plan[arm][-1][0], seed, root) if plan[arm] else ""


def run_pretraining(s, plan, arm, seed, root, data_path, log, wait: bool = False) -> str:
    """Pre-train one arm for one seed (or find it finished); returns its encoder's work directory.
    `wait`: for a run another worker is training (the shared stage 1), wait for it instead of refusing."""
    previous = ""
    for stage, key, steps in plan[arm]:
        shared = stage == 1 and ARMS[arm][2]
        workdir = stage_workdir(arm, stage, seed, root)
        done = os.path.join(workdir, "done.json")
        if not os.path.exists(done):
            with run_lock(workdir, wait):
                if not os.path.exists(done):  # a worker that waited finds it finished
                    train_stage(s, stage, key, steps, seed, data_path, {} if shared else ARMS[arm][3], previous,
                                workdir, f"{arm} seed {seed}", log)
        previous = workdir
    return previous


def train_stage(s, stage, key, steps, seed, data_path, changes, init_from, workdir, name, log) -> None:
    from mmcmae_jax import pretrain
    # An arm's changes are to its own stage; a shared stage-1 run is M3's as it is.
    config = pretrain_config(s, stage, key, steps, seed, data_path, changes)
    if init_from:
        config.init_from = init_from
    start = time.perf_counter()
    result = pretrain.run_stage(config, workdir, name)
    if result.preempted:  # stopped by a signal: not finished, so no done.json; a re-run resumes
        raise SystemExit(f"{name} stopped at step {result.step} of {steps}; its checkpoint is in {workdir}: run "
                         "the same command again to resume")
    with open(os.path.join(workdir, "done.json"), "w", encoding="utf-8") as f:
        json.dump({"seconds": time.perf_counter() - start, "losses": final_losses(workdir)}, f)
    log(f"pre-trained {name} stage {stage}: {steps} steps in {time.perf_counter() - start:.0f} s; final losses "
        "(value / trivial) " + ", ".join(f"{k} {v:.3f}" for k, v in final_losses(workdir).items()))


# ------------------------------------------------------------------------------------------ read-outs

def probe_readout(s, encoder_dir: str, seed: int, frames: dict) -> dict:
    """Frozen-feature probes of the RGB encoder in `encoder_dir` ("" = a random encoder of `seed`)."""
    from mmcmae_jax.config import model_config
    from mmcmae_jax.data import PROCEDURAL_CLASS_NAMES
    from mmcmae_jax.train.checkpoint import restore_params
    from mmcmae_jax.transfer import probe
    model = model_config()
    model.update(variant=s["variant"], image_size=s["image_size"])
    params = (restore_params(encoder_dir)["rgb_encoder"] if encoder_dir
              else probe.random_encoder_params(model, seed, s["image_size"]))
    labelled, evaluation = frames["labelled"], frames["eval"]
    train_tokens = probe.encoder_tokens(params, model, labelled.rgb)
    eval_tokens = probe.encoder_tokens(params, model, evaluation.rgb)
    hw = evaluation.rgb.shape[1:3]
    depth = probe.fit_probe(train_tokens, labelled.depth_m, "depth", steps=s["probe_steps"])
    seg = probe.fit_probe(train_tokens, labelled.label, "segmentation", len(PROCEDURAL_CLASS_NAMES),
                          steps=s["probe_steps"])
    return {"depth": probe.score(probe.probe_predictions(depth, eval_tokens, hw, "depth"), evaluation, "depth"),
            "segmentation": probe.with_object_miou(probe.score(
                probe.probe_predictions(seg, eval_tokens, hw, "segmentation"), evaluation, "segmentation",
                len(PROCEDURAL_CLASS_NAMES), PROCEDURAL_CLASS_NAMES), STUFF)}


def evaluation_curve(workdir: str) -> dict:
    """{step: {metric: value}} of the evaluations a fine-tuning run logged in its metrics.jsonl."""
    curve = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("stage", "").endswith("_eval"):
                curve[str(record["step"])] = {k: v for k, v in record.items() if k not in ("stage", "step")}
    return curve


def finetune_readout(s, encoder_dir: str, seed: int, sets: dict, workdir: str) -> dict:
    """Fine-tune the RGB encoder with a linear head for each task; evaluate on the evaluation set
    CURVE_POINTS times on the way (the last at the end), so that the report shows whether it converged."""
    from mmcmae_jax.data import PROCEDURAL_CLASS_NAMES
    from mmcmae_jax.finetune import run_finetune
    from mmcmae_jax.transfer.config import finetune_config
    from mmcmae_jax.transfer.probe import with_object_miou
    out = {}
    for task in ("depth", "segmentation"):
        if task == "depth":
            config = finetune_config("depth")
        else:
            config = finetune_config("segmentation", num_classes=len(PROCEDURAL_CLASS_NAMES))
            config.class_names = tuple(PROCEDURAL_CLASS_NAMES)
        steps = s["finetune_steps"]
        config.model.update(variant=s["variant"], image_size=s["image_size"])
        config.head.kind = "linear"
        config.layer_decay = 1.0
        config.update(batch_size=s["batch"], total_steps=steps, seed=seed, log_every=max(steps // 4, 1),
                      checkpoint_every=max(steps // 2, 1), keep_checkpoints=1, init_from=encoder_dir,
                      eval_every=max(steps // CURVE_POINTS, 1))
        config.optim.update(lr=s["finetune_lr"], warmup_steps=max(steps // 10, 1))
        config.data.path = sets["labelled"]
        config.eval_data.path = sets["eval"]
        config.eval.batch_size = 64
        _, evaluation = run_finetune(config, os.path.join(workdir, task), f"finetune {task}")
        metrics = dict(evaluation["metrics"])
        if task == "segmentation":
            metrics = with_object_miou({**metrics, "per_class_iou": evaluation["per_class_iou"]}, STUFF)
        out[task] = dict(metrics, curve=evaluation_curve(os.path.join(workdir, task)))
    return out


def readout_name(readout: str, s: dict) -> str:
    """The file (and folder) name of a read-out's results: fine-tuning ones carry their length."""
    return f"finetune{s['finetune_steps']}" if readout == "finetune" else readout


def cached(path: str, compute):
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)
    return value


# ------------------------------------------------------------------------------------- units of work

def run_arm(s, plan, arm, seed, root, sets, frames, readouts, log, wait=False) -> tuple[str, dict]:
    """Pre-train one arm for one seed and read it out (or find either finished):
    (encoder work directory, {read-out: {task: metrics}})."""
    out_dir = os.path.join(root, f"seed{seed}", "readout", arm)
    encoder_dir = run_pretraining(s, plan, arm, seed, root, sets["pretrain"], log, wait)
    results = {"probe": cached(os.path.join(out_dir, "probe.json"),
                               lambda: probe_readout(s, encoder_dir, seed, frames))}
    if "finetune" in readouts:
        name = readout_name("finetune", s)
        results["finetune"] = cached(os.path.join(out_dir, f"{name}.json"),
                                     lambda: finetune_readout(s, encoder_dir, seed, sets, os.path.join(out_dir, name)))
    log(f"{arm} seed {seed}: " + "; ".join(
        f"{r} " + ", ".join(f"{label} {results[r][t][k]:.3f}" for t, k, label, _ in METRICS) for r in readouts))
    return encoder_dir, results


def unit_order(plan: dict, arms, seeds) -> list:
    """(seed, arm) in the order they are run: in each seed the shared stage 1 first, as the arms that
    start from it wait for it (--jobs)."""
    units = []
    for seed in seeds:
        shared = sorted((a for a in arms if plan[a] and ARMS[a][2]), key=lambda a: len(plan[a]))
        units += [(seed, a) for a in shared[:1] + [a for a in arms if a not in shared] + shared[1:]]
    return units


class StudyLog:
    """Prints a line and appends it to WORKDIR/study.log, stamped with the seconds since the study
    started; picklable, so that the workers (--jobs) log to the same file."""

    def __init__(self, path: str, started: float):
        self.path, self.started = path, started

    def __call__(self, message: str) -> None:
        line = f"[study {time.time() - self.started:6.0f} s] {message}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def use_compilation_cache(directory: str) -> None:
    """The arms compile the same programs again (every fine-tuning read-out, every seed of one objective):
    JAX's persistent cache loads them instead. One directory per process: JAX writes an entry in place,
    without a lock, so a process could read an entry another one is still writing."""
    import jax
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def quiet_logs() -> None:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO


_WORKER = {}


def _start_worker(context: dict) -> None:
    quiet_logs()
    use_compilation_cache(os.path.join(context["cache_root"], str(os.getpid())))
    _WORKER.update(context, frames=None)


def _worker_unit(unit: tuple) -> tuple:
    """One (seed, arm) in a worker process: the read-outs' frames are loaded once, at its first unit."""
    w = _WORKER
    if w["frames"] is None:
        w["frames"] = load_frames({name: w["sets"][name] for name in ("labelled", "eval")}, w["s"])
    seed, arm = unit
    return unit + run_arm(w["s"], w["plan"], arm, seed, w["root"], w["sets"], w["frames"], w["readouts"], w["log"],
                          wait=True)


def run_units(units, jobs: int, context: dict):
    """Yields (seed, arm, encoder work directory, read-outs) as the units finish: in this process, or in
    `jobs` worker processes (spawned: JAX does not survive a fork)."""
    if jobs == 1:
        for seed, arm in units:
            yield (seed, arm) + run_arm(context["s"], context["plan"], arm, seed, context["root"], context["sets"],
                                        context["frames"], context["readouts"], context["log"])
        return
    import concurrent.futures
    import multiprocessing
    worker_context = {k: v for k, v in context.items() if k != "frames"}
    with concurrent.futures.ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"),
                                                initializer=_start_worker, initargs=(worker_context,)) as pool:
        futures = [pool.submit(_worker_unit, unit) for unit in units]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:  # the units not started yet; the running ones finish (or resume later)
                future.cancel()
            raise


# ----------------------------------------------------------------------------------------- the report

def values(results: dict, arm: str, readout: str, task: str, key: str, seeds) -> np.ndarray:
    return np.array([results[str(seed)][arm][readout][task][key] for seed in seeds])


def seeds_with(results: dict, arms, seeds) -> list:
    """The seeds for which every one of `arms` has results (all seeds, unless --report-only met
    unfinished runs): comparisons are paired over these."""
    return [seed for seed in seeds if all(arm in results.get(str(seed), {}) for arm in arms)]


def spread(a: np.ndarray, b: np.ndarray) -> float:
    """The seed-to-seed spread of a comparison: the larger sample standard deviation of the two arms."""
    return float(max(np.std(a, ddof=1), np.std(b, ddof=1))) if len(a) > 1 else float("nan")


def verdict(better: np.ndarray, worse: np.ndarray, higher_is_better: bool) -> tuple[float, float, str]:
    """(gain, spread, verdict): gain > 0 means `better` is better; 'holds' when the gain exceeds three
    spreads, 'reversed' when the loss does, else 'within noise'."""
    gain = float(np.mean(better) - np.mean(worse)) * (1 if higher_is_better else -1)
    noise = spread(better, worse)
    if not np.isfinite(noise):
        return gain, noise, "one seed: no spread"
    return gain, noise, "holds" if gain > 3 * noise else "reversed" if -gain > 3 * noise else "within noise"


CURVE_METRICS = (("depth", "delta1", "δ1"), ("depth", "abs_rel", "AbsRel"), ("segmentation", "miou", "mIoU"),
                 ("segmentation", "pixel_acc", "pix acc"))


def convergence_table(results: dict, arms, seeds) -> list:
    """Each arm's fine-tuning metrics at each evaluation on the way (mean over its seeds): converged
    when the last steps change them by less than the seed-to-seed spread."""
    steps = sorted({step for seed in seeds for arm in arms if arm in results.get(str(seed), {})
                    for step in results[str(seed)][arm]["finetune"]["depth"].get("curve", {})}, key=int)
    lines = [f"Fine-tuning on the way: the evaluation set's metrics after {' → '.join(steps)} steps (mean over "
             "the seeds)", "", "| arm | " + " | ".join(label for _, _, label in CURVE_METRICS) + " |",
             "|---" * (1 + len(CURVE_METRICS)) + "|"]
    for arm in arms:
        done = seeds_with(results, [arm], seeds)
        cells = []
        for task, key, _ in CURVE_METRICS:
            curves = [results[str(seed)][arm]["finetune"][task].get("curve", {}) for seed in done]
            common = sorted(set.intersection(*(set(c) for c in curves)) if curves else (), key=int)
            cells.append(" → ".join(f"{np.mean([c[step][key] for c in curves]):.3f}" for step in common) or "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(results: dict, blind: dict, arms, readouts, seeds, plan, flops, pretrain_log: dict, s: dict) -> str:
    lines = [f"Settings: {json.dumps(s)}", "", f"Seeds {list(seeds)}; cells are mean ± sample std over the seeds "
             "an arm has finished (column 'seeds').", ""]
    arms = [arm for arm in arms if seeds_with(results, [arm], seeds)]
    for readout in readouts:
        title = ("frozen-feature linear probe" if readout == "probe"
                 else f"fine-tuning, linear head, {s.get('finetune_steps')} steps")
        lines += [f"### Read-out: {title}",
                  "", "| arm | seeds | " + " | ".join(f"{label} {'↑' if up else '↓'}" for _, _, label, up in METRICS)
                  + " |", "|---" * (2 + len(METRICS)) + "|",
                  "| *image-blind* | | " + " | ".join(f"{blind[t][k]:.3f}" for t, k, _, _ in METRICS) + " |"]
        for arm in arms:
            done = seeds_with(results, [arm], seeds)
            cells = []
            for task, key, _, _ in METRICS:
                v = values(results, arm, readout, task, key, done)
                cells.append(f"{v.mean():.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
            lines.append(f"| {arm} | {len(done)} | " + " | ".join(cells) + " |")
        lines.append("")
        if readout == "finetune":
            lines += convergence_table(results, arms, seeds)
    lines += ["### Pre-training", "", f"| arm | steps | TFLOPs | final losses, value / trivial (seed {seeds[0]}) |",
              "|---|---|---|---|"]
    for arm in arms:
        steps = " + ".join(str(n) for _, _, n in plan[arm]) or "0"
        tflops = sum(flops["stage1" if stage == 1 else key] * n for stage, key, n in plan[arm]) / 1e12
        losses = pretrain_log.get(arm, {})
        shown = ", ".join(f"{k} {v:.3f} / {losses[k + '_trivial']:.3f}" for k, v in losses.items()
                          if not k.endswith("_trivial") and k + "_trivial" in losses)
        shown += "".join(f" ({k.removesuffix('_other_frame')} against another frame's depth {v:.3f})"
                         for k, v in losses.items() if k.endswith("_other_frame"))
        lines.append(f"| {arm} | {steps} | {tflops:.2f} | {shown or '-'} |")
    lines += ["", "### Claims (gain > 0: the first arm is better; holds: gain > 3 x spread)", "",
              "| claim | read-out | seeds | " + " | ".join(label for _, _, label, _ in METRICS) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    for better, worse, text in CLAIMS:
        paired = seeds_with(results, [better, worse], seeds)
        if better not in arms or worse not in arms or not paired:
            continue
        for readout in readouts:
            cells = []
            for task, key, _, up in METRICS:
                gain, noise, word = verdict(values(results, better, readout, task, key, paired),
                                            values(results, worse, readout, task, key, paired), up)
                cells.append(f"{gain:+.3f} (±{noise:.3f}) {word}")
            lines.append(f"| {text} ({better} vs {worse}) | {readout} | {len(paired)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mode", choices=("smoke", "quick", "full"), default="full",
                        help="quick: the positive control, probes only; smoke: tiny, for the tests")
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), help="a subset of the mode's arms")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the mode's (3 seeds)")
    parser.add_argument("--no-finetune", action="store_true", help="probes only")
    parser.add_argument("--stage-steps", type=int, default=STAGE_STEPS,
                        help="M3's steps per stage, which set every arm's pre-training compute (default %(default)s)")
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS,
                        help="the fine-tuning read-out's steps (default %(default)s); each length is kept apart")
    parser.add_argument("--variant", default=VARIANT, help="the ViT of every arm, width x depth x heads / patch "
                        "(default %(default)s)")
    parser.add_argument("--batch", type=int, default=BATCH, help="the batch of every stage and read-out "
                        "(default %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes that pre-train and read out "
                        "arm-seeds side by side (default %(default)s)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: the report of the runs "
                        "already read out (while others are still training, or after some were stopped)")
    parser.add_argument("--describe-data", action="store_true", help="print the sets' class shares and the "
                        "image-blind predictor, then stop")
    args = parser.parse_args()
    for flag in ("stage_steps", "finetune_steps", "batch", "jobs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    from mmcmae_jax.models.vit import parse_variant
    try:
        parse_variant(args.variant)
    except ValueError as err:
        parser.error(f"--variant: {err}")
    s = settings(args.mode, args.stage_steps, args.finetune_steps, args.variant, args.batch)
    arms = tuple(args.arms or MODE_ARMS[args.mode])
    seeds = tuple(args.seeds or ((0, 1) if args.mode == "smoke" else (0, 1, 2)))
    readouts = ("probe",) if args.no_finetune or args.mode == "quick" else READOUTS
    os.makedirs(args.workdir, exist_ok=True)
    claim_workdir(args.workdir, s)
    quiet_logs()
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pretraining_study_xla_") as cache_root:
        use_compilation_cache(os.path.join(cache_root, "main"))
        return study(args, s, arms, seeds, readouts, cache_root)


def study(args, s: dict, arms, seeds, readouts, cache_root: str) -> int:
    started = time.time()
    log = StudyLog(os.path.join(args.workdir, "study.log"), started)
    sets = make_data(args.workdir, s)
    data = describe_data(sets, s, log)
    if args.describe_data:
        return 0
    flops = step_flops(s, arms, os.path.join(args.workdir, "flops.json"))
    plan, budget = pretrain_plan(s, flops, arms)
    log(f"budget {budget / 1e12:.2f} TFLOPs per arm; plan " + "; ".join(
        f"{a}: {' + '.join(str(n) for _, _, n in p) or 0} steps" for a, p in plan.items()))

    results, pretrain_log = {str(seed): {} for seed in seeds}, {}
    units = unit_order(plan, arms, seeds)
    if args.report_only:
        finished = []
        for seed, arm in units:
            out_dir = os.path.join(args.workdir, f"seed{seed}", "readout", arm)
            if all(os.path.exists(os.path.join(out_dir, f"{readout_name(r, s)}.json")) for r in readouts):
                finished.append((seed, arm, encoder_workdir(plan, arm, seed, args.workdir),
                                 {r: cached(os.path.join(out_dir, f"{readout_name(r, s)}.json"), None)
                                  for r in readouts}))
            else:
                log(f"{arm} seed {seed}: not read out yet, left out of the report")
    else:
        finished = run_units(units, args.jobs, dict(s=s, plan=plan, root=args.workdir, sets=sets, frames=data["frames"],
                                                    readouts=readouts, log=log, cache_root=cache_root))
    for seed, arm, encoder_dir, arm_results in finished:
        results[str(seed)][arm] = arm_results
        if seed == seeds[0] and encoder_dir:
            pretrain_log[arm] = final_losses(encoder_dir)

    text = report(results, data["blind"], arms, readouts, seeds, plan, flops, pretrain_log, s)
    total = time.time() - started
    text = ("Report of the finished runs (--report-only).\n\n" if args.report_only
            else f"Total wall time {total / 60:.1f} min.\n\n") + text
    with open(os.path.join(args.workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(dict(settings=s, seeds=seeds, arms=arms, plan=plan, flops_per_step=flops, budget_flops=budget,
                       image_blind=data["blind"], results=results, total_seconds=total), f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
