#!/usr/bin/env bash
# #15 session 2026-11-29c call 2: in-place LoRA add on the GEMM's own 2-D output (no CopySlices) vs HEAD, full 7B default; compiled torch; bf16 compiled-vs-eager check
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/r6; mkdir -p $R
run() { name=$1; tmo=$2; shift 2; echo "=== $name $(date +%T)"; timeout $tmo python3 -m benchmarks.train_throughput --shape 7b --modes 4 --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $?"; python3 -c "import json;d=json.load(open('$R/$name.json'));m=d['modes']['4'];print(round(m['tokens_per_s']),'tok/s row',m['token_budget'],'peak',round(m['peak_gib'],1));print([l for l in d['markdown'].splitlines() if 'mode 4' in l])" 2>&1 | tail -2; tar -czf $OUT/call6.tgz -C /tmp r6; }
echo "=== compile_check $(date +%T)"; timeout 100 python3 -m benchmarks.compile_check --shape 7b --layers 4 --tokens 4096 --out $R/compile_check.json > $R/compile_check.log 2>&1; echo "rc $?"; grep -A12 '"losses"' $R/compile_check.log | tr -s ' \n' ' '; echo
cp .gl/lora_fused_head.py models/lora_fused.py
run full_default_head 130 --steps 20 --warmup-steps 5
cp .gl/lora_fused_new.py models/lora_fused.py
run full_default_new 130 --steps 20 --warmup-steps 5
run full_torch_compile_new 170 --steps 20 --warmup-steps 5 --step-engine torch --compile on
