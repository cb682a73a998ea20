#!/usr/bin/env bash
# Tiny end-to-end training on a CPU with no download: installs the requirements, builds shards and a
# 1024-piece tokenizer from the Python standard library's docstrings, and trains a 4-layer x 64 model
# with depth recurrence on. Takes a few minutes on 2 cores; the last line is `final {json}`. Each run gets
# a fresh run id (a folder runs/<RUN_ID>/ is never reused), and ends with its plot, runs/<RUN_ID>/runs.png.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0            # the CPU build; see requirements.txt
python -m pip install -q -r requirements.txt matplotlib   # matplotlib: the plot at the end
[ -f data/stdlib_sp1024/tokenizer.model ] || \
  python data/build_shards.py --from-stdlib --out data/stdlib_sp1024 --vocab-size 1024 --val-docs 300
export DATA_PATH=data/stdlib_sp1024 TOKENIZER_PATH=data/stdlib_sp1024/tokenizer.model VOCAB_SIZE=1024
export NUM_LAYERS=4 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 ROPE_DIMS=8
export LOOP_START=1 LOOP_END=1 NUM_LOOPS=1 PARALLEL_START_LAYER=3 ENABLE_LOOPING_AT=0.35
export TRAIN_SEQ_LEN=128 EVAL_SEQ_LEN=128 TRAIN_BATCH_TOKENS=4096 ITERATIONS=${ITERATIONS:-150}
export MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=2 EMA_DECAY=0.95 RUN_ID=${RUN_ID:-quickstart_$(date +%Y%m%d_%H%M%S)}
python train_gpt.py
python scripts/plot_runs.py "runs/$RUN_ID/train.log" --out "runs/$RUN_ID/runs.png"
