#!/usr/bin/env bash
# Train M3 on one CUDA GPU: stage 1 then stage 2, or one stage, or any single config.
# See launch/README.md.
set -euo pipefail

SCRIPT_NAME=gpu_single.sh
DRY_RUN=0
# shellcheck source=SCRIPTDIR/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: launch/gpu_single.sh --workdir DIR [options] [--config.FIELD=VALUE ...] [-- ARGS ...]

Runs the training on one CUDA GPU of this machine, in the foreground, from the repository root,
with the 'python' of the active environment (install: pip install "jax[cuda12]" && pip install -e .).
Interrupting it (Ctrl-C, SIGTERM) stops the run through SIGTERM, so the trainer saves a checkpoint;
running the same command again resumes from the work directory.

Required:
  --workdir DIR           work directory (local path or gs://bucket/path)

$PLAN_USAGE

Machine:
  --gpu ID                the GPU to use (CUDA_VISIBLE_DEVICES; default: \$CUDA_VISIBLE_DEVICES or 0)
  --mem-fraction F        share of GPU memory JAX preallocates, in (0, 1]
                          (XLA_PYTHON_CLIENT_MEM_FRACTION; default: its value in the environment or 0.9)
  --python PATH           the Python interpreter to run (default: python)
  --skip-checks           don't check nvidia-smi and the JAX CUDA backend first
  --dry-run               print the environment and the commands instead of running them
  -h, --help              show this help

Examples:
  launch/gpu_single.sh --workdir ~/runs/m3_b16 --data ~/data/scannet_rgbd
  launch/gpu_single.sh --workdir ~/runs/m3_s16 --preset vit_s16 --stage 2 --config.batch_size=64
  launch/gpu_single.sh --workdir /tmp/demo --config configs/demo.py --data procedural
EOF
}

GPU=""
MEM_FRACTION=""
PYTHON=python
SKIP_CHECKS=0

while [[ $# -gt 0 ]]; do
  # Accept --option=value as well as --option value (but --config.FIELD=VALUE is one argument).
  if [[ "$1" == --[a-z]*=* && "$1" != --config.* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --skip-checks) SKIP_CHECKS=1; shift ;;
    --workdir) need_value "$1" "${2-}"; WORKDIR=$2; shift 2 ;;
    --gpu) need_value "$1" "${2-}"; GPU=$2; shift 2 ;;
    --mem-fraction) need_value "$1" "${2-}"; MEM_FRACTION=$2; shift 2 ;;
    --python) need_value "$1" "${2-}"; PYTHON=$2; shift 2 ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    --) shift; EXTRA_ARGS+=("$@"); break ;;
    --stage | --preset | --config | --module | --init-from | --data)
      need_value "$1" "${2-}"; plan_option "$1" "$2"; shift 2 ;;
    -*) die "unknown option '$1'" ;;
    *) die "unexpected argument '$1' (config overrides are written --config.FIELD=VALUE)" ;;
  esac
done

check_plan
WORKDIR=$(absolute "$WORKDIR")
[[ -z "$INIT_FROM" ]] || INIT_FROM=$(absolute "$INIT_FROM")

if [[ -n "$GPU" ]]; then
  is_uint "$GPU" || die "--gpu '$GPU' must be a GPU index (0, 1, ...)"
fi
MEM_FRACTION=${MEM_FRACTION:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}}
if [[ ! "$MEM_FRACTION" =~ ^(0?\.[0-9]*[1-9][0-9]*|1|1\.0*)$ ]]; then
  die "--mem-fraction '$MEM_FRACTION' must be a number in (0, 1], like 0.9"
