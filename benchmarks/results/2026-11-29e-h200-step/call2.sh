#!/usr/bin/env bash
# #15 session 2026-11-29e call 2: warm-up, mode 1 alone, the four-mode table, mode 4 alone, mode 1 alone again (same machine: is mode 1's spread per machine or per run?)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/e2; mkdir -p $R
git log --oneline -1 > $R/commit.txt 2>&1 || true
(nproc; uptime; lscpu | grep -E "Model name|MHz|^CPU\(s\)") > $R/host.txt 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv > $R/smi.txt 2>&1
run() { name=$1; tmo=$2; m=$3; shift 3; echo "=== $name $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"; timeout $tmo python3 -m benchmarks.train_throughput --shape 7b --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $? $(date +%T)"; python3 -c "import json;d=json.load(open('$R/$name.json'));m=d['modes']['$m'];print(round(m['tokens_per_s']),'tok/s mode $m row',m.get('token_budget'),'ms/step',round(m['ms_per_step'],1),'peak',round(m['peak_gib'],1))" 2>&1 | tail -1; tar -czf $OUT/callE2.tgz -C /tmp e2; }
run warmup 90 4 --modes 4 --layers 4 --token-budget 16384 --steps 4 --warmup-steps 2
run mode1_a 60 1 --modes 1 --steps 20 --warmup-steps 5
run table 300 4 --modes 1 2 3 4 --steps 20 --warmup-steps 5
grep -A6 "^| mode" $R/table.log | head -8; grep -E "ratio|GPU-bound" $R/table.log | head -3
run m4_alone 130 4 --modes 4 --steps 20 --warmup-steps 5
run mode1_b 60 1 --modes 1 --steps 20 --warmup-steps 5
