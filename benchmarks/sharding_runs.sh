#!/usr/bin/env bash
# Issue #17's benchmark set (benchmarks/sharding.py) on the GPUs of one host: one JSON + log per run in
# OUT, then a summary table. Runs in priority order; each is capped at RUN_TIMEOUT seconds.
#
#   bash benchmarks/sharding_runs.sh OUT [NUM_GPUS=2] [RUNS="full lora70b lora7b"]
#
# full:    7B-shape full fine-tune (--no-use-lora), FSDP2 vs ZeRO-3 vs ZeRO-2, NUM_GPUS GPUs (6N MFU)
# lora70b: LoRA on a Llama-3-70B-shaped base, random weights made shard by shard, FSDP2 (4N MFU)
# lora7b:  LoRA on the 7B shape, FSDP2 vs the default engine (DeepSpeed ZeRO-2), 1 then NUM_GPUS GPUs
# ZeRO-3 needs ds_configs/zero3.json (the ZeRO-3 branch of issue #17); without it that run fails alone.
set -uo pipefail
OUT="${1:?usage: benchmarks/sharding_runs.sh OUT [NUM_GPUS] [RUNS]}"
N="${2:-2}"
RUNS="${3:-full lora70b lora7b}"
RUN_TIMEOUT="${RUN_TIMEOUT:-170}"
PY="${PYTHON:-python}"
# CPU smoke of this script: SHAPE7B=tiny SHAPE70B=tiny EXTRA="--tokens-per-gpu 512 --example-len 128 --steps 1"
SHAPE7B="${SHAPE7B:-7b}"
SHAPE70B="${SHAPE70B:-llama3-70b}"
EXTRA="${EXTRA:-}"
mkdir -p "$OUT"
port=29700

run() {  # name nproc flags...
  local name=$1 nproc=$2; shift 2
  port=$((port + 1))
  echo "== $name ($nproc GPU)"
  if ! timeout "$RUN_TIMEOUT" "$PY" -m torch.distributed.run --nproc-per-node "$nproc" --master-port "$port" \
      -m benchmarks.sharding "$@" $EXTRA --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1; then
    echo "   failed or timed out; tail of $OUT/$name.log:"
    tail -3 "$OUT/$name.log"
  fi
}

for r in $RUNS; do
  case $r in
    full)
      run full_7b_fsdp2_${N}gpu "$N" --shape $SHAPE7B --mode full --engine fsdp2 --steps 4 --warmup-steps 2
      run full_7b_zero3_${N}gpu "$N" --shape $SHAPE7B --mode full --engine deepspeed --deepspeed ds_configs/zero3.json --steps 4 --warmup-steps 2
      run full_7b_zero2_${N}gpu "$N" --shape $SHAPE7B --mode full --engine deepspeed --deepspeed ds_configs/zero2.json --steps 4 --warmup-steps 2 ;;
    lora70b)
      run lora_70b_fsdp2_${N}gpu "$N" --shape $SHAPE70B --mode lora --engine fsdp2 --steps 3 --warmup-steps 1 ;;
    lora7b)
      for n in 1 "$N"; do
        run lora_7b_fsdp2_${n}gpu "$n" --shape $SHAPE7B --mode lora --engine fsdp2 --steps 5 --warmup-steps 2
        run lora_7b_zero2_${n}gpu "$n" --shape $SHAPE7B --mode lora --engine deepspeed --steps 5 --warmup-steps 2
      done ;;
    *) echo "unknown run set $r (full, lora70b, lora7b)"; exit 2 ;;
  esac
done

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
print("| run | GPUs | tokens/s/GPU | MFU | MFU incl. attn | peak GiB/GPU | s/step |")
print("|---|---|---|---|---|---|---|")
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    print(f"| {f.stem} | {r['world_size']} | {r['tokens_per_s_per_gpu']:,.0f} | {100 * r['mfu']:.1f}% ({r['flops_per_token']}) | "
          f"{100 * r['mfu_with_attention']:.1f}% | {r['peak_gib_per_gpu'] or 0:.1f} | {r['seconds_per_step']:.2f} |")
PYEOF
