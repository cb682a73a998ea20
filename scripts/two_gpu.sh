#!/usr/bin/env bash
# Two GPUs against one: the runs that show a 2-GPU run equals a 1-GPU run, one subcommand each (each one
# smoke-tested on the CPU with gloo ranks and a tiny model). Outputs go under $OUT (default
# runs/two_gpu): the run folders, their stdout, and per item a summary $OUT/<item>.txt of JSON lines
# (one per run, one per comparison with the first run). Data: DATA_PATH and TOKENIZER_PATH (default
# the testbed's .testbed/sp8192).
#
#   steps   items 1-2: the record shape (TRAIN_BATCH_TOKENS=786432, default model), 30 steps, each
#           logged, looping on after step 11 (ENABLE_LOOPING_AT=0.35 of 30 steps), on 1 GPU
#           (accumulation 8), then on 2 (accumulation 4), with TORCH_LOGS=recompiles; a
#           torch.profiler window over steps 26-28 on each rank (PROFILE=25:28): GPU idle time,
#           collective kernels, and their part that no other kernel hides. Wanted: the 30 losses
#           agree to bf16 noise, the same loop step, the 2-GPU log's `data rank_slices:8
#           world_size:2 same_as_one_rank:True`, and tok/s per GPU on 2 GPUs >= 95% of 1 GPU's
#           (`tok_s_per_gpu_ratio`). ~2 min cold compile per process, then ~50 s (1 GPU) and ~30 s
#           (2 GPUs) of steps.
#   eval    item 3: ARTIFACT=<final_model.pgz> scored in fresh processes on 1 GPU, then on 2, for
#           each of MODES (default "none sgd": none = flat and sliding windows, TTT off; sgd, lora,
#           phased = that TTT mode, sliding off), with the per-target dumps compared (every target
#           scored once, the same bytes, how far the nll are apart). Each process ~1-2 min warm, up
#           to ~8 min with cold compiles.
#   full    item 4: the default run on 2 GPUs (600 s cap, artifact, evaluation), detached (setsid)
#           so that it outlives the command that starts it; ~15-18 min in all. `collect` waits for
#           it, re-scores its artifact in fresh processes on 1 and 2 GPUs (`eval`, MODES=sgd), and
#           copies the logs to $OUT/full_600s/ (for records/testbed/<date>_<gpus>_full_600s/).
#   faults  item 5 with NCCL: a small model (FAULT_SETTINGS), rank 1 SIGKILLed after its first
#           step, then rank 1 hung in its fourth optimizer step with DIST_TIMEOUT_S=30. Wanted: the
#           launcher exits non-zero ~1 s after the kill and ~30 s after the hang. ~1-2 min.
#   report  the reports again from the logs under $OUT.
#
# Install the packages the machine lacks (FlashAttention-4, ...) first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/two_gpu}
mkdir -p "$OUT"
export DATA_PATH=${DATA_PATH:-.testbed/sp8192} PYTHONUNBUFFERED=1 OVERWRITE=1
export TOKENIZER_PATH=${TOKENIZER_PATH:-$DATA_PATH/tokenizer.model}
PY=${PYTHON:-python3}
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=2)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt" || true

steps() {  # TORCH_LOGS=recompiles: a recompile would show (the 1.0 s step of the 2-GPU smoke run?)
  local env=(TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-786432}" MAX_WALLCLOCK_SECONDS=0
             ITERATIONS="${ITERATIONS:-30}" TORCH_LOGS="${TORCH_LOGS:-recompiles}")
  local args=(--log-steps "${ITERATIONS:-30}" --profile "${PROFILE:-25:28}")
  env CUDA_VISIBLE_DEVICES=0 OUT_DIR="$OUT/steps_gpu1" "${env[@]}" \
    "$PY" scripts/two_gpu.py steps "${args[@]}" > "$OUT/steps_gpu1.out" 2>&1
  env OUT_DIR="$OUT/steps_gpu2" "${env[@]}" \
    "${TORCHRUN[@]}" scripts/two_gpu.py steps "${args[@]}" > "$OUT/steps_gpu2.out" 2>&1
  grep -h "^profile" "$OUT"/steps_gpu*.out | tee "$OUT/steps_profile.txt"
  "$PY" scripts/two_gpu.py report "$OUT/steps_gpu1/train.log" "$OUT/steps_gpu2/train.log" \
    --json "$OUT/steps.json" | tee "$OUT/steps.txt"
}

mode_env() {  # the settings of one evaluation mode
  case $1 in
    none) echo TTT_ENABLED=0 ;;
    sgd) echo TTT_MODE=sgd SLIDING_WINDOW_ENABLED=0 ;;
    lora) echo TTT_MODE=lora SLIDING_WINDOW_ENABLED=0 ;;
    phased) echo TTT_MODE=phased TTT_PREFIX_DOCS=25 SLIDING_WINDOW_ENABLED=0 ;;  # 5% of 500 docs
  esac
}

