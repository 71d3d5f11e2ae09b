"""The trainer: optimizer, sharded steps on 8 simulated devices, two processes, resume after SIGKILL,
SIGTERM, and non-finite losses."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmcmae_jax.objectives import make_objective
from mmcmae_jax.train.checkpoint import restore_params
from mmcmae_jax.train.optim import decay_mask, make_optimizer, optim_config
from mmcmae_jax.train.sharding import fsdp_spec
from mmcmae_jax.train.trainer import NonFiniteError, train
from conftest import random_frames, tiny_trainer_config

TINY_TRAIN = os.path.join(os.path.dirname(__file__), "tiny_train.py")


def run_tiny(tmp_path, name, *args, env=None, **kwargs):
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, TINY_TRAIN, "--workdir", str(tmp_path / name), "--out", str(out), *args]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300, **kwargs)
    return json.loads(out.read_text())


def losses_of(result):
    return {h["step"]: h["loss"] for h in result["history"]}


def test_weight_decay_only_on_matrices():
    params = {"blocks_0": {"attn": {"qkv": {"kernel": np.zeros((4, 12)), "bias": np.zeros(12)}},
                           "norm1": {"scale": np.zeros(4), "bias": np.zeros(4)}},
              "cls_token": np.zeros((1, 1, 4)), "depth_mask_token": np.zeros((1, 1, 4)),
              "pos_embed": np.zeros((1, 5, 4)), "patch_embed": {"proj": {"kernel": np.zeros((2, 2, 3, 4))}}}
    mask = decay_mask(params)
    assert mask["blocks_0"]["attn"]["qkv"]["kernel"] and mask["patch_embed"]["proj"]["kernel"]
    assert not any([mask["blocks_0"]["attn"]["qkv"]["bias"], mask["blocks_0"]["norm1"]["scale"],
                    mask["cls_token"], mask["depth_mask_token"], mask["pos_embed"]])


def test_schedule_warms_up_then_decays_and_bad_values_name_field():
    config = optim_config()
    config.warmup_steps = 10
    _, schedule = make_optimizer(config, total_steps=100, global_batch=512)
    peak = 1.5e-4 * 512 / 256
    assert float(schedule(0)) == 0.0 and abs(float(schedule(10)) - peak) < 1e-9
    assert float(schedule(99)) < 0.01 * peak
    config.weight_decay = -1.0
    with pytest.raises(ValueError, match=r"config\.optim\.weight_decay"):
        make_optimizer(config, 100, 256)


def _adamw_steps(optimizer, params, grads_per_step):
    state = optimizer.init(params)
    for grads in grads_per_step:
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_optimizer_equals_optax_clip_then_adamw_and_skips_nonfinite_steps():
    config = optim_config()
    config.update(warmup_steps=2, grad_clip=1.0)
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "bias": jnp.zeros(5)}
    # Norms of about 0.1 and 30: the clip is inactive in the first step and active in the second.
    grads = [jax.tree.map(lambda p, s=s: jnp.asarray(rng.normal(size=p.shape) * s, jnp.float32), params)
             for s in (0.02, 6.0, 0.5)]
    ours, schedule = make_optimizer(config, total_steps=10, global_batch=256)
    reference = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, config.b1, config.b2, weight_decay=config.weight_decay,
                                        mask=decay_mask))
    got, _ = _adamw_steps(ours, params, grads)
    want, _ = _adamw_steps(reference, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)

    # A NaN (or inf) gradient moves no parameter and leaves the optimizer state finite.
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[1])
    inf = jax.tree.map(lambda g: g.at[0].set(jnp.inf), grads[1])
    after, state = _adamw_steps(ours, params, [grads[0], bad, inf])
    before, _ = _adamw_steps(ours, params, [grads[0]])
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))

    # grad_clip = 0: no clipping, plain AdamW.
    config.grad_clip = 0.0
    unclipped, schedule = make_optimizer(config, total_steps=10, global_batch=256)
    plain = optax.adamw(schedule, config.b1, config.b2, weight_decay=config.weight_decay, mask=decay_mask)
    got, _ = _adamw_steps(unclipped, params, grads)
    want, _ = _adamw_steps(plain, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_fsdp_spec_splits_large_leaves_only():
    assert fsdp_spec((768, 2304), 4) == jax.sharding.PartitionSpec(None, "fsdp")
    assert fsdp_spec((768,), 4) == jax.sharding.PartitionSpec()
    assert fsdp_spec((768, 2304), 1) == jax.sharding.PartitionSpec()


@pytest.mark.slow
def test_data_parallel_and_fsdp_on_8_devices_match_one_device(tmp_path):
    stage = 2  # the step is the same code for both stages; stage 2 has the most parameter kinds
    one = run_tiny(tmp_path, "one", "--stage", str(stage))
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
    dp = run_tiny(tmp_path, "dp", "--stage", str(stage), env=env)
    fsdp = run_tiny(tmp_path, "fsdp", "--stage", str(stage), "--fsdp", "4", env=env)
    assert one["devices"] == 1 and dp["devices"] == 8 == fsdp["devices"]
    reference = losses_of(one)
    assert len(reference) == 4
    for other in (dp, fsdp):
        np.testing.assert_allclose(list(losses_of(other).values()), list(reference.values()), rtol=2e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_in_lockstep_like_one(tmp_path):
    port = str(free_port())
    out = tmp_path / "two.json"
    procs = [subprocess.Popen([sys.executable, TINY_TRAIN, "--workdir", str(tmp_path / "two"), "--out", str(out),
                               "--num_processes", "2", "--process_id", str(i), "--port", port],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    two = json.loads(out.read_text())
    one = run_tiny(tmp_path, "one")
    assert two["devices"] == 2
    np.testing.assert_allclose(list(losses_of(two).values()), list(losses_of(one).values()), rtol=2e-5)


def wait_for_step(metrics_file, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics_file.exists():
            steps = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
    common = ["--stage", "2", "--steps", "12", "--checkpoint_every", "3", "--async_checkpoint"]
    reference = losses_of(run_tiny(tmp_path, "reference", *common))
    workdir, out = tmp_path / "killed", tmp_path / "killed.json"
    cmd = [sys.executable, TINY_TRAIN, "--workdir", str(workdir), "--out", str(out), *common]
    proc = subprocess.Popen(cmd + ["--seconds_per_batch", "0.3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(workdir / "metrics.jsonl", 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    resumed = losses_of(json.loads(out.read_text()))
    assert 3 < min(resumed) <= 8, resumed  # it restarted from a checkpoint mid-run, not from scratch
    for step, loss in resumed.items():
        assert loss == reference[step], (step, loss, reference[step])  # bit for bit


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tmp_path):
    common = ["--stage", "1", "--steps", "40", "--checkpoint_every", "1000"]
    workdir, out = tmp_path / "term", tmp_path / "term.json"
    cmd = [sys.executable, TINY_TRAIN, "--workdir", str(workdir), "--out", str(out), *common]
    proc = subprocess.Popen(cmd + ["--seconds_per_batch", "0.2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(workdir / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    first = json.loads(out.read_text())
    assert first["preempted"]
    stopped_at = max(losses_of(first))
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert min(losses_of(json.loads(out.read_text()))) == stopped_at + 1


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    def batch(step):
        frames = random_frames(batch=4, seed=step, valid_fraction=1.0)
        if step == 4:  # a corrupt frame reaches the model in the 5th step
            frames["depth_scale"][0] = np.nan  # a frame whose depth is NaN reaches the model
        return frames

    iterator = iter(grain.MapDataset.range(100).map(batch).to_iter_dataset())
    with pytest.raises(NonFiniteError, match=r"step 5: .*loss=nan"):
        config = tiny_trainer_config(total_steps=10, log_every=100, async_checkpoint=True)
        train(config, str(tmp_path), iterator, make_objective(config))
    checkpoints = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert checkpoints[-1] == 4
    params = restore_params(str(tmp_path))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


def test_terminal_line_prints_each_loss_over_its_trivial_value(tmp_path, capsys):
    """`depth 0.3123/0.9871` on the terminal; metrics.jsonl keeps `depth` and `depth_trivial` apart."""
    from mmcmae_jax.train.metrics import MetricWriter
    writer = MetricWriter(str(tmp_path), "stage2", total_steps=10)
    writer.start(0)
    metrics = dict(depth=0.31234, depth_trivial=0.98712, distill=0.1, distill_trivial=0.25, loss=0.41234,
                   sigma_mean=0.5, grad_norm=1.0, learning_rate=1e-3)
    writer.write(1, {k: np.float32(v) for k, v in metrics.items()}, images_per_step=8)
    writer.close()
    line = capsys.readouterr().out
    assert "| depth 0.3123/0.9871 distill 0.1000/0.2500 loss 0.4123 sigma_mean 0.5000 | grad_norm 1.000" in line
    logged = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert {"depth", "depth_trivial", "distill", "distill_trivial"} <= set(logged)
    assert abs(logged["depth_trivial"] - 0.98712) < 1e-6


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch installed to mean anything")
def test_tensorboard_writer_does_not_load_pytorch(tmp_path):
    """tensorboardX would import an installed PyTorch (3 s at every start) for tensors never passed here;
    once PyTorch is loaded anyway, the writer still works."""
    script = ("import sys; from mmcmae_jax.train.metrics import MetricWriter\n"
              "for name in ('a', 'b'):\n"
              "    writer = MetricWriter(sys.argv[1] + '/' + name, 'stage1', total_steps=1); writer.start(0)\n"
              "    writer.write(1, {'loss': 1.0}, images_per_step=1); writer.close()\n"
              "    print(name, 'torch' in sys.modules)\n"
              "    import torch\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = [line for line in run.stdout.splitlines() if line.startswith(("a ", "b "))]
    assert loaded == ["a False", "b True"], run.stdout
    assert os.listdir(tmp_path / "a" / "tensorboard") and os.listdir(tmp_path / "b" / "tensorboard")
