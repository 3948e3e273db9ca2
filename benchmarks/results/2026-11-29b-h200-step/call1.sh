#!/usr/bin/env bash
# #15 call 1 (this session): GQA check; mode 4 eager vs compiled, torch engine, auto row; DeepSpeed at auto; compiled at 4096
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
echo "=== gqa $(date +%T)"; timeout 60 python3 .gl/gqa_check.py > $R/gqa.log 2>&1; echo rc $?; cat $R/gqa.log | tail -8
B="--shape 7b --steps 20 --warmup-steps 5"
run() { name=$1; shift; echo "=== $name $(date +%T)"; timeout ${TMO:-200} python3 -m benchmarks.train_throughput $B --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $?"; grep -E "real tokens/s|per step|budget|Recompil|recompile|graph break" $R/$name.log | tail -8; tar -czf $OUT/call1.tgz -C /tmp r; }
run m4_auto_eager --modes 4 --step-engine torch
TORCH_LOGS=recompiles TMO=330 run m4_auto_compile --modes 4 --step-engine torch --compile on --profile
run m4_auto_ds --modes 4 --step-engine deepspeed
TMO=240 run m4_4096_compile --modes 4 --step-engine torch --compile on --token-budget 4096
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
tar -czf $OUT/call1.tgz -C /tmp r
