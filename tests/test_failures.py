"""Every expected failure ends a command in one line and the right exit status; a failed checkpoint save
stops the run at once; resume skips a corrupt checkpoint; a non-finite step is named by its own number;
metrics.jsonl and TensorBoard hold each step once after a resume (issue 20, items 1-4)."""
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from mmcmae_jax.errors import NonFiniteError
from mmcmae_jax.objectives import make_objective
from mmcmae_jax.train.trainer import train
from conftest import random_frames, tiny_trainer_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["--config.stage1.model.variant=64x2x2/8", "--config.stage1.model.image_size=32",
              "--config.stage1.model.proj_hidden=64", "--config.stage1.model.proj_dim=32"]


def batches(nan_at=None):
    def batch(index):
        frames = random_frames(batch=4, seed=index, valid_fraction=1.0)
        if index == nan_at:
            frames["depth_scale"][0] = np.nan  # a frame whose depth is NaN reaches the model
        return frames
    return iter(grain.MapDataset.range(1000).map(batch).to_iter_dataset())


def test_nonfinite_step_is_named_by_its_own_number_when_it_logs_nothing(tmp_path):
    config = tiny_trainer_config(total_steps=10, log_every=100, checkpoint_every=100)
    with pytest.raises(NonFiniteError, match=r"at step 4: .*loss=nan.*went on to step 10"):
        train(config, str(tmp_path), batches(nan_at=3), make_objective(config))  # the 4th batch: step 4
    assert not os.path.isdir(tmp_path / "checkpoints" / "10")  # nothing saved after the bad step


