#!/usr/bin/env bash
# #15 call 2: GQA check; compiled layers with the in-graph shared dropout; then native GQA (patch) eager vs compiled
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles
R=/tmp/r2; mkdir -p $R
echo "=== gqa $(date +%T)"; timeout 60 python3 .gl/gqa_check.py > $R/gqa.log 2>&1; echo rc $?; tail -8 $R/gqa.log
B="--shape 7b --steps 20 --warmup-steps 5 --step-engine torch"
run() { name=$1; tmo=$2; shift 2; echo "=== $name $(date +%T)"; timeout $tmo python3 -m benchmarks.train_throughput $B --out $R/$name.json "$@" > $R/$name.log 2>&1; echo "rc $? recompiles $(grep -c 'Recompiling function' $R/$name.log)"; grep -E "real tokens/s|per step|budget|recompile_limit" $R/$name.log | tail -5; python3 -c "import json;d=json.load(open('$R/$name.json'))['modes']['4'];print('row',d['token_budget'],'peak',round(d['peak_gib'] if 'peak_gib' in d else -1,1), (d.get('token_budget_probe') or {}).get('probe_mib_per_1k_tokens'))" 2>&1 | tail -1; tar -czf $OUT/call2.tgz -C /tmp r2; }
run m4_auto_compile_shared 170 --modes 4 --compile on
git apply .gl/gqa.patch && echo "applied gqa patch"
run m4_auto_eager_gqa 110 --modes 4
run m4_auto_compile_gqa 170 --modes 4 --compile on
run m4_4096_compile_gqa 110 --modes 4 --compile on --token-budget 4096
