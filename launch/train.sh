#!/usr/bin/env bash
""":"
# Launch Stage2 training, or -- started by a launcher -- be one of its ranks.
#
#   deepspeed launch/train.sh <training flags>                       # the design's form, all local GPUs
#   launch/train.sh [--num-gpus N] [--hostfile FILE] [--master-port P] -- <training flags>
#   torchrun --nproc-per-node N launch/train.sh <training flags>
#   srun launch/train.sh <training flags>                            # inside sbatch (launch/train.sbatch)
#
# Started by hand, it runs the DeepSpeed launcher (every local GPU, a free port; on a machine without
# CUDA, N CPU processes over gloo, default 1 -- used by the tests). Started by a launcher (RANK and
# WORLD_SIZE set by deepspeed/torchrun, or an srun step of several tasks), it execs the trainer in
# this process instead of launching again. The flags after `--` (or all flags, under a launcher) go
# to `python -m trainer.train` unchanged (see `python -m trainer.train -h`).
# Environment: PYTHON (interpreter, default: python3 on PATH), extra DeepSpeed launcher flags in
# DS_LAUNCHER_ARGS (e.g. "--include localhost:0,1").
#
# Why this file is also valid Python: the DeepSpeed launcher and torchrun run their script with
# Python, so `deepspeed launch/train.sh` would otherwise end in a SyntaxError. Bash reads the line
# above this comment block as the no-op `:` and exits before the closing quotes; Python reads this
# whole block as a string and runs the code after it (the same trainer, in the launcher's process).
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
NUM_GPUS=""
HOSTFILE=""
MASTER_PORT="${MASTER_PORT:-}"

usage() { sed -n '3,21p' "${BASH_SOURCE[0]}" | sed -E 's/^# ?//'; exit "${1:-0}"; }

# Inside a launcher: torchrun/deepspeed set RANK and WORLD_SIZE; srun sets SLURM_STEP_NUM_TASKS (a
# batch script alone does not) -- with one task, srun is just a way to reach the node: launch from here.
inside_launcher() {
  [[ -n "${RANK:-}" && -n "${WORLD_SIZE:-}" ]] && return 0
  [[ -n "${SLURM_PROCID:-}" && "${SLURM_STEP_NUM_TASKS:-1}" -gt 1 ]]
}

if inside_launcher; then
  # Launcher options make no sense here (the launcher chose the processes); the DeepSpeed launcher's
  # --local_rank=N goes through to the trainer, which accepts it.
  ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --num-gpus|--hostfile|--master-port)
        echo "launch/train.sh: $1 has no effect inside a launcher (it chose the processes); pass training flags only" >&2
        exit 2 ;;
      --) shift; ARGS+=("$@"); break ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
  export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PYTHON" -m trainer.train ${ARGS[@]+"${ARGS[@]}"}
fi

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
# Never reached by bash; to bash the Python part is a here-document, so `bash -n` reads a valid script.
: <<'# end of the Python part'
":"""

# Python: a launcher ran this file as its script (`deepspeed launch/train.sh ...`, `torchrun ...
# launch/train.sh ...`); this process is one rank: run the trainer here, as the bash part would.
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
args = sys.argv[1:]
if "--" in args:  # `launch/train.sh [launcher options] -- <training flags>`: only --local_rank may precede
    cut = args.index("--")
    extra = [a for a in args[:cut] if not a.startswith("--local_rank")]
    if extra:
        sys.exit(f"launch/train.sh: {extra[0]} has no effect inside a launcher (it chose the processes); "
                 "pass training flags only")
    args = args[:cut] + args[cut + 1:]
for opt in ("--num-gpus", "--hostfile", "--master-port"):
    if opt in args:
        sys.exit(f"launch/train.sh: {opt} has no effect inside a launcher (it chose the processes); "
                 "pass training flags only")
sys.argv = [os.path.abspath(__file__)] + args
runpy.run_module("trainer.train", run_name="__main__", alter_sys=True)
# end of the Python part
