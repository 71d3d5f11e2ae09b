"""Fine-tuning on real NYU Depth V2 frames (../shared/data/rgbd_real/nyu_mini): a tiny ViT for a few
steps at 64 px, through the commands, with metrics checked against the real labels."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NYU = os.path.join(ROOT, "..", "shared", "data", "rgbd_real", "nyu_mini")
SIZE = 64
TINY = ["--config.model.variant=64x2x2/8", f"--config.model.image_size={SIZE}", "--config.head.features=32",
        "--config.batch_size=8", "--config.eval.batch_size=8", "--config.optim.lr=0.002",
        "--config.optim.warmup_steps=1", "--config.log_every=1", "--config.checkpoint_every=100",
        "--config.async_checkpoint=False"]

pytestmark = pytest.mark.skipif(not os.path.isdir(NYU), reason=f"the real NYU frames are not at {NYU}")


def link_frames(out, ids, with_labels):
    """A folder of links to some NYU frames (the frames stay where they are)."""
    for sub in ("rgb", "depth_mm") + (("label40",) if with_labels else ()):
        os.makedirs(os.path.join(out, sub))
        for i in ids:
            os.symlink(os.path.join(os.path.abspath(NYU), sub, f"{i:04d}.png"), os.path.join(out, sub, f"{i:04d}.png"))
    return out


def convert(root, out, with_labels):
    args = [sys.executable, "-m", "mmcmae_jax.data.convert", "folder", "--root", root, "--rgb", "rgb/*.png",
            "--depth", "depth_mm/*.png", "--depth-scale", "0.001", "--source", "nyu_depth_v2", "--out", out]
    if with_labels:
        args += ["--label", "label40/*.png", "--label-set", "nyu40", "--labels-one-based"]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nyu")
    split = json.load(open(os.path.join(NYU, "split.json")))
    labelled = convert(link_frames(str(tmp / "labelled_src"), split["labeled"], True), str(tmp / "labelled"), True)
    train = convert(link_frames(str(tmp / "train_src"), split["train"], False), str(tmp / "train"), False)
    return {"labelled": labelled, "train": train, "labelled_ids": split["labeled"], "tmp": tmp}


def labelled_pixels_after_eval_transform(ids):
    """Independently of the pipeline: central 480x480 square, nearest resize, count of nyu40 ids > 0."""
    total = 0
    for i in ids:
        label = Image.open(os.path.join(NYU, "label40", f"{i:04d}.png"))
        width, height = label.size
        side = min(width, height)
        box = ((width - side) // 2, (height - side) // 2, (width - side) // 2 + side, (height - side) // 2 + side)
        total += int((np.asarray(label.resize((SIZE, SIZE), Image.NEAREST, box=box)) > 0).sum())
    return total


def losses_of(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["loss"] for r in records if r["stage"] == "finetune"]  # not the evaluations (finetune_eval)


@pytest.mark.slow
def test_segmentation_on_real_nyu_labels_through_both_commands(nyu):
    work = str(nyu["tmp"] / "seg")
    run = subprocess.run([sys.executable, "-m", "mmcmae_jax.finetune", "--config", "configs/finetune_nyu_seg.py",
                          "--workdir", work, *TINY, "--config.total_steps=12",
                          f"--config.data.path={nyu['labelled']}", f"--config.eval_data.path={nyu['labelled']}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    losses = losses_of(work)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    results = json.load(open(os.path.join(work, "eval", "step_12.json")))
    m = results["metrics"]
    assert results["frames"] == len(nyu["labelled_ids"]) == 8
    # Every labelled pixel of the real label maps, and nothing else, is in the confusion matrix.
    assert m["labelled_pixels"] == labelled_pixels_after_eval_transform(nyu["labelled_ids"])
    assert np.sum(results["confusion"]) == m["labelled_pixels"]
    assert 0 < m["miou"] <= 1 and 0 < m["pixel_acc"] <= 1 and 0 < m["mean_class_acc"] <= 1
    assert results["per_class_iou"]["wall"] is not None and len(results["per_class_iou"]) == 40
    assert "miou" in run.stdout and "per-class IoU" in run.stdout

    # The evaluation command on the same checkpoint gives the same numbers.
    out = str(nyu["tmp"] / "seg_eval.json")
    run = subprocess.run([sys.executable, "-m", "mmcmae_jax.evaluate", "--config", "configs/finetune_nyu_seg.py",
                          "--workdir", work, "--out", out, *TINY, f"--config.eval_data.path={nyu['labelled']}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    again = json.load(open(out))
    assert again["confusion"] == results["confusion"] and again["step"] == 12


def load_config(name, preset=""):
    spec = importlib.util.spec_from_file_location("nyu_config", os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def tiny(config, steps):
    config.model.update(variant="64x2x2/8", image_size=SIZE)
    config.head.features = 32
    config.update(batch_size=8, total_steps=steps, log_every=1, checkpoint_every=100, async_checkpoint=False)
    config.optim.update(lr=2e-3, warmup_steps=1)
    config.eval.batch_size = 8
    return config


@pytest.mark.slow
def test_depth_on_real_nyu_frames_in_metres_inside_the_eigen_crop(nyu):
    from mmcmae_jax.finetune import run_finetune
    config = tiny(load_config("finetune_nyu_depth.py"), steps=12)
    config.data.path, config.eval_data.path = nyu["train"], nyu["labelled"]
    work = str(nyu["tmp"] / "depth")
    result, results = run_finetune(config, work)
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    m = results["metrics"]
    assert results["frames"] == 8 and results["nyu_crop"]
    # The test frames' depth is measured everywhere (1.3 m - 5 m); the Eigen crop keeps rows 45..470
    # of 480, i.e. output rows 6..62 of 64 (centres (r + 0.5) * 7.5): 57 x 64 pixels a frame.
    depth = [np.asarray(Image.open(os.path.join(NYU, "depth_mm", f"{i:04d}.png"))) for i in nyu["labelled_ids"]]
    assert all((d > 0).all() and d.max() < 10_000 for d in depth)
    assert results["valid_pixels"] == 8 * 57 * 64
    assert all(np.isfinite(v) for v in m.values())
    assert 0 <= m["delta1"] <= m["delta2"] <= m["delta3"] <= 1
    assert 0 < m["abs_rel"] < 1 and 0 < m["rmse"] < 5 and 0 < m["rmse_log"] < 2 and 0 < m["log10"] < 1


@pytest.mark.slow  # reads the run of the segmentation test above
def test_linear_probe_on_a_frozen_encoder_from_a_finetuned_run(nyu):
    """The encoder of another run (here: the segmentation run's), frozen, read by a linear head."""
    from mmcmae_jax.finetune import run_finetune
    from mmcmae_jax.train.checkpoint import restore_params
    from mmcmae_jax.run.workdir import load_params
    seg_work = str(nyu["tmp"] / "seg")
    if not os.path.isdir(os.path.join(seg_work, "checkpoints")):
        pytest.skip("needs the segmentation run of test_segmentation_on_real_nyu_labels_through_both_commands")
    config = tiny(load_config("finetune_nyu_seg.py", "linear"), steps=3)
    config.init_from = seg_work
    config.data.path = config.eval_data.path = nyu["labelled"]
    work = str(nyu["tmp"] / "probe")
    result, results = run_finetune(config, work)
    assert set(restore_params(work)) == {"head"}  # the encoder trains not and is not checkpointed
    source = restore_params(seg_work)["rgb_encoder"]
    params, _ = load_params(work)
    np.testing.assert_array_equal(params["rgb_encoder"]["blocks"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                  source["blocks"]["blocks_1"]["attn"]["qkv"]["kernel"])
    assert results["metrics"]["labelled_pixels"] == labelled_pixels_after_eval_transform(nyu["labelled_ids"])
