# 1 GPU vs 2 GPUs (torchrun), same global batch, 20 steps, then export and distributed evaluation (sgd TTT).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site
source .testbed/smoke/env.sh
export ITERATIONS=20 MAX_WALLCLOCK_SECONDS=0 TTT_MODE=sgd
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
CUDA_VISIBLE_DEVICES=0 OUT_DIR=$OUT/gpu1 timeout 250 python3 .testbed/smoke/every.py > $OUT/gpu1.txt 2>&1; echo rc1=$?
OUT_DIR=$OUT/gpu2 timeout 150 torchrun --standalone --nproc_per_node=2 .testbed/smoke/every.py > $OUT/gpu2.txt 2>&1; echo rc2=$?
for n in 1 2; do echo "== $n GPU"; grep "^dist\|^train start\|^train step:\(1\|5\|10\|15\|20\)/\|^train stop\|^val\|^eval\|^artifact\|rror" $OUT/gpu$n.txt; done
rm -f $OUT/gpu*/final_model.pgz $OUT/gpu*/train_gpt_wrapped.py
