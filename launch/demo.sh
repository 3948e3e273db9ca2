#!/usr/bin/env bash
# The README's demo: the whole pipeline on an embedded default, on CPU, in minutes.
#
#   launch/demo.sh [OUT_DIR]        (default: demo_out; `make demo` runs it in the project venv)
#
#   1. synthetic WeatherQA-like data (2 Gemini JSON files + GIFs whose texts depend on the images)
#   2. tiny random models of the real architectures (Mistral + locally trained tokenizer, MAE ViT,
#      EfficientNet) -- stand-ins for Mistral-7B and the Stage1 checkpoints
#   3. the offline shard builder (cached Stage1 latents, K=1 cached block tokens)
#   4. training with real DeepSpeed ZeRO-2 in 2 CPU processes: the uniform MTL recipe, the
#      summary-centric recipe and a phased one (captions first: docs/examples/captions_first.yaml),
#      each writing a resume checkpoint and an inference checkpoint
#   5. CoT stats, the comparison (pretrained vs uniform vs summary-centric vs phased), the report with
#      scores + plot, the "does the image matter" ablation (on the phased checkpoint) and the training
#      curves of the three runs (curves.png)
#
# Every step is resumable: rerunning the script skips finished shards and resumes training.
set -euo pipefail

OUT="${1:-demo_out}"
PYTHON="${PYTHON:-python}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

step() { printf '\n\033[1m=== %s ===\033[0m\n' "$*"; }

DATA="$OUT/data"; MODELS="$OUT/models"; SHARDS="$OUT/shards"; CKPT="$OUT/checkpoints"; EVAL="$OUT/eval"

step "1/5 synthetic WeatherQA-like data -> $DATA"
if [[ ! -f "$DATA/.done" ]]; then
  "$PYTHON" -m data_prep.synthetic --out "$DATA" --num-cases 60 --num-files 2 --seed 0
  touch "$DATA/.done"
fi
mapfile -t JSONS < <(ls "$DATA"/*.json | grep -v injected_faults)

step "2/5 tiny Mistral + tokenizer and tiny Stage1 checkpoints -> $MODELS"
if [[ ! -f "$MODELS/lm/config.json" ]]; then
  "$PYTHON" -m tiny_models.lm --out "$MODELS/lm" --gemini-json "${JSONS[@]}" \
    --hidden-size 128 --num-layers 2 --stage1-out "$MODELS/stage1" --image-size 32
fi
ENC="$MODELS/stage1/tiny_stage1_encoder.pt"
CLS="$MODELS/stage1/tiny_stage1_classifier.pt"
STAGE1=(--stage1-encoder-ckpt "$ENC" --stage1-classifier-ckpt "$CLS" --image-size 32 --stage1-trainable-blocks 1)

step "3/5 shard builder -> $SHARDS"
"$PYTHON" -m data_prep.build_shards --gemini-json "${JSONS[@]}" --image-root "$DATA" \
  "${STAGE1[@]}" --out "$SHARDS" --samples-per-shard 200 --num-workers 2 --batch-size 64

# The spec's flags (seed README), scaled to the tiny model: a larger LR, few epochs, 2 processes.
# (1e-2 rather than 3e-3: the tiny model's few steps reach a lower held-out loss with it.)
COMMON=(--shard-dir "$SHARDS" --model-path "$MODELS/lm" "${STAGE1[@]}"
        --batch-size 8 --lr 1e-2 --encoder-lr 1e-3 --warmup-ratio 0.1 --max-seq-len 256
        --use-lora --lora-r 32 --lora-alpha 64 --lora-dropout 0.05 --num-image-tokens 4
        --num-workers 1 --sample-log-steps 100 --sample-log-max-new-tokens 40 --save-steps 100
        --deepspeed ds_configs/zero2.json --resume)

step "4/5 training: uniform MTL (A/B/C mixed), 2 processes, DeepSpeed ZeRO-2"
launch/train.sh --num-gpus 2 -- "${COMMON[@]}" --output-dir "$CKPT/uniform" \
  --schedule uniform --num-epochs 3

step "4/5 training: summary-centric MTL (warm-up A+C, then summary-heavy)"
launch/train.sh --num-gpus 2 -- "${COMMON[@]}" --output-dir "$CKPT/summary_centric" \
  --schedule summary_centric --warmup-epochs 1 --main-epochs 2 \
  --prob-summary 0.7 --prob-caption 0.15 --prob-cot 0.15 --prob-text-summary 0.0

step "4/5 training: phased (2 caption epochs, then the task mix)"
launch/train.sh --num-gpus 2 -- "${COMMON[@]}" --output-dir "$CKPT/phased" \
  --schedule phased --phases docs/examples/captions_first.yaml

step "5/5 evaluation"
"$PYTHON" -m eval.cot_stats --shard-dir "$SHARDS" --tokenizer-path "$CKPT/uniform/final" \
  --max-seq-len 256 --num-image-tokens 4 --out-json "$EVAL/cot_stats.json"

"$PYTHON" -m eval.compare --shard-dir "$SHARDS" --split val --num-samples 48 \
  --checkpoint uniform="$CKPT/uniform/final" summary_centric="$CKPT/summary_centric/final" \
               phased="$CKPT/phased/final" \
  --pretrained-model-path "$MODELS/lm" --task summary --max-new-tokens 64 \
  --no-repeat-ngram-size 4 --repetition-penalty 1.1 --batch-size 16 \
  --out-dir "$EVAL/compare" --num-print-samples 2

"$PYTHON" -m eval.report --generations "$EVAL"/compare/*.jsonl --metric embedding \
  --out-dir "$EVAL/report" --plot-path "$EVAL/report/scores.png" --num-print-samples 2

"$PYTHON" -m eval.ablation --shard-dir "$SHARDS" --split val --num-samples 48 \
  --checkpoint-dir "$CKPT/phased/final" --task caption --max-new-tokens 48 \
  --out-dir "$EVAL/ablation"

"$PYTHON" -m eval.plot_run "$CKPT/uniform" "$CKPT/summary_centric" "$CKPT/phased" --out "$EVAL/curves.png"

step "done"
echo "data:        $DATA"
echo "shards:      $SHARDS/manifest.json"
echo "checkpoints: $CKPT/{uniform,summary_centric,phased}/final   (resume state in .../resume)"
echo "eval:        $EVAL/report/summary.md, $EVAL/report/scores.png, $EVAL/ablation, $EVAL/cot_stats.json,"
echo "             $EVAL/curves.png (training curves)"
