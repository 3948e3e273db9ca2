#!/usr/bin/env bash
# #15 session 2026-11-29d call 1: one autograd node per LoRA sibling group (models/lora_autograd.py) vs HEAD's per-layer ops
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/d1; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > $R/smi.txt 2>&1
run() { name=$1; tmo=$2; shift 2; echo "=== $name $(date +%T)"; timeout $tmo python3 -m benchmarks.train_throughput --shape 7b --modes 4 --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $?"; python3 -c "import json;d=json.load(open('$R/$name.json'));m=d['modes']['4'];print(round(m['tokens_per_s']),'tok/s row',m['token_budget'],'peak',round(m['peak_gib'],1),'loss',m['loss_last']);print({k:(v['host_ms'],v['device_ms']) for k,v in m['phases'].items()})" 2>&1 | tail -2; tar -czf $OUT/call1.tgz -C /tmp d1; }
L="--layers 4 --token-budget 16384 --steps 15 --warmup-steps 5"
cp .gl/lora_fused_head.py models/lora_fused.py
run L_head $((75)) $L
cp .gl/lora_fused_onenode.py models/lora_fused.py
run L_onenode 75 $L
run full_onenode 130 --steps 20 --warmup-steps 5
cp .gl/lora_fused_head.py models/lora_fused.py
run full_head 130 --steps 20 --warmup-steps 5
cp .gl/lora_fused_onenode.py models/lora_fused.py
