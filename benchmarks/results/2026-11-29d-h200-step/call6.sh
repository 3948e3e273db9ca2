#!/usr/bin/env bash
# #15 session 2026-11-29d call 6: the fixed 4096-token row at the defaults with the one-node groups
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/d6; mkdir -p $R
timeout 140 python3 -m benchmarks.train_throughput --shape 7b --modes 4 --steps 20 --warmup-steps 5 --token-budget 4096 --out $R/m4_4096.json > $R/m4_4096.log 2>&1; echo "rc $?"
grep -E "^\| 4 |mode 4 per step|mode 4 GPU" $R/m4_4096.log
tar -czf $OUT/call6.tgz -C /tmp d6
