#!/usr/bin/env bash
# Create a Cloud TPU VM (a single host or a pod slice), install mmcmae_jax on every worker, train on
# every worker, follow and stop the run, delete the TPU. See launch/README.md.
set -euo pipefail

SCRIPT_NAME=tpu_pod.sh
DRY_RUN=0
# shellcheck source=SCRIPTDIR/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# Where things live on each worker (relative to the login user's home directory).
REMOTE_REPO=mmcmae_jax
REMOTE_VENV=mmcmae_venv
REMOTE_LOG=mmcmae_train.log
REMOTE_PID=mmcmae_train.pid

usage() {
  cat <<EOF
Usage: launch/tpu_pod.sh COMMAND --name NAME --zone ZONE [options]

Commands:
  create      create the TPU VM (needs --accelerator-type)
  install     on every worker: clone --repo at --branch into ~/$REMOTE_REPO, make the virtual
              environment ~/$REMOTE_VENV, pip install "jax[tpu]" and the package
  copy-data   on every worker: copy --data gs://... to the local directory --to
  train       on every worker: start the training in the background (log ~/$REMOTE_LOG);
              a run already going on a worker is an error, as is a local --data path that
              a worker does not have
  logs        print the end of the training log of one worker (--worker, default 0)
  stop        on every worker: send SIGTERM to the run, so the trainer saves a checkpoint
  status      describe the TPU VM
  ssh         open a shell on one worker (--worker, default 0)
  delete      delete the TPU VM

Every command:
  --name NAME             TPU VM name (required)
  --zone ZONE             zone, e.g. us-central2-b (required)
  --project PROJECT       Google Cloud project (default: gcloud's configured project)
  --dry-run               print the gcloud commands instead of running them
  -h, --help              show this help

create:
  --accelerator-type T    v2-8, v3-32, v4-32, v5p-16, v5litepod-16, v6e-64, ... (required)
  --version RUNTIME       TPU software version (default by generation: tpu-ubuntu2204-base for
                          v2/v3/v4, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5litepod,
                          v2-alpha-tpuv6e for v6e)
  --spot                  create a Spot TPU (cheaper; can be preempted at any time)

install:
  --repo URL              git URL of mmcmae_jax to clone on the workers (required)
  --branch BRANCH         branch or tag to check out (default: main)

copy-data:
  --data gs://...         the data to copy (required)
  --to DIR                absolute path on each worker (required); then train with --data DIR

train:
  --workdir DIR           gs://bucket/path (shared by all workers: required on multi-host slices)
                          or an absolute path on each worker's disk (single-host slices only)
  --accelerator-type T    if given, checks that a local --workdir is on a single-host slice
  --foreground            stream the run's output instead of starting it in the background

$PLAN_USAGE

logs, ssh:
  --worker N              the worker (default 0)
  --follow                logs: keep following the log (tail -f)

Examples:
  launch/tpu_pod.sh create  --name m3 --zone us-central2-b --accelerator-type v4-32
  launch/tpu_pod.sh install --name m3 --zone us-central2-b --repo https://github.com/ORG/mmcmae_jax
  launch/tpu_pod.sh train   --name m3 --zone us-central2-b --workdir gs://BUCKET/runs/m3_b16 \\
      --data gs://BUCKET/data/scannet_rgbd --preset vit_b16 --config.batch_size=2048
  launch/tpu_pod.sh logs    --name m3 --zone us-central2-b --follow
  launch/tpu_pod.sh delete  --name m3 --zone us-central2-b
EOF
}

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
case "$1" in
  -h | --help) usage; exit 0 ;;
  create | install | copy-data | train | logs | stop | status | ssh | delete) COMMAND=$1; shift ;;
  *) die "unknown command '$1' (one of: create, install, copy-data, train, logs, stop, status, ssh, delete)" ;;
esac

NAME=""
ZONE=""
PROJECT=""
ACCELERATOR=""
VERSION=""
SPOT=0
REPO=""
BRANCH=main
COPY_TO=""
FOREGROUND=0
WORKER=0
FOLLOW=0

