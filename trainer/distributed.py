"""Process-group setup: the one place that knows how a job was launched.

Supported launchers, all ending in the same env:// rendezvous:
- `deepspeed` / `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set.
- `srun` (launch/train.sbatch): one task per GPU; SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID give
  the layout and the first host of SLURM_JOB_NODELIST is the master (port derived from the job id).
- a plain `python -m trainer.train`: a world of one on a free local port.

Collectives get a timeout (`--dist-timeout-s`), so when one rank dies the others fail with an
error instead of hanging until the job's wall-clock limit.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

# DeepSpeed picks its accelerator once, on first use: make CPU-only machines say so up front.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def first_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: 'gpu[03-05,07],cpu1' -> 'gpu03'.

    Uses `scontrol show hostnames` when available (it knows every syntax), else a parser for the
    common `prefix[a-b,c]` form.
    """
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover_layout(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for this process, from whichever launcher ran it."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / deepspeed launcher
        layout = {"RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"],
                  "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
                  "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                  "MASTER_PORT": env.get("MASTER_PORT", "29500")}
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        layout = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
                  "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                  "MASTER_ADDR": env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1"),
                  # Same port on every task without communication; spread over jobs sharing a node.
                  "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job_id % 20000)}
    else:
        layout = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                  "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                  "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}
    return layout


def init_distributed(cfg=None, timeout_s: int | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (nccl on CUDA, gloo on CPU) and pick the device.

    The collective timeout is `timeout_s`, else `cfg.dist_timeout_s`, else 30 minutes.
    """
    timeout_s = timeout_s or getattr(cfg, "dist_timeout_s", None) or 1800
    layout = discover_layout()
    os.environ.update(layout)
    rank, world, local = int(layout["RANK"]), int(layout["WORLD_SIZE"]), int(layout["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"

    import deepspeed

    if device.type == "cpu":
        disable_shm_allreduce_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s),
                               rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device, is_main=rank == 0)


def shm_allreduce_path(rank: int, env: Mapping[str, str] | None = None) -> Path:
    """Where DeepSpeed's CPU backend would put rank `rank`'s shared-memory allreduce buffer (shm.cpp)."""
    env = os.environ if env is None else env
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                               f"{env.get('MASTER_PORT', '')}_{rank}")


def disable_shm_allreduce_op() -> None:
    """Keep DeepSpeed's CPU backend from building and starting its shared-memory allreduce op.

    We never use it (CPU runs reduce through gloo; it serves DeepSpeed's inference all-reduce), and
    it costs: every machine JIT-compiles it on first use, under a file lock that a killed compile
    leaves behind (every later run then waits on it forever), and when the launcher sets LOCAL_SIZE
    each rank maps a ~66 MB /dev/shm segment that DeepSpeed never unlinks, so runs leak RAM until
    the machine runs out (a test suite of launcher runs left 21 GB). DeepSpeed keeps its op
    compatibility table in one module-level dict that it reads when the backend starts.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: dict[str, float] | torch.Tensor, device: torch.device | None = None):
    """Sum over ranks. A tensor is reduced in place and returned; a dict of floats is reduced in
    one collective and returned as a new dict (a host sync: call it at log steps only)."""
    if isinstance(values, torch.Tensor):
        if is_initialized():
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device or "cpu")
    if is_initialized():
        if t.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()
