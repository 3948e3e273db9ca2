#!/usr/bin/env bash
# #15 session 2026-11-29c call 3: four-mode table at the defaults (in-place LoRA add), the 4096-token row; FSDP2 on a GPU after the zero-base fix (#17)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/r7; mkdir -p $R
B="--shape 7b --steps 20 --warmup-steps 5"
run() { name=$1; tmo=$2; shift 2; echo "=== $name $(date +%T)"; timeout $tmo python3 -m benchmarks.train_throughput $B --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $?"; grep -E "per step|^\| [0-9]|ratios" $R/$name.log | tail -8 | cut -c1-250; tar -czf $OUT/call7.tgz -C /tmp r7; }
run table_default 250 --modes 1 2 3 4
run m4_4096_default 90 --modes 4 --token-budget 4096
echo "=== fsdp2 $(date +%T)"; timeout 120 python3 -m torch.distributed.run --nproc-per-node 1 --master-port 29801 -m benchmarks.sharding --shape 7b --mode lora --steps 5 --warmup-steps 2 --engine fsdp2 --out $R/lora_7b_fsdp2_1gpu.json > $R/lora_7b_fsdp2_1gpu.log 2>&1; echo "rc $?"; tail -4 $R/lora_7b_fsdp2_1gpu.log | cut -c1-300
tar -czf $OUT/call7.tgz -C /tmp r7
