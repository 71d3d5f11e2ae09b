# Shared helpers of the launch scripts; sourced, never run.
#
# The caller sets SCRIPT_NAME (for messages) and DRY_RUN (0 or 1) and, before calling plan_runs, the
# run-plan variables documented there.
# The variables set here are read by the scripts that source this file:
# shellcheck shell=bash disable=SC2034

# The repository root: launch/ lives directly under it. Configs are resolved against it because the
# training command runs from there (locally, on every TPU worker, in the sbatch script).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The config field that `--data URI` sets. One place, so that a rename in the configs is one edit.
DATA_FIELD="data.path"

# The presets of configs/m3.py, configs/m3_stage1.py and configs/m3_stage2.py.
KNOWN_PRESETS="vit_s16 vit_b16 vit_l16"

# `--data procedural`: the config generates its own rooms (configs/demo.py, the procedural fine-tuning
# configs), so no data path is passed to it.
PROCEDURAL_DATA=procedural

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$SCRIPT_NAME" >&2
  exit 2
}

# An error of the environment rather than of the arguments: no pointer to --help.
fail() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

warn() {
  printf '%s: warning: %s\n' "$SCRIPT_NAME" "$*" >&2
}

# Quote one word for a POSIX shell, leaving plain words (the usual case) unquoted so that printed
# commands stay readable and can still be pasted into a terminal.
quote_word() {
  local word=$1
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Print a command line, each argument quoted with quote_word.
quote_cmd() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote_word "$arg")"
  done
  printf '%s' "$out"
}

# Run a command, or with --dry-run print it (prefixed by '+ ', like `set -x`) instead.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(quote_cmd "$@")"
  else
    "$@"
  fi
}

# Fail unless option $1 has a value $2 (the option parser passes "${2-}").
need_value() {
  if [[ -z "$2" || "$2" == --* ]]; then
    die "$1 needs a value"
  fi
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_positive_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

# A `--config.FIELD=VALUE` override, passed to the trainer untouched. The `=` form is required so
# that an override never swallows the option after it.
check_override() {
  if [[ ! "$1" =~ ^--config\.[A-Za-z_][A-Za-z0-9_.]*= ]]; then
    die "config override '$1' must have the form --config.FIELD=VALUE"
  fi
}

# Check a `FILE.py[:PRESET]` config spec: the file must exist (relative paths are relative to the
# repository root) and the preset, if any, must be a plain name.
check_config() {
  local spec=$1 what=${2:---config} file preset=""
  file=${spec%%:*}
  if [[ "$spec" == *:* ]]; then
    preset=${spec#*:}
    [[ "$preset" =~ ^[A-Za-z0-9_]+$ ]] || die "$what '$spec': preset '$preset' is not a plain name"
  fi
  [[ "$file" == *.py ]] || die "$what '$spec': expected a Python config file, like configs/m3_stage1.py"
  local path=$file
  [[ "$path" == /* ]] || path="$REPO_ROOT/$file"
  [[ -f "$path" ]] || die "$what '$spec': no such file $path"
}

check_preset() {
  local p
  for p in $KNOWN_PRESETS; do
    [[ "$1" == "$p" ]] && return 0
  done
  die "--preset '$1' is not one of: $KNOWN_PRESETS"
}

# Strip trailing slashes, keeping "/" and "gs://bucket" intact.
strip_slash() {
  local p=$1
  while [[ "$p" == */ && "$p" != / && "$p" != *:// ]]; do p=${p%/}; done
  printf '%s' "$p"
}

# Make a local path absolute against the current directory; gs:// and absolute paths stay as given.
absolute() {
  case "$1" in
    gs://* | /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

# Validate the run-plan variables, shared by every script:
#   MODULE     pretrain | finetune
#   STAGE      1 | 2 | both | "" (empty: --config names one run)
#   PRESET     model preset of the stage configs
#   CONFIG     FILE.py[:PRESET] for a single run, or ""
#   WORKDIR    the work directory (with --stage: the root holding stage1/ and stage2/)
#   INIT_FROM  stage-1 work directory that stage 2 starts from ("" = WORKDIR/stage1)
#   DATA       data location ("" = the config's own)
#   OVERRIDES  array of --config.FIELD=VALUE
check_plan() {
  case "$MODULE" in
    pretrain | finetune) ;;
    *) die "--module '$MODULE' must be 'pretrain' or 'finetune'" ;;
  esac
  if [[ -n "$CONFIG" && -n "$STAGE" ]]; then
    die "--config and --stage exclude each other: --stage runs configs/m3_stage{1,2}.py:PRESET, --config runs one given config"
  fi
  if [[ "$MODULE" == finetune && -z "$CONFIG" ]]; then
    die "--module finetune needs --config (a fine-tuning config file)"
  fi
  if [[ -z "$CONFIG" ]]; then
    STAGE=${STAGE:-both}
    case "$STAGE" in
      1 | 2 | both) ;;
      *) die "--stage '$STAGE' must be 1, 2 or both" ;;
    esac
    check_preset "$PRESET"
    case "$STAGE" in
      both) check_config "configs/m3.py" "--stage both: the two-stage config" ;;
      *) check_config "configs/m3_stage$STAGE.py" "--stage $STAGE: stage $STAGE config" ;;
    esac
  else
    check_config "$CONFIG"
  fi
  [[ -n "$WORKDIR" ]] || die "--workdir is required"
  local o
  for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do check_override "$o"; done
}