while [[ $# -gt 0 ]]; do
  # Accept --option=value as well as --option value (but --config.FIELD=VALUE is one argument).
  if [[ "$1" == --[a-z]*=* && "$1" != --config.* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --spot) SPOT=1; shift ;;
    --foreground) FOREGROUND=1; shift ;;
    --follow) FOLLOW=1; shift ;;
    --name) need_value "$1" "${2-}"; NAME=$2; shift 2 ;;
    --zone) need_value "$1" "${2-}"; ZONE=$2; shift 2 ;;
    --project) need_value "$1" "${2-}"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$1" "${2-}"; ACCELERATOR=$2; shift 2 ;;
    --version) need_value "$1" "${2-}"; VERSION=$2; shift 2 ;;
    --repo) need_value "$1" "${2-}"; REPO=$2; shift 2 ;;
    --branch) need_value "$1" "${2-}"; BRANCH=$2; shift 2 ;;
    --to) need_value "$1" "${2-}"; COPY_TO=$2; shift 2 ;;
    --worker) need_value "$1" "${2-}"; WORKER=$2; shift 2 ;;
    --workdir) need_value "$1" "${2-}"; WORKDIR=$2; shift 2 ;;
    --stage | --preset | --config | --module | --init-from | --data)
      need_value "$1" "${2-}"; plan_option "$1" "$2"; shift 2 ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    --) shift; EXTRA_ARGS+=("$@"); break ;;
    -*) die "unknown option '$1'" ;;
    *) die "unexpected argument '$1' (config overrides are written --config.FIELD=VALUE)" ;;
  esac
done

# --- Validation --------------------------------------------------------------------------------

[[ -n "$NAME" ]] || die "--name is required"
# TPU names: lowercase letters, digits and hyphens, starting with a letter (a GCE resource name).
[[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
  || die "--name '$NAME' must be lowercase letters, digits and hyphens, starting with a letter"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' does not look like a zone, e.g. us-central2-b"
is_uint "$WORKER" || die "--worker '$WORKER' must be a worker number (0, 1, ...)"

# The number after the generation counts TensorCores (v2-v4, v5p) or chips (v5litepod, v6e); either
# way a slice larger than 8 spans several hosts.
check_accelerator() {
  [[ "$ACCELERATOR" =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$ ]] \
    || die "--accelerator-type '$ACCELERATOR' must look like v4-32, v5p-16, v5litepod-16 or v6e-8"
}
multi_host() { [[ "${ACCELERATOR##*-}" -gt 8 ]]; }

default_version() {
  case "${ACCELERATOR%-*}" in
    v2 | v3 | v4) echo tpu-ubuntu2204-base ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v6e) echo v2-alpha-tpuv6e ;;
  esac
}

