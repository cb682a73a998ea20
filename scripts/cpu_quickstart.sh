#!/usr/bin/env bash
# Tiny end-to-end training on a CPU with no download: installs the requirements, builds shards and a
# 1024-piece tokenizer from the Python standard library's docstrings, and trains a 4-layer x 64 model
# with depth recurrence on. Takes a few minutes on 2 cores; the last line is `final {json}`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0            # the CPU build; see requirements.txt
python -m pip install -q -r requirements.txt
[ -f data/stdlib_sp1024/tokenizer.model ] || \
  python data/build_shards.py --from-stdlib --out data/stdlib_sp1024 --vocab-size 1024 --val-docs 300
export DATA_PATH=data/stdlib_sp1024 TOKENIZER_PATH=data/stdlib_sp1024/tokenizer.model VOCAB_SIZE=1024
export NUM_LAYERS=4 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 ROPE_DIMS=8
export LOOP_START=1 LOOP_END=1 NUM_LOOPS=1 PARALLEL_START_LAYER=3 ENABLE_LOOPING_AT=0.35
export TRAIN_SEQ_LEN=128 EVAL_SEQ_LEN=128 TRAIN_BATCH_TOKENS=4096 ITERATIONS=${ITERATIONS:-150}
export MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=2 EMA_DECAY=0.95 RUN_ID=${RUN_ID:-cpu_quickstart}
python train_gpt.py
