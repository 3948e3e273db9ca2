#!/usr/bin/env bash
# #15 session 2026-11-29d call 3: warm-up, then the whole model HEAD-before (per-layer ops) vs one-node groups (same call), then the four-mode table
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/d3; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > $R/smi.txt 2>&1
run() { name=$1; tmo=$2; shift 2; echo "=== $name $(date +%T)"; timeout $tmo python3 -m benchmarks.train_throughput --shape 7b --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $?"; python3 -c "import json;d=json.load(open('$R/$name.json'));m=d['modes']['4'];print(round(m['tokens_per_s']),'tok/s row',m['token_budget'],'peak',round(m['peak_gib'],1),'loss',m['loss_last']);print({k:(v['host_ms'],v['device_ms']) for k,v in m['phases'].items()})" 2>&1 | tail -2; tar -czf $OUT/call3.tgz -C /tmp d3; }
run warmup 60 --modes 4 --layers 4 --token-budget 16384 --steps 8 --warmup-steps 3
cp .gl/lora_fused_head.py models/lora_fused.py
run full_perlayer 130 --modes 4 --steps 20 --warmup-steps 5
cp .gl/lora_fused_onenode.py models/lora_fused.py
run full_onenode 130 --modes 4 --steps 20 --warmup-steps 5
run table_onenode 300 --modes 1 2 3 4 --steps 20 --warmup-steps 5
grep -A12 "^| mode" $R/table_onenode.log | head -20; grep -E "ratio|host-bound|GPU-bound" $R/table_onenode.log | head
