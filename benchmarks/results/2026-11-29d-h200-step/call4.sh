#!/usr/bin/env bash
# #15 session 2026-11-29d call 4: compiled vs eager (one-node groups, packed adapters) vs fp32 on the GPU
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/d4; mkdir -p $R
echo "=== compile_check $(date +%T)"; timeout 150 python3 -m benchmarks.compile_check --shape 7b --layers 4 --tokens 4096 --out $R/compile_check.json > $R/compile_check.log 2>&1; echo "rc $?"; tail -22 $R/compile_check.log
tar -czf $OUT/call4.tgz -C /tmp d4
