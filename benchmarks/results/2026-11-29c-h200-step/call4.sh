#!/usr/bin/env bash
# #15 session 2026-11-29c call 4: sibling projections share one low-rank GEMM (q/k/v, gate/up) vs the in-place-add commit
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/r8; mkdir -p $R
run() { name=$1; tmo=$2; shift 2; echo "=== $name $(date +%T)"; timeout $tmo python3 -m benchmarks.train_throughput --shape 7b --modes 4 --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $?"; python3 -c "import json;d=json.load(open('$R/$name.json'));m=d['modes']['4'];print(round(m['tokens_per_s']),'tok/s row',m['token_budget'],'peak',round(m['peak_gib'],1));print([l for l in d['markdown'].splitlines() if 'mode 4' in l])" 2>&1 | tail -2; tar -czf $OUT/call8.tgz -C /tmp r8; }
L="--layers 4 --token-budget 16384 --steps 15 --warmup-steps 5"
cp .gl/lora_fused_inplace.py models/lora_fused.py
run L_inplace_default 75 $L
cp .gl/lora_fused_grouped.py models/lora_fused.py
run L_grouped_default 75 $L
run full_default_grouped 120 --steps 20 --warmup-steps 5
