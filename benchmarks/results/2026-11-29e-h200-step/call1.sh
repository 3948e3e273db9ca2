#!/usr/bin/env bash
# #15 session 2026-11-29e call 1: warm-up (fresh machine), the fixed 4096-token row, then the four-mode table at the defaults
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/e1; mkdir -p $R
git log --oneline -1 > $R/commit.txt 2>&1 || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > $R/smi.txt 2>&1
run() { name=$1; tmo=$2; shift 2; echo "=== $name $(date +%T)"; timeout $tmo python3 -m benchmarks.train_throughput --shape 7b --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $? $(date +%T)"; python3 -c "import json;d=json.load(open('$R/$name.json'));m=d['modes']['4'];print(round(m['tokens_per_s']),'tok/s row',m['token_budget'],'peak',round(m['peak_gib'],1),'loss',m['loss_last']);print({k:(v['host_ms'],v['device_ms']) for k,v in m['phases'].items()})" 2>&1 | tail -2; tar -czf $OUT/callE1.tgz -C /tmp e1; }
run warmup 110 --modes 4 --layers 4 --token-budget 16384 --steps 8 --warmup-steps 3
run m4_4096 150 --modes 4 --steps 20 --warmup-steps 5 --token-budget 4096
grep -E "GPU-bound|host-bound" $R/m4_4096.log | head -3
run table 320 --modes 1 2 3 4 --steps 20 --warmup-steps 5
grep -A12 "^| mode" $R/table.log | head -20; grep -E "ratio|host-bound|GPU-bound" $R/table.log | head
