#!/usr/bin/env bash
# #15 call 3: the four-mode table at default settings (DeepSpeed ZeRO-2 step, auto row, native GQA), mode 4 alone, fixed 4096 rows
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/r3; mkdir -p $R
B="--shape 7b --steps 20 --warmup-steps 5"
run() { name=$1; tmo=$2; shift 2; echo "=== $name $(date +%T)"; timeout $tmo python3 -m benchmarks.train_throughput $B --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $?"; grep -E "real tokens/s|per step|^\| [0-9]|ratios" $R/$name.log | tail -8; tar -czf $OUT/call3.tgz -C /tmp r3; }
run table_default 230 --modes 1 2 3 4
run m4_default 100 --modes 4
run m4_4096_default 90 --modes 4 --token-budget 4096
run m4_4096_torch_compile 110 --modes 4 --token-budget 4096 --step-engine torch --compile on
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
