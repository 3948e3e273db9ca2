#!/usr/bin/env bash
# session 2026-11-29e call 4: the split benchmark (benchmarks/throughput/) on the GPU: every mode at 4 layers with --profile and --sync-debug, then compile_check
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/e4; mkdir -p $R
git log --oneline -1 > $R/commit.txt 2>&1 || true
timeout 200 python3 -m benchmarks.train_throughput --shape 7b --layers 4 --modes 1 2 3 4 --steps 4 --warmup-steps 2 --profile --sync-debug --out $R/L4.json > $R/L4.log 2>&1; echo "rc $?"
grep -A6 "^| mode" $R/L4.log | head -7; grep -E "GPU-bound|host-bound|busy|ratios" $R/L4.log | head -4
python3 -c "import json;d=json.load(open('$R/L4.json'));m=d['modes']['4'];print('profile',m['profile']['file'],m['profile']['device_busy_fraction']);print('syncs/step',m['sync_points']['per_step'])" 2>&1 | tail -2
tar -czf $OUT/callE4.tgz -C /tmp e4
timeout 110 python3 -m benchmarks.compile_check --shape 7b --layers 4 --tokens 4096 --out $R/compile_check.json > $R/compile_check.log 2>&1; echo "rc $?"
tail -3 $R/compile_check.log
tar -czf $OUT/callE4.tgz -C /tmp e4
