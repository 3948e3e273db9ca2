#!/usr/bin/env bash
# #15 session 2026-11-29c call 1: in-place LoRA add (eager) / fused add (compiled) vs HEAD; dropout cost; inductor RNG vs aten RNG
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/r5; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,power.draw,temperature.gpu --format=csv > $R/smi.txt
run() { name=$1; tmo=$2; shift 2; echo "=== $name $(date +%T)"; timeout $tmo python3 -m benchmarks.train_throughput --shape 7b --modes 4 --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $?"; python3 -c "import json;d=json.load(open('$R/$name.json'));m=d['modes']['4'];print(round(m['tokens_per_s']),'tok/s row',m['token_budget'],'peak',round(m['peak_gib'],1));print([l for l in d['markdown'].splitlines() if 'mode 4' in l])" 2>&1 | tail -2; tar -czf $OUT/call5.tgz -C /tmp r5; }
L="--layers 4 --token-budget 16384 --steps 15 --warmup-steps 5 --step-engine torch"
cp .gl/lora_fused_head.py models/lora_fused.py
run L_head_eager 80 $L
run L_head_compile 100 $L --compile on
cp .gl/lora_fused_new.py models/lora_fused.py
run L_new_eager 80 $L
run L_new_compile 100 $L --compile on
PYTHONPATH=$PWD/.gl/fbrand:$PYTHONPATH run L_new_compile_fbrand 100 $L --compile on
run L_new_compile_p0 100 $L --compile on --lora-dropout 0
run L_new_eager_p0 80 $L --lora-dropout 0
run full_default_new 150 --steps 20 --warmup-steps 5
