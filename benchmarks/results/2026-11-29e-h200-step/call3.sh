#!/usr/bin/env bash
# #15 session 2026-11-29e call 3: every goal of #15 in one call: warm-up, the fixed 4096-token row, the four-mode table, mode 4 alone
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/e3; mkdir -p $R
git log --oneline -1 > $R/commit.txt 2>&1 || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > $R/smi.txt 2>&1
run() { name=$1; tmo=$2; m=$3; shift 3; echo "=== $name $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"; timeout $tmo python3 -m benchmarks.train_throughput --shape 7b --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $? $(date +%T)"; python3 -c "import json;d=json.load(open('$R/$name.json'));m=d['modes']['$m'];print(round(m['tokens_per_s']),'tok/s mode $m row',m.get('token_budget'),'ms/step',round(m['ms_per_step'],1),'peak',round(m['peak_gib'],1))" 2>&1 | tail -1; tar -czf $OUT/callE3.tgz -C /tmp e3; }
run warmup 90 4 --modes 4 --layers 4 --token-budget 16384 --steps 4 --warmup-steps 2
run m4_4096 120 4 --modes 4 --steps 20 --warmup-steps 5 --token-budget 4096
grep -E "GPU-bound|host-bound" $R/m4_4096.log | head -2
run table 300 4 --modes 1 2 3 4 --steps 20 --warmup-steps 5
grep -A6 "^| mode" $R/table.log | head -8; grep -E "ratio|GPU-bound" $R/table.log | head -3
run m4_alone 120 4 --modes 4 --steps 20 --warmup-steps 5
