#!/usr/bin/env bash
# #17 call 4: ZeRO-3 on a GPU for the first time (LoRA, 7B shape, 1 GPU), with FSDP2 and ZeRO-2 on the same GPU
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
R=/tmp/r4; mkdir -p $R; port=29760
run() { name=$1; shift; port=$((port+1)); echo "=== $name $(date +%T)"; timeout 105 python3 -m torch.distributed.run --nproc-per-node 1 --master-port $port -m benchmarks.sharding --shape 7b --mode lora --steps 5 --warmup-steps 2 "$@" --out $R/$name.json > $R/$name.log 2>&1; echo "rc $?"; tail -3 $R/$name.log | cut -c1-300; tar -czf $OUT/call4.tgz -C /tmp r4; }
run lora_7b_zero3_1gpu --engine deepspeed --deepspeed ds_configs/zero3.json
run lora_7b_fsdp2_1gpu --engine fsdp2
run lora_7b_zero2_1gpu --engine deepspeed --deepspeed ds_configs/zero2.json