# The data a run reads, as pairs OPTION VALUE in DATA_GIVEN: --data and every data-path override
# (--config.data.path=, --config.eval_data.path=, --config.stage1.data.path=, ... also after "--").
# Refuse a run without any: a config that needs records would fail only once the job runs, after
# queueing or provisioning, and one that does not would quietly train on procedural rooms.
# With `check_data here`, a local path must exist on this machine (gs:// and other URLs are left to
# the trainer); tpu_pod.sh checks its workers' paths on the workers instead.
check_data() {
  DATA_GIVEN=()
  [[ -z "$DATA" ]] || DATA_GIVEN+=(--data "$DATA")
  local o
  for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}" "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"; do
    [[ ! "$o" =~ ^--config\.[A-Za-z0-9_.]*data\.path= ]] || DATA_GIVEN+=("${o%%=*}" "${o#*=}")
  done
  if [[ ${#DATA_GIVEN[@]} -eq 0 ]]; then
    die "--data is required: the records to train on (a local path or gs://bucket/path), or" \
      "'--data $PROCEDURAL_DATA' for a config that generates its rooms, like configs/demo.py"
  fi
  if [[ "$DATA" == "$PROCEDURAL_DATA" && -z "$CONFIG" ]]; then
    die "--data $PROCEDURAL_DATA: the M3 stage configs (configs/m3*.py) train on records; give their location"
  fi
  [[ "${1-}" == here ]] || return 0
  local given part
  while IFS=$'\t' read -r given part; do
    compgen -G "$(absolute "$part")" >/dev/null \
      || die "$given: nothing at $(absolute "$part") on this machine" \
        "(a local path must exist before the run is started; gs:// paths are not checked)"
  done < <(local_data_parts)
}

# The local paths among the data flags given, one "FLAG=VALUE<tab>PATH" line each. A value may be a
# comma list of files, directories and globs (the records reader takes all three); the procedural
# stand-in and URLs (gs://...) are left out: nothing here can check them.
local_data_parts() {
  local i part parts
  for ((i = 0; i < ${#DATA_GIVEN[@]}; i += 2)); do
    [[ "${DATA_GIVEN[i]}" != --data || "${DATA_GIVEN[i + 1]}" != "$PROCEDURAL_DATA" ]] || continue
    IFS=, read -r -a parts <<<"${DATA_GIVEN[i + 1]}"
    for part in "${parts[@]+"${parts[@]}"}"; do
      [[ -n "$part" && "$part" != *://* ]] || continue
      printf '%s=%s\t%s\n' "${DATA_GIVEN[i]}" "${DATA_GIVEN[i + 1]}" "$part"
    done
  done
}

# A --data value with each local path of its comma list made absolute (the trainer runs from the
# repository root, not from here); "procedural" and URLs stay as given.
absolute_data() {
  [[ "$1" != "$PROCEDURAL_DATA" ]] || { printf '%s' "$1"; return; }
  local parts part out=""
  IFS=, read -r -a parts <<<"$1"
  for part in "${parts[@]+"${parts[@]}"}"; do
    [[ "$part" == *://* ]] || part=$(absolute "$part")
    out+="${out:+,}$part"
  done
  printf '%s' "$out"
}

# Take one run-plan option: `plan_option OPTION VALUE` sets its variable and succeeds, or fails when
# OPTION is not a run-plan option. Options with no value are taken by the caller's parser.
plan_option() {
  case "$1" in
    --stage) STAGE=$2 ;;
    --preset) PRESET=$2 ;;
    --config) CONFIG=$2 ;;
    --module) MODULE=$2 ;;
    --init-from) INIT_FROM=$2 ;;
    --data) DATA=$2 ;;
    *) return 1 ;;
  esac
}

# Defaults of the run-plan variables.
MODULE=pretrain
STAGE=""
PRESET=vit_b16
CONFIG=""
WORKDIR=""
INIT_FROM=""
DATA=""
DATA_GIVEN=()  # set by check_data
OVERRIDES=()   # --config.FIELD=VALUE, checked
EXTRA_ARGS=()  # everything after "--", passed as given

# Fill RUNS with one training command line per run (already shell-quoted, to run from the repository
# root with the environment's `python`), in the order they must run. Both stages are one run of the
# two-stage config configs/m3.py: the pre-training command chains them (stage 2 starts from stage 1,
# and a preempted stage 1 exits 143 before stage 2), so each stage's fields take a stage1./stage2. prefix.
plan_runs() {
  RUNS=()
  local root
  root=$(strip_slash "$WORKDIR")
  local overrides=()
  [[ -z "$DATA" || "$DATA" == "$PROCEDURAL_DATA" ]] || overrides+=("--config.$DATA_FIELD=$DATA")
  overrides+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")
  if [[ -n "$CONFIG" || "$STAGE" != both ]]; then
    local config=$CONFIG dir=$root init=()
    if [[ -z "$CONFIG" ]]; then
      # --stage 1 or 2 writes the directory configs/m3.py gives that stage, so that `--stage 1` and a
      # later `--stage 2` with the same --workdir chain up, and so that `--stage both` resumes either.
      config="configs/m3_stage$STAGE.py:$PRESET" dir="$root/stage$STAGE"
      [[ "$STAGE" == 1 ]] || init=("--config.init_from=${INIT_FROM:-$root/stage1}")
    elif [[ -n "$INIT_FROM" ]]; then
      init=("--config.init_from=$INIT_FROM")
    fi
    RUNS+=("$(quote_cmd python -m "mmcmae_jax.$MODULE" --config "$config" --workdir "$dir" \
      "${init[@]+"${init[@]}"}" "${overrides[@]+"${overrides[@]}"}" "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}")")
    return
  fi
  local staged=() o
  [[ -z "$INIT_FROM" ]] || staged+=("--config.stage2.init_from=$INIT_FROM")
  for o in "${overrides[@]+"${overrides[@]}"}"; do
    case "$o" in
      --config.stage1.* | --config.stage2.*) staged+=("$o") ;;
      *) staged+=("--config.stage1.${o#--config.}" "--config.stage2.${o#--config.}") ;;
    esac
  done
  RUNS+=("$(quote_cmd python -m mmcmae_jax.pretrain --config "configs/m3.py:$PRESET" --workdir "$root" \
    "${staged[@]+"${staged[@]}"}" "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}")")
}

