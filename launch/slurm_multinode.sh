#!/usr/bin/env bash
# Train on a multi-node GPU cluster under SLURM: render an sbatch script that starts one process per
# GPU with srun (JAX's distributed runtime reads the SLURM environment), and submit it.
# See launch/README.md.
set -euo pipefail

SCRIPT_NAME=slurm_multinode.sh
DRY_RUN=0
# shellcheck source=SCRIPTDIR/_common.sh
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: launch/slurm_multinode.sh --nodes N --gpus-per-node G --workdir DIR [options]
                                 [--config.FIELD=VALUE ...] [-- ARGS ...]

Writes an sbatch script (into the log directory) and submits it with sbatch. The job runs from this
checkout of the repository, which must be on a file system the nodes share, as must a local --workdir.

Required:
  --nodes N               number of nodes
  --gpus-per-node G       GPUs per node; one training process runs per GPU
  --workdir DIR           work directory: an absolute (or relative, made absolute) path on a shared
                          file system, or gs://bucket/path

$PLAN_USAGE

SLURM:
  --partition P           partition (default: the cluster's default)
  --account A             account to charge (default: yours)
  --qos Q                 quality of service
  --time T                time limit per job: MINUTES, HH:MM:SS or D-HH:MM:SS (default: the partition's)
  --cpus-per-gpu C        CPU cores per process, for data loading (default: the cluster's)
  --mem M                 memory per node, e.g. 480G (default: the cluster's)
  --job-name NAME         job name (default: mmcmae)
  --exclusive             don't share the nodes with other jobs
  --sbatch-arg ARG        any other sbatch option, written as an #SBATCH line (repeatable),
                          e.g. --sbatch-arg=--constraint=a100
  --chain K               submit K jobs, each starting when the previous one ends (afterany); each
                          resumes from the work directory, so K x --time is the total budget (default 1)
  --grace S               seconds before the time limit at which the trainer gets SIGTERM, to save a
                          checkpoint (default: 180)

Environment of the job:
  --venv DIR              Python virtual environment to activate (default: none, the job inherits PATH)
  --setup CMD             a shell command run before training, e.g. "module load cuda/12.4"
                          (repeatable, in order)
  --mem-fraction F        XLA_PYTHON_CLIENT_MEM_FRACTION of each process (default: 0.9)
  --coordinator-port P    port of JAX's coordinator on the first node (JAX_COORDINATOR_PORT;
                          default: JAX derives one from the job id)
  --log-dir DIR           where the sbatch script and the job logs go
                          (default: WORKDIR/slurm for a local workdir, else ./slurm_logs)

  --dry-run               print the rendered sbatch script and the sbatch command instead of submitting
  -h, --help              show this help

Examples:
  launch/slurm_multinode.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
      --venv ~/venvs/mmcmae --workdir /shared/runs/m3_l16 --preset vit_l16 --data /shared/data/scannet
  launch/slurm_multinode.sh --nodes 2 --gpus-per-node 4 --account proj --time 4:00:00 --chain 6 \\
      --setup 'module load cuda/12.4' --workdir /shared/runs/m3_b16 --stage 2 --data /shared/data/scannet
EOF
}

NODES=""
GPUS_PER_NODE=""
PARTITION=""
ACCOUNT=""
QOS=""
TIME=""
CPUS_PER_GPU=""
MEM=""
JOB_NAME=mmcmae
EXCLUSIVE=0
SBATCH_ARGS=()
CHAIN=1
GRACE=180
VENV=""
SETUP=()
MEM_FRACTION=0.9
COORDINATOR_PORT=""
LOG_DIR=""

while [[ $# -gt 0 ]]; do
  # Accept --option=value as well as --option value (but --config.FIELD=VALUE is one argument).
  if [[ "$1" == --[a-z]*=* && "$1" != --config.* ]]; then
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --exclusive) EXCLUSIVE=1; shift ;;
    --nodes) need_value "$1" "${2-}"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$1" "${2-}"; GPUS_PER_NODE=$2; shift 2 ;;
    --partition) need_value "$1" "${2-}"; PARTITION=$2; shift 2 ;;
    --account) need_value "$1" "${2-}"; ACCOUNT=$2; shift 2 ;;
    --qos) need_value "$1" "${2-}"; QOS=$2; shift 2 ;;
    --time) need_value "$1" "${2-}"; TIME=$2; shift 2 ;;
    --cpus-per-gpu) need_value "$1" "${2-}"; CPUS_PER_GPU=$2; shift 2 ;;
    --mem) need_value "$1" "${2-}"; MEM=$2; shift 2 ;;
    --job-name) need_value "$1" "${2-}"; JOB_NAME=$2; shift 2 ;;
    # Its value is itself an option, so need_value's check against a missing value does not apply.
    --sbatch-arg) [[ -n "${2-}" ]] || die "--sbatch-arg needs a value"; SBATCH_ARGS+=("$2"); shift 2 ;;
    --chain) need_value "$1" "${2-}"; CHAIN=$2; shift 2 ;;
    --grace) need_value "$1" "${2-}"; GRACE=$2; shift 2 ;;
    --venv) need_value "$1" "${2-}"; VENV=$2; shift 2 ;;
    --setup) need_value "$1" "${2-}"; SETUP+=("$2"); shift 2 ;;
    --mem-fraction) need_value "$1" "${2-}"; MEM_FRACTION=$2; shift 2 ;;
    --coordinator-port) need_value "$1" "${2-}"; COORDINATOR_PORT=$2; shift 2 ;;
    --log-dir) need_value "$1" "${2-}"; LOG_DIR=$2; shift 2 ;;
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