eval_artifact() {
  local artifact=${ARTIFACT:?set ARTIFACT to a final_model.pgz} mode
  for mode in ${MODES:-none sgd}; do
    local dir="$OUT/eval_$mode"
    mkdir -p "$dir"
    # shellcheck disable=SC2046  # mode_env's words are separate settings
    env CUDA_VISIBLE_DEVICES=0 EVAL_ARTIFACT="$artifact" OUT_DIR="$dir/gpu1" \
      EVAL_DUMP_PATH="$dir/gpu1.npz" $(mode_env "$mode") "$PY" train_gpt.py > "$dir/gpu1.out" 2>&1
    # shellcheck disable=SC2046
    env EVAL_ARTIFACT="$artifact" OUT_DIR="$dir/gpu2" EVAL_DUMP_PATH="$dir/gpu2.npz" \
      $(mode_env "$mode") "${TORCHRUN[@]}" train_gpt.py > "$dir/gpu2.out" 2>&1
    "$PY" scripts/two_gpu.py report "$dir/gpu1/train.log" "$dir/gpu2/train.log" \
      | tee "$OUT/eval_$mode.txt"
    "$PY" scripts/two_gpu.py dumps "$dir/gpu1.npz" "$dir/gpu2.npz" | tee -a "$OUT/eval_$mode.txt"
    rm -f "$dir"/gpu*.npz  # 12 MB each: only the comparison comes back
  done
}

full() {
  mkdir -p "$OUT/full"
  OUT_DIR="$OUT/full" setsid nohup "${TORCHRUN[@]}" train_gpt.py > "$OUT/full/stdout.txt" 2>&1 &
  echo "started the default 2-GPU run (pid $!): bash scripts/two_gpu.sh collect"
}

collect() {
  while ! grep -q '^final {' "$OUT/full/train.log" 2>/dev/null; do
    grep -q '^error ' "$OUT/full/train.log" 2>/dev/null && { tail -5 "$OUT/full/train.log"; exit 1; }
    sleep 10
  done
  ARTIFACT="$OUT/full/final_model.pgz" MODES=sgd OUT="$OUT/full_eval" eval_artifact
  mkdir -p "$OUT/full_600s"
  cp "$OUT/full/train.log" "$OUT/full_600s/train_seed1337.log"
  cp "$OUT/full_eval/eval_sgd/gpu2/train.log" "$OUT/full_600s/eval_sgd_gpu2.log"
  "$PY" scripts/two_gpu.py report "$OUT/full/train.log" | tee "$OUT/full_600s/report.txt"
}

faults() {  # item 5 on NCCL: the launcher's exit code and seconds after the fault
  local small
  local defaults="NUM_LAYERS=4 MODEL_DIM=256 TRAIN_BATCH_TOKENS=65536 COMPILE=0"
  read -ra small <<< "${FAULT_SETTINGS:-$defaults}"
  small+=(ITERATIONS=100000 MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=1)
  env OUT_DIR="$OUT/fault_kill" "${small[@]}" "${TORCHRUN[@]}" scripts/two_gpu.py steps \
    > "$OUT/fault_kill.out" 2>&1 &
  local launcher=$! pid t0
  until grep -q "^train step:1/" "$OUT/fault_kill.out"; do sleep 0.2; done
  for pid in $(pgrep -P "$launcher"); do
    tr '\0' '\n' < "/proc/$pid/environ" | grep -qx RANK=1 && kill -9 "$pid"
  done
  t0=$(date +%s.%N)
  wait "$launcher" && rc=0 || rc=$?
  echo "fault kill: launcher rc $rc, $(echo "$(date +%s.%N) - $t0" | bc) s after SIGKILL of rank 1" \
    | tee "$OUT/faults.txt"
  env OUT_DIR="$OUT/fault_hang" "${small[@]}" timeout 300 "${TORCHRUN[@]}" scripts/two_gpu.py steps \
    --dist-timeout 30 --hang-at 4 > "$OUT/fault_hang.out" 2>&1 && rc=0 || rc=$?
  t0=$(grep -o "hangs in optimizer step 4 at [0-9.]*" "$OUT/fault_hang.out" | awk '{print $NF}')
  echo "fault hang: launcher rc $rc, $(echo "$(date +%s.%N) - ${t0:-0}" | bc) s after rank 1 hung" \
    "(DIST_TIMEOUT_S=30; timeout 300 kills a launcher that hangs: rc 124)" | tee -a "$OUT/faults.txt"
  grep -h "hangs\|Watchdog\|timed out\|Timed out\|exitcode\|rank  " "$OUT"/fault_*.out \
    | tee -a "$OUT/faults.txt"
}

report() {
  if [ -f "$OUT/steps_gpu2/train.log" ]; then
    "$PY" scripts/two_gpu.py report "$OUT/steps_gpu1/train.log" "$OUT/steps_gpu2/train.log"
  fi
  cat "$OUT"/eval_*.txt "$OUT/faults.txt" 2>/dev/null || true
}

case ${1:-} in
  steps) steps ;;
  eval) eval_artifact ;;
  full) full ;;
  collect) collect ;;
  faults) faults ;;
  report) report ;;
  *) sed -n '2,/^set -euo/p' "$0" | grep '^#'; exit 2 ;;
esac