check_location() { # OPTION VALUE: gs:// or an absolute path on the workers
  [[ "$2" == gs://?* || "$2" == /* ]] \
    || die "$1 '$2' must be gs://bucket/path or an absolute path on the workers"
}

case "$COMMAND" in
  create)
    [[ -n "$ACCELERATOR" ]] || die "create needs --accelerator-type, e.g. v4-32"
    check_accelerator
    VERSION=${VERSION:-$(default_version)}
    ;;
  install)
    [[ -n "$REPO" ]] || die "install needs --repo URL (the git repository to clone on every worker)"
    [[ "$BRANCH" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--branch '$BRANCH' is not a valid branch name"
    ;;
  copy-data)
    [[ -n "$DATA" ]] || die "copy-data needs --data gs://..."
    [[ "$DATA" == gs://?* ]] || die "--data '$DATA' must be gs://bucket/path for copy-data"
    [[ -n "$COPY_TO" ]] || die "copy-data needs --to DIR"
    [[ "$COPY_TO" == /* ]] || die "--to '$COPY_TO' must be an absolute path on the workers"
    ;;
  train)
    check_plan
    check_location --workdir "$WORKDIR"
    [[ -z "$DATA" || "$DATA" == "$PROCEDURAL_DATA" ]] || check_location --data "$DATA"
    [[ -z "$INIT_FROM" ]] || check_location --init-from "$INIT_FROM"
    # The workers run the repository's copy of the config, so it must be a path inside it.
    [[ "${CONFIG%%:*}" != /* ]] \
      || die "--config '$CONFIG' must be relative to the repository root (the workers have their own checkout)"
    if [[ "$WORKDIR" != gs://* ]]; then
      # Every worker writes its part of a checkpoint into the work directory, so on several hosts it
      # must be one shared location.
      if [[ -z "$ACCELERATOR" ]]; then
        warn "--workdir '$WORKDIR' is on each worker's own disk: that only works on a single-host slice (pass --accelerator-type to check)"
      else
        check_accelerator
        ! multi_host || die "--workdir '$WORKDIR' is local, but $ACCELERATOR has several hosts: use gs://bucket/path"
      fi
    fi
    check_data  # a local path is on the workers' disks: checked there, before the run starts
    ;;
esac

# --- Commands ----------------------------------------------------------------------------------

LOCATION=(--zone "$ZONE")
[[ -z "$PROJECT" ]] || LOCATION+=(--project "$PROJECT")

# Shell lines that stop a worker whose disk lacks a local data path of the run (copy-data puts it
# there), before anything starts on any worker's behalf. Run from the repository, as the trainer is.
worker_data_check() {
  local given part
  while IFS=$'\t' read -r given part; do
    # shellcheck disable=SC2016 # $(hostname) is for the worker's shell to expand
    printf 'compgen -G %s >/dev/null || { echo "worker $(hostname):" %s >&2; exit 2; }\n' "$(quote_word "$part")" \
      "$(quote_word "$given: nothing at $part on this worker (tpu_pod.sh copy-data puts data there)")"
  done < <(local_data_parts)
}

on_workers() { # WORKERS SCRIPT: run SCRIPT with bash on the given workers ("all" or a number)
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" "--worker=$1" "--command=$2"
}

case "$COMMAND" in
  create)
    cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
      "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
    [[ "$SPOT" == 0 ]] || cmd+=(--spot)
    run "${cmd[@]}"
    ;;

  install)
    repo_q=$(quote_word "$REPO")
    branch_q=$(quote_word "$BRANCH")
    # Re-running install updates the checkout, so it is also how to deploy a new commit.
    on_workers all "set -euo pipefail
if [ -d ~/$REMOTE_REPO/.git ]; then
  git -C ~/$REMOTE_REPO fetch --depth=1 origin $branch_q
  git -C ~/$REMOTE_REPO checkout --force FETCH_HEAD
else
  git clone --depth=1 --branch $branch_q $repo_q ~/$REMOTE_REPO
fi
# TPU VM images may lack the venv module; install it only when missing.
python3 -m venv ~/$REMOTE_VENV 2>/dev/null || {
  sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3-venv
  python3 -m venv ~/$REMOTE_VENV
}
~/$REMOTE_VENV/bin/pip install -q --upgrade pip
~/$REMOTE_VENV/bin/pip install -q 'jax[tpu]'
~/$REMOTE_VENV/bin/pip install -q -e ~/$REMOTE_REPO
# Only an import check: touching the TPU here would wait for every other worker to get this far.
~/$REMOTE_VENV/bin/python -c 'import jax, mmcmae_jax; print(\"jax\", jax.__version__, \"ok\")'"
    ;;

  copy-data)
    to_q=$(quote_word "$COPY_TO")
    on_workers all "set -euo pipefail
mkdir -p $to_q
gcloud storage cp --recursive $(quote_word "$(strip_slash "$DATA")/*") $to_q/"
    ;;

  train)
    plan_runs
    joined=""
    for cmd in "${RUNS[@]}"; do joined+="${joined:+ && }$cmd"; done
    if [[ "$FOREGROUND" == 1 ]]; then
      start="$joined"
    else
      # setsid gives the run its own process group, whose id is recorded, so that `stop` signals the
      # trainer and the shell around it together (and a later stage then does not start); nohup and
      # the redirections let it outlive the ssh session.
      start="setsid nohup bash -c $(quote_word "$joined") >~/$REMOTE_LOG 2>&1 </dev/null &
echo \$! >~/$REMOTE_PID
echo \"worker \$(hostname): started, log in ~/$REMOTE_LOG\""
    fi
    on_workers all "set -euo pipefail
if [ -f ~/$REMOTE_PID ] && kill -0 -- -\"\$(cat ~/$REMOTE_PID)\" 2>/dev/null; then
  echo \"worker \$(hostname): a run is already going (process group \$(cat ~/$REMOTE_PID)); stop it first\" >&2
  exit 1
fi
cd ~/$REMOTE_REPO
$(worker_data_check)
. ~/$REMOTE_VENV/bin/activate
$start"
    ;;

  logs)
    if [[ "$FOLLOW" == 1 ]]; then
      on_workers "$WORKER" "tail -n 100 -F ~/$REMOTE_LOG"
    else
      on_workers "$WORKER" "tail -n 100 ~/$REMOTE_LOG"
    fi
    ;;

  stop)
    # SIGTERM, not SIGKILL: the trainer saves a checkpoint and exits; `train` later resumes from it.
    on_workers all "if [ -f ~/$REMOTE_PID ] && kill -TERM -- -\"\$(cat ~/$REMOTE_PID)\" 2>/dev/null; then
  echo \"worker \$(hostname): sent SIGTERM\"
else
  echo \"worker \$(hostname): no run going\"
fi"
    ;;

  status)
    run gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}"
    ;;

  ssh)
    run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" "--worker=$WORKER"
    ;;

  delete)
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}"
    ;;
esac