[[ -n "$NODES" ]] || die "--nodes is required"
is_positive_int "$NODES" || die "--nodes '$NODES' must be a positive integer"
[[ -n "$GPUS_PER_NODE" ]] || die "--gpus-per-node is required"
is_positive_int "$GPUS_PER_NODE" || die "--gpus-per-node '$GPUS_PER_NODE' must be a positive integer"
check_plan
if [[ -n "$TIME" && ! "$TIME" =~ ^([0-9]+-)?([0-9]+)(:[0-5]?[0-9]){0,2}$ ]]; then
  die "--time '$TIME' must be MINUTES, HH:MM:SS or D-HH:MM:SS"
fi
[[ -z "$CPUS_PER_GPU" ]] || is_positive_int "$CPUS_PER_GPU" || die "--cpus-per-gpu '$CPUS_PER_GPU' must be a positive integer"
[[ -z "$MEM" || "$MEM" =~ ^[0-9]+[KMGT]?$ ]] || die "--mem '$MEM' must be a size like 480G"
[[ "$JOB_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "--job-name '$JOB_NAME' may only hold letters, digits, '.', '_' and '-'"
for name in PARTITION ACCOUNT QOS; do
  value=${!name}
  opt="--$(tr '[:upper:]' '[:lower:]' <<<"$name")"
  [[ -z "$value" || "$value" =~ ^[A-Za-z0-9._,-]+$ ]] || die "$opt '$value' is not a valid SLURM name"
done
for arg in "${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}"; do
  [[ "$arg" == -* ]] || die "--sbatch-arg '$arg' must be an sbatch option, like --constraint=a100"
done
is_positive_int "$CHAIN" || die "--chain '$CHAIN' must be a positive integer"
is_uint "$GRACE" && [[ "$GRACE" -le 65535 ]] || die "--grace '$GRACE' must be a number of seconds"
[[ "$MEM_FRACTION" =~ ^(0?\.[0-9]*[1-9][0-9]*|1|1\.0*)$ ]] \
  || die "--mem-fraction '$MEM_FRACTION' must be a number in (0, 1], like 0.9"
if [[ -n "$COORDINATOR_PORT" ]]; then
  is_positive_int "$COORDINATOR_PORT" && [[ "$COORDINATOR_PORT" -le 65535 ]] \
    || die "--coordinator-port '$COORDINATOR_PORT' must be a port number (1-65535)"
fi
if [[ -n "$VENV" ]]; then
  VENV=$(absolute "$VENV")
  [[ "$DRY_RUN" == 1 || -f "$VENV/bin/activate" ]] || die "--venv '$VENV' has no bin/activate"
fi
WORKDIR=$(absolute "$WORKDIR")
[[ -z "$INIT_FROM" ]] || INIT_FROM=$(absolute "$INIT_FROM")
if [[ -z "$LOG_DIR" ]]; then
  if [[ "$WORKDIR" == gs://* ]]; then LOG_DIR=$PWD/slurm_logs; else LOG_DIR=$(strip_slash "$WORKDIR")/slurm; fi
fi
[[ "$LOG_DIR" != gs://* ]] || die "--log-dir '$LOG_DIR' must be a local path (SLURM writes the logs)"
LOG_DIR=$(absolute "$LOG_DIR")
# The login node sees the file system the nodes share, so a local data path is checked here.
check_data here
[[ -z "$DATA" ]] || DATA=$(absolute_data "$DATA")

plan_runs

# --- The sbatch script -------------------------------------------------------------------------

render() {
  local line
  cat <<EOF
#!/bin/bash
# Written by launch/slurm_multinode.sh. Submitting it again resumes the run from its work directory.
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS_PER_NODE
#SBATCH --gpus-per-node=$GPUS_PER_NODE
EOF
  [[ -z "$CPUS_PER_GPU" ]] || echo "#SBATCH --cpus-per-task=$CPUS_PER_GPU"
  [[ -z "$MEM" ]] || echo "#SBATCH --mem=$MEM"
  [[ -z "$TIME" ]] || echo "#SBATCH --time=$TIME"
  [[ -z "$PARTITION" ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z "$ACCOUNT" ]] || echo "#SBATCH --account=$ACCOUNT"
  [[ -z "$QOS" ]] || echo "#SBATCH --qos=$QOS"
  [[ "$EXCLUSIVE" == 0 ]] || echo "#SBATCH --exclusive"
  for line in "${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}"; do echo "#SBATCH $line"; done
  cat <<EOF
#SBATCH --output=$LOG_DIR/%x-%j.out
# A requeued or chained job appends to its log rather than overwriting it.
#SBATCH --open-mode=append
#SBATCH --requeue
# SIGTERM to this script $GRACE s before the time limit; it passes it on to the trainer, which saves.
#SBATCH --signal=B:TERM@$GRACE

set -euo pipefail
cd $(quote_word "$REPO_ROOT")
EOF
  for line in "${SETUP[@]+"${SETUP[@]}"}"; do echo "$line"; done
  if [[ -n "$VENV" ]]; then
    echo "# shellcheck source=/dev/null"
    echo ". $(quote_word "$VENV/bin/activate")"
  fi
  cat <<EOF

# One process per GPU. Every process sees all GPUs of its node, and jax.distributed.initialize()
# (in the trainer) finds the coordinator, the process count and its process id in the SLURM_*
# variables srun sets, and takes GPU number SLURM_LOCALID. So no --gpus-per-task or --gpu-bind here:
# with one visible GPU per process, SLURM_LOCALID would name a GPU the process cannot see.
export XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION
EOF
  [[ -z "$COORDINATOR_PORT" ]] || echo "export JAX_COORDINATOR_PORT=$COORDINATOR_PORT"
  # srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05 and later); this carries it over.
  [[ -z "$CPUS_PER_GPU" ]] || echo "export SRUN_CPUS_PER_TASK=$CPUS_PER_GPU"
  cat <<'EOF'

# Run one job step in the background, so that this script can take the SIGTERM of a time limit or
# preemption, pass it on to every training process (scancel without --batch signals the job steps,
# not this script) and wait while they save; then no later stage starts.
stop_requested=0
run_step() {
  srun --kill-on-bad-exit=1 --ntasks-per-node="$SLURM_NTASKS_PER_NODE" "$@" &
  local step=$! rc
  trap 'stop_requested=1; scancel --signal=TERM "$SLURM_JOB_ID" || kill -TERM "$step" || true' TERM
  while :; do
    rc=0
    wait "$step" || rc=$?
    kill -0 "$step" 2>/dev/null || break
  done
  trap - TERM
  if [ "$stop_requested" = 1 ]; then
    echo "stopped by SIGTERM; the next job resumes from the work directory" >&2
    exit 143
  fi
  return "$rc"
}

EOF
  local cmd
  for cmd in "${RUNS[@]}"; do
    echo "run_step ${cmd/#python /python -u }"
  done
}

mkdir_cmd=(mkdir -p "$LOG_DIR")
stamp=$(date +%Y%m%d-%H%M%S)
SCRIPT_FILE=$LOG_DIR/$JOB_NAME-$stamp.sbatch

if [[ "$DRY_RUN" == 1 ]]; then
  printf '# sbatch script (would be written to %s):\n' "$SCRIPT_FILE"
  render
  printf '# end of sbatch script\n'
  printf '+ %s\n' "$(quote_cmd "${mkdir_cmd[@]}")"
  printf '+ %s\n' "$(quote_cmd sbatch --parsable "$SCRIPT_FILE")"
  for ((i = 2; i <= CHAIN; i++)); do
    printf '+ %s\n' "$(quote_cmd sbatch --parsable "--dependency=afterany:<job id $((i - 1))>" "$SCRIPT_FILE")"
  done
  exit 0
fi

command -v sbatch >/dev/null || fail "sbatch not found: run this on a SLURM login node (or use --dry-run)"
"${mkdir_cmd[@]}"
render >"$SCRIPT_FILE"
printf '%s: wrote %s\n' "$SCRIPT_NAME" "$SCRIPT_FILE" >&2
job=$(sbatch --parsable "$SCRIPT_FILE")
job=${job%%;*} # --parsable prints "id" or "id;cluster"
printf '%s: submitted job %s\n' "$SCRIPT_NAME" "$job" >&2
for ((i = 2; i <= CHAIN; i++)); do
  job=$(sbatch --parsable "--dependency=afterany:$job" "$SCRIPT_FILE")
  job=${job%%;*}
  printf '%s: submitted job %s (after the previous one)\n' "$SCRIPT_NAME" "$job" >&2
done
printf '%s: logs in %s\n' "$SCRIPT_NAME" "$LOG_DIR" >&2
