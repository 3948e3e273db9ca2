"""What this process runs on: its device and compute precision, how it was launched, its seed.

The one owner of these facts: the shard builder, the trainer, eval and the benchmarks all ask here.

Launchers, all read from the environment:
- `deepspeed` / `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (also on several
  nodes: `torchrun --nnodes N --node-rank r`, `deepspeed --no_ssh --node_rank r`, pdsh).
- `srun`: one task per GPU; SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID give the layout and the
  first host of the step's nodelist is the master (port derived from the job id). A SLURM job
  array adds SLURM_ARRAY_TASK_ID / _COUNT / _MIN (the shard builder's nodes).
- neither: a world of one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


# ---------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------

def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's index among the processes of its node (srun's, else the launcher's, else 0)."""
    env = os.environ if env is None else env
    return int(env.get("SLURM_LOCALID", env.get("LOCAL_RANK", "0")))


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None): this process's GPU (local rank modulo the visible GPUs) if there is one, else the CPU."""
    if isinstance(spec, torch.device):
        return spec
    if spec not in (None, "auto"):
        return torch.device(spec)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """'auto' -> 'bf16' on CUDA, 'fp32' elsewhere; other names normalised to bf16 | fp16 | fp32."""
    if precision == "auto":
        return "bf16" if resolve_device(device).type == "cuda" else "fp32"
    name = _ALIASES.get(precision, precision)
    if name not in DTYPES:
        raise ValueError(f"unknown precision {precision!r} (auto, bf16, fp16, fp32)")
    return name


def resolve_dtype(precision: str, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype of `resolve_precision(precision, device)`."""
    return DTYPES[resolve_precision(precision, device)]


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Launch detection
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlurmTask:
    """This process as SLURM sees it (`slurm_task()`): its srun task and its job-array task."""

    procid: int
    ntasks: int
    localid: int
    array_index: int  # 0-based, whatever the --array range's first number
    array_count: int
    nodelist: str
    job_id: int


def slurm_task(env: Mapping[str, str] | None = None) -> Optional[SlurmTask]:
    """None outside SLURM. srun sets SLURM_PROCID (a batch script alone has one task, procid 0)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env and "SLURM_PROCID" not in env and "SLURM_ARRAY_TASK_ID" not in env:
        return None
    in_step = "SLURM_PROCID" in env
    array_count, array_index = 1, 0
    if "SLURM_ARRAY_TASK_ID" in env:  # --array=3-6 numbers tasks 3..6: indices are 0..3
        array_count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
        array_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    return SlurmTask(
        procid=int(env.get("SLURM_PROCID", "0")),
        ntasks=int(env.get("SLURM_NTASKS", "1")) if in_step else 1,
        localid=int(env.get("SLURM_LOCALID", "0")),
        array_index=array_index, array_count=array_count,
        nodelist=env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""),
        job_id=int(env.get("SLURM_JOB_ID", "0") or 0))


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
        return {"RANK": env["RANK"], "WORLD_SIZE": env["WORLD_SIZE"],
                "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
                "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                "MASTER_PORT": env.get("MASTER_PORT", "29500")}
    slurm = slurm_task(env)
    if slurm is not None and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
        return {"RANK": str(slurm.procid), "WORLD_SIZE": str(slurm.ntasks), "LOCAL_RANK": str(slurm.localid),
                "MASTER_ADDR": env.get("MASTER_ADDR") or (first_host(slurm.nodelist) if slurm.nodelist else "127.0.0.1"),
                # Same port on every task without communication; spread over jobs sharing a node.
                "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + slurm.job_id % 20000)}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}