fi
# Stage 2 alone starts from a finished stage 1; catch a wrong path now rather than after start-up.
if [[ "$DRY_RUN" == 0 && "$STAGE" == 2 ]]; then
  stage1_dir=${INIT_FROM:-$(strip_slash "$WORKDIR")/stage1}
  if [[ "$stage1_dir" != gs://* && ! -d "$stage1_dir" ]]; then
    die "--stage 2 starts from $stage1_dir, which does not exist: run --stage 1 first or pass --init-from DIR"
  fi
fi
check_data here
[[ -z "$DATA" ]] || DATA=$(absolute_data "$DATA")

plan_runs

# One GPU: pin it, so that JAX neither grabs nor initialises the machine's other GPUs.
if [[ -n "$GPU" ]]; then
  CUDA_VISIBLE_DEVICES=$GPU
else
  CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
fi
# JAX preallocates 75% of GPU memory by default; the trainer is the only user of this GPU, so give it
# more room for larger batches, while leaving some for the CUDA context and cuDNN workspaces.
XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION
# A persistent compilation cache makes a resumed run (after preemption, or stage 2 after stage 1 of
# the same size) skip most of its compile time.
JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mmcmae_jax/jax_cache}
export CUDA_VISIBLE_DEVICES XLA_PYTHON_CLIENT_MEM_FRACTION JAX_COMPILATION_CACHE_DIR

preflight() {
  command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this script needs an NVIDIA GPU and its driver (or pass --skip-checks)"
  local gpus
  gpus=$(nvidia-smi -L) || fail "nvidia-smi failed: is the NVIDIA driver loaded? (or pass --skip-checks)"
  printf '%s\n' "$gpus"
  local first=${CUDA_VISIBLE_DEVICES%%,*}
  if is_uint "$first" && [[ "$first" -ge "$(grep -c '^GPU ' <<<"$gpus")" ]]; then
    die "--gpu $first: this machine has GPUs 0..$(($(grep -c '^GPU ' <<<"$gpus") - 1))"
  fi
  # A CPU-only jaxlib would otherwise "train" on the CPU without complaint.
  "$PYTHON" -c 'import jax, sys; b = jax.default_backend(); sys.exit(0 if b == "gpu" else f"JAX backend is {b!r}, not gpu: install jax[cuda12] or jax[cuda13]")' \
    || fail "JAX cannot use the GPU (or pass --skip-checks)"
}

# Run one training command, turning SIGINT and SIGTERM into a SIGTERM for the trainer and waiting for
# it to save. Without this bash would only act on the signal after the trainer exits, and Ctrl-C would
# hit the trainer as SIGINT. Returns 143 when a stop was requested, so no later stage starts.
STOP_REQUESTED=0
run_trainer() {
  "$@" &
  local child=$! rc
  trap 'STOP_REQUESTED=1; kill -TERM "$child" 2>/dev/null || true' INT TERM
  while :; do
    rc=0
    wait "$child" || rc=$?
    # A trapped signal ends `wait` early while the trainer is still saving: wait again.
    kill -0 "$child" 2>/dev/null || break
  done
  trap - INT TERM
  if [[ "$STOP_REQUESTED" == 1 ]]; then
    return 143
  fi
  return "$rc"
}

cd "$REPO_ROOT"
if [[ "$DRY_RUN" == 1 ]]; then
  [[ "$SKIP_CHECKS" == 1 ]] || printf '# would check: nvidia-smi -L, and that JAX (%s) sees a GPU\n' "$PYTHON"
  printf '+ cd %s\n' "$(quote_word "$REPO_ROOT")"
  for var in CUDA_VISIBLE_DEVICES XLA_PYTHON_CLIENT_MEM_FRACTION JAX_COMPILATION_CACHE_DIR; do
    printf '+ export %s=%s\n' "$var" "$(quote_word "${!var}")"
  done
  for cmd in "${RUNS[@]}"; do
    printf '+ %s\n' "${cmd/#python /$(quote_word "$PYTHON") }"
  done
  exit 0
fi

[[ "$SKIP_CHECKS" == 1 ]] || preflight
for cmd in "${RUNS[@]}"; do
  printf '%s: running %s\n' "$SCRIPT_NAME" "$cmd" >&2
  # RUNS holds quoted command lines; eval turns one back into its words, exactly as printed.
  eval "set -- $cmd"
  shift # "python"
  rc=0
  run_trainer "$PYTHON" "$@" || rc=$?
  if [[ "$rc" != 0 ]]; then
    printf '%s: stopped (exit status %s); run the same command again to resume from %s\n' \
      "$SCRIPT_NAME" "$rc" "$WORKDIR" >&2
    exit "$rc"
  fi
done
