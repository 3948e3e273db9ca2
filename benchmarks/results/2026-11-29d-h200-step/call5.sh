#!/usr/bin/env bash
# #15 session 2026-11-29d call 5: where the remaining copies and elementwise kernels come from (stacks), 4 layers
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/d5; mkdir -p $R
OUT_STACK=$R/stacks.txt timeout 130 python3 .gl/stackprof.py --shape 7b --modes 4 --layers 4 --token-budget 16384 --steps 4 --warmup-steps 2 --profile --isolate-modes off --out $R/L.json > $R/L.log 2>&1; echo "rc $?"
grep -n "aten::copy_\|aten::add_\|aten::mul\b" $R/stacks.txt | head -20
tar -czf $OUT/call5.tgz -C /tmp d5
