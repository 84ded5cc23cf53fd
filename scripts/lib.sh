# Shared logic of the benchmark scripts in scripts/voc/ and scripts/ade/ (sourced, not run).
#
#   DATA_ROOT=/data/voc GPUS=2 bash scripts/voc/plop_15-1.sh [run.py flags...]
#
# Environment: DATA_ROOT (required), GPUS (default 1), NAME (run name, default the method),
# LOGDIR (default runs), REPORT=0 skips the final table, PYTHON (default python3).
set -euo pipefail

CSS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Steps of a task named BASE-INC (dataset/tasks.py): step 0 learns BASE classes, each later
# step the next INC of the dataset's 20 (VOC) or 150 (ADE20K) foreground classes.
num_steps() {  # DATASET TASK
  local classes base=${2%-*} inc=${2#*-}
  case $1 in
    voc) classes=20 ;;
    ade) classes=150 ;;
    *) echo "error: unknown dataset $1" >&2; return 1 ;;
  esac
  echo $((1 + (classes - base + inc - 1) / inc))
}

# Value of STEP in a space-separated list, the last value repeating (like run.py's --lr).
per_step() {  # "V0 V1 ..." STEP
  local -a values=($1)
  local last=$((${#values[@]} - 1))
  echo "${values[$(($2 < last ? $2 : last))]}"
}

# One torchrun launch per step (0, 1, ...), then the table of the run. TOTAL_BATCH is the batch
# summed over GPUs, one value per step (the last repeats); each process gets TOTAL_BATCH / GPUS.
# Flags go to every launch in order, so the caller's "$@" (last) overrides the script's.
run_steps() {  # DATASET TASK METHOD "TOTAL_BATCH..." [run.py flags...]
  local dataset=$1 task=$2 method=$3 batches=$4
  shift 4
  if [[ -z ${DATA_ROOT:-} ]]; then
    echo "error: set DATA_ROOT to the $dataset folder, e.g. DATA_ROOT=data/$dataset bash $0 (see data/README.md)" >&2
    return 2
  fi
  local gpus=${GPUS:-1} name=${NAME:-$method} logdir=${LOGDIR:-runs} protocol=dj arg
  if [[ ! $gpus =~ ^[1-9][0-9]*$ ]]; then
    echo "error: GPUS must be a positive number of processes, not '$gpus'" >&2
    return 2
  fi
  for arg in "$@"; do
    case $arg in
      --overlap | --overlapped) protocol=ov ;;
      --step | --step=* | --name | --name=* | --logdir | --logdir=* | --results_file | --results_file=*)
        echo "error: the script sets $arg itself (it runs every step); use NAME=... or LOGDIR=... instead" >&2
        return 2 ;;
    esac
  done
  local steps step total
  local -a batch=()
  steps=$(num_steps "$dataset" "$task")
  for ((step = 0; step < steps; step++)); do  # check every step before launching any
    total=$(per_step "$batches" "$step")
    if ((total % gpus)); then
      echo "error: the total batch $total of step $step is not divisible by GPUS=$gpus" >&2
      return 2
    fi
    batch+=($((total / gpus)))
  done
  for ((step = 0; step < steps; step++)); do
    echo "== $method $dataset $task-$protocol step $step/$((steps - 1)): batch ${batch[step]} x $gpus GPU(s)"
    torchrun --nproc_per_node="$gpus" "$CSS_ROOT/run.py" --dataset "$dataset" --data_root "$DATA_ROOT" \
      --task "$task" --method "$method" --step "$step" --batch_size "${batch[step]}" --crop_size 512 --amp \
      --name "$name" --logdir "$logdir" "$@"
  done
  if [[ ${REPORT:-1} != 0 ]]; then
    PYTHONPATH="$CSS_ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m metrics.report \
      "$logdir/$dataset/$task-$protocol/$name/results.jsonl"
  fi
}