# Usage text shared by the scripts for the run-plan options.
PLAN_USAGE="What to train (default: --stage both --preset vit_b16):
  --stage 1|2|both        M3 pre-training: stage 1 (configs/m3_stage1.py) writes WORKDIR/stage1,
                          stage 2 (configs/m3_stage2.py) writes WORKDIR/stage2 and starts from
                          WORKDIR/stage1 (or --init-from); both runs configs/m3.py, which
                          trains them in that order in one command
  --preset NAME           model preset of the stage configs: vit_s16, vit_b16 (default), vit_l16
  --config FILE[:PRESET]  instead of --stage: run one config (path relative to the repository
                          root), writing WORKDIR itself, e.g. configs/demo.py
  --module pretrain|finetune
                          the entry point for --config: mmcmae_jax.pretrain (default) or
                          mmcmae_jax.finetune
  --init-from DIR         stage-1 work directory that stage 2 starts from
  --data URI              data location (required), passed as --config.$DATA_FIELD=URI: a
                          path, checked to exist before anything starts, or gs://bucket/path;
                          '$PROCEDURAL_DATA' for a config that generates its rooms (configs/demo.py).
                          A --config.$DATA_FIELD=URI override counts as --data
  --config.FIELD=VALUE    any config override (repeatable), given to both stages with
                          --stage both (as --config.stage1.FIELD and --config.stage2.FIELD);
                          everything after \"--\" is passed as given"
