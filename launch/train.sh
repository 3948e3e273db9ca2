#!/usr/bin/env bash
# Launch Stage2 training on one node (or several, with a hostfile) through the DeepSpeed launcher.
#
#   launch/train.sh [--num-gpus N] [--hostfile FILE] [--master-port P] -- <training flags>
#
#   launch/train.sh --num-gpus 8 -- --shard-dir shards/ --model-path mistral-7b \
#       --output-dir ckpt/uniform --batch-size 8 --num-epochs 1 --lr 2e-5 ...
#
# Defaults: every local GPU, a free port. On a machine without CUDA the job runs on CPU
# (DS_ACCELERATOR=cpu, gloo) with N processes (default 1) -- used by the tests.
# The flags after `--` go to `python -m trainer.train` unchanged (see `python -m trainer.train -h`).
# Environment: PYTHON (interpreter, default: python3 on PATH), extra DeepSpeed launcher
# flags in DS_LAUNCHER_ARGS (e.g. "--include localhost:0,1").
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
NUM_GPUS=""
HOSTFILE=""
MASTER_PORT="${MASTER_PORT:-}"

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-gpus) NUM_GPUS="$2"; shift 2 ;;
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --master-port) MASTER_PORT="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "launch/train.sh: unknown option '$1' (training flags go after --)" >&2; usage 2 ;;
  esac
done

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu          # DeepSpeed on CPU: gloo backend, CPU accelerator
  NUM_GPUS="${NUM_GPUS:-1}"          # "GPUs" = processes here
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
if [[ -z "$MASTER_PORT" ]]; then
  MASTER_PORT="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')"
fi

LAUNCHER_ARGS=(--master_port "$MASTER_PORT")
[[ -n "$NUM_GPUS" ]] && LAUNCHER_ARGS+=(--num_gpus "$NUM_GPUS")
[[ -n "$HOSTFILE" ]] && LAUNCHER_ARGS+=(--hostfile "$HOSTFILE")
# shellcheck disable=SC2206
[[ -n "${DS_LAUNCHER_ARGS:-}" ]] && LAUNCHER_ARGS+=(${DS_LAUNCHER_ARGS})

cd "$REPO_DIR"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCHER_ARGS[@]}" --module trainer.train "$@"