def logged_steps(workdir):
    return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def event_steps(workdir, tag="train/loss"):
    from tensorboardX.proto.event_pb2 import Event
    from mmcmae_jax.data.records import read_tfrecord
    directory = os.path.join(workdir, "tensorboard")
    steps = []
    for name in sorted(os.listdir(directory)):
        for _, data in read_tfrecord(os.path.join(directory, name)):
            event = Event.FromString(data)
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_resume_skips_a_corrupt_checkpoint_and_each_step_is_logged_once(tmp_path, capsys):
    import shutil
    workdir = str(tmp_path)
    config = tiny_trainer_config(total_steps=6)
    train(config, workdir, batches(), make_objective(config))
    # A run killed at step 6 after the checkpoint of step 6 was cut: its files hold garbage.
    state = tmp_path / "checkpoints" / "6" / "state"
    for root, _, files in os.walk(state):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0garbage")
    capsys.readouterr()
    train(config, workdir, batches(), make_objective(config))
    err = capsys.readouterr().err
    assert "skipping the checkpoint of step 6" in err and "6.unreadable" in err
    assert (tmp_path / "checkpoints" / "6.unreadable").is_dir() and (tmp_path / "checkpoints" / "6").is_dir()
    assert logged_steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert event_steps(workdir) == [1, 2, 3, 4, 5, 6]
    # Once more, from the intact step 6: nothing is repeated.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    train(config, workdir, batches(), make_objective(config))
    assert logged_steps(workdir) == [1, 2, 3, 4, 5, 6] and event_steps(workdir) == [1, 2, 3, 4, 5, 6]


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_failures import batches
from conftest import tiny_trainer_config
from mmcmae_jax.errors import run_reporting
from mmcmae_jax.objectives import make_objective
from mmcmae_jax.train.trainer import train
config = tiny_trainer_config(total_steps=8, checkpoint_every=2)
config.async_checkpoint = True
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
sys.exit(run_reporting(lambda: train(config, sys.argv[1], batches(), make_objective(config)) and 0))
"""


def test_failed_save_stops_the_run_at_once_and_leaves_no_temporary_folder(tmp_path):
    # Without the tests' compilation cache: under the file size limit it would write truncated entries.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    run = subprocess.run([sys.executable, "-c", FULL_DISK.format(tests=os.path.dirname(__file__)), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 1, run.stderr[-3000:]
    line = next(line for line in run.stderr.splitlines() if line.startswith("error:"))
    assert "could not be written" in line and "File too large" in line and "the run stopped at step" in line
    stopped = int(line.split("the run stopped at step ")[1].split(".")[0])
    assert stopped <= 3  # found at the step after the background write failed, not at the next save
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
    assert [line for line in run.stderr.splitlines() if line.strip()] == [line], run.stderr[-3000:]  # nothing else


def command(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def bad_inputs(tmp_path):
    """(name, module, args, exit status, words the line names) for each bad input."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)  # a header length no file has
    corrupt_run = tmp_path / "corrupt_run"
    (corrupt_run / "checkpoints" / "2" / "state").mkdir(parents=True)
    (corrupt_run / "checkpoints" / "2" / "state" / "_METADATA").write_text("{not json")
    demo = ["--config", "configs/demo.py:smoke"]
    from mmcmae_jax.data import procedural
    (shard,) = procedural.write_procedural_dataset(str(tmp_path / "records"), 16, 32, seed=0, num_shards=1,
                                                   format="tfrecord")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF  # inside a record's payload: its checksum no longer matches
    open(shard, "wb").write(bytes(data))
    return [
        ("a damaged record in the training data", "mmcmae_jax.pretrain",
         [*demo, "--workdir", str(tmp_path / "w"), f"--config.stage1.data.path={shard}"], 1,
         os.path.basename(shard)),
        ("a learning rate that makes the loss non-finite", "mmcmae_jax.pretrain",
         [*demo, "--workdir", str(tmp_path / "n"), "--config.stage1.optim.lr=1e30"], 1, "non-finite values at step"),
        ("missing --config file", "mmcmae_jax.pretrain",
         ["--config", "configs/no_such.py", "--workdir", str(tmp_path / "w")], 2, "no_such.py"),
        ("unknown flag", "mmcmae_jax.pretrain", [*demo, "--workdir", str(tmp_path / "w"), "--no_such_flag"], 2,
         "no_such_flag"),
        ("work directory that cannot be written", "mmcmae_jax.pretrain", [*demo, "--workdir", "/proc/mmcmae_w"], 2,
         "/proc/mmcmae_w"),
        ("records that do not exist", "mmcmae_jax.pretrain",
         [*demo, "--workdir", str(tmp_path / "w"), "--config.stage1.data.path=/no/such/records"], 2,
         "config.stage1.data.path"),
        ("init_from_mae: a malformed weights file", "mmcmae_jax.pretrain",
         [*demo, "--workdir", str(tmp_path / "w"), *TINY_MODEL, f"--config.stage1.init_from_mae={garbage}"], 2,
         "garbage.safetensors"),
        ("finetune: a field the data config no longer has", "mmcmae_jax.finetune",
         ["--config", "configs/finetune_procedural_depth.py", "--workdir", str(tmp_path / "f"),
          "--config.eval_data.seed=1"], 2, "set config.seed (shuffle and augmentation) or eval_data.procedural_seed"),
        ("finetune: records that do not exist", "mmcmae_jax.finetune",
         ["--config", "configs/finetune_nyu_depth.py", "--workdir", str(tmp_path / "f"),
          "--config.init_from=/no/such/run", "--config.data.path=/no/such", "--config.eval_data.path=/no/such"],
         2, "config.data.path"),
        ("evaluate: a corrupt checkpoint", "mmcmae_jax.evaluate",
         ["--config", "configs/finetune_nyu_depth.py", "--workdir", str(corrupt_run)], 1, "corrupt_run"),
        ("export: a malformed .safetensors", "mmcmae_jax.port.export",
         ["--checkpoint", str(garbage), "--out", str(tmp_path / "x.safetensors")], 1, "garbage.safetensors"),
        ("convert: a folder that does not exist", "mmcmae_jax.data.convert",
         ["folder", "--root", "/no/such/folder", "--rgb", "rgb/*.png", "--depth", "depth/*.png", "--depth-scale",
          "0.001", "--out", str(tmp_path / "records")], 1, "/no/such/folder"),
    ]


@pytest.mark.parametrize("case", range(12))  # one test per bad input, so that the workers share them
def test_bad_inputs_end_in_one_line_and_a_nonzero_exit(tmp_path, case):
    cases = bad_inputs(tmp_path)
    assert len(cases) == 12
    name, module, args, status, named = cases[case]
    run = command(module, *args)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == status and len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], (
        f"{name}: exit {run.returncode} (expected {status}), stderr {run.stderr[-1500:]!r}")


def test_only_closed_loop_reports_are_dropped_and_debug_keeps_them(monkeypatch):
    import types
    from mmcmae_jax.train.checkpoint import _drop_closed_loop_callbacks
    seen = []
    hook = _drop_closed_loop_callbacks(seen.append)
    closed, other = (types.SimpleNamespace(exc_value=RuntimeError(text))
                     for text in ("Event loop is closed", "something else"))
    hook(closed)
    hook(other)
    assert seen == [other]
    monkeypatch.setenv("MMCMAE_DEBUG", "1")
    hook(closed)
    assert seen == [other, closed]
