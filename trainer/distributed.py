"""Process-group setup: the one place that knows how a job was launched.

Supported launchers, all ending in the same env:// rendezvous:
- `deepspeed` / `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set.
- `srun` (launch/train.sbatch): one task per GPU; SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID give
  the layout and the first host of SLURM_JOB_NODELIST is the master (port derived from the job id).
- a plain `python -m trainer.train`: a world of one on a free local port.

Collectives get a timeout (`--dist-timeout-s`), so when one rank dies the others fail with an
error instead of hanging until the job's wall-clock limit.

CPU affinity (`--cpu-affinity auto|gpu`, off by default): each rank's host thread issues every
kernel of a host-bound step; pinned, with its data workers, to its own share of the CPUs next to its
GPU (sysfs `local_cpulist`, split by physical core among the ranks whose GPUs share those CPUs), it
is not moved across sockets. `auto` leaves processes that a launcher bound already (srun --cpu-bind,
numactl, a cgroup) alone. Off by default: on a one-NUMA-node machine there is no remote memory to
avoid, and fewer CPUs per rank only slow its host thread (README.md, Multi-GPU).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from common.runtime import discover_layout

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


# ---------------------------------------------------------------------------------------------
# CPU affinity
# ---------------------------------------------------------------------------------------------

def parse_cpulist(text: str) -> set[int]:
    """Linux CPU list syntax: '0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _cpulist_text(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs, out = [], []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    for lo, hi in runs:
        out.append(f"{lo}-{hi}" if hi > lo else str(lo))
    return ",".join(out)


def _read_cpulist(path: Path) -> set[int] | None:
    try:
        return parse_cpulist(path.read_text()) or None
    except (OSError, ValueError):
        return None


def physical_cores(cpus: Sequence[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> list[list[int]]:
    """`cpus` grouped by physical core (hyperthread siblings together), cores ordered by their first CPU."""
    wanted, cores, seen = set(cpus), [], set()
    for cpu in sorted(wanted):
        if cpu in seen:
            continue
        siblings = _read_cpulist(sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list") or {cpu}
        core = sorted((siblings & wanted) | {cpu})
        seen.update(core)
        cores.append(core)
    return cores


def split_cores(cores: Sequence[Sequence[int]], parts: int, index: int) -> list[int]:
    """The CPUs of share `index` when `cores` are dealt into `parts` contiguous, near-equal shares
    (whole physical cores; with fewer cores than shares, every share gets all of them)."""
    if parts <= 1 or len(cores) < parts:
        return sorted(c for core in cores for c in core)
    base, extra = divmod(len(cores), parts)
    start = index * base + min(index, extra)
    share = cores[start:start + base + (1 if index < extra else 0)]
    return sorted(c for core in share for c in core)


def plan_cpu_affinity(local_rank: int, gpu_cpus: Sequence[set[int] | None], allowed: set[int],
                      sysfs: Path = Path("/sys/devices/system/cpu")) -> list[int]:
    """The CPUs of local rank `local_rank` (GPU `local_rank`): the allowed CPUs next to its GPU (all
    allowed ones where sysfs does not say), split by physical core among the local ranks whose GPUs
    sit next to the same CPUs."""
    def near(cpus: set[int] | None) -> frozenset[int]:
        return frozenset((cpus or set()) & allowed or allowed)

    mine = near(gpu_cpus[local_rank])
    peers = [r for r in range(len(gpu_cpus)) if near(gpu_cpus[r]) == mine]
    return split_cores(physical_cores(sorted(mine), sysfs), len(peers), peers.index(local_rank))


def local_world_size(world: int, env: Mapping[str, str] | None = None) -> int:
    """Processes on this node: the launcher's count (torchrun, DeepSpeed, SLURM), else the GPUs in use."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, min(world, torch.cuda.device_count() if torch.cuda.is_available() else world))


def gpu_local_cpus(device_index: int) -> set[int] | None:
    """CPUs on the NUMA node of CUDA device `device_index`, from sysfs (None when unknown)."""
    try:
        props = torch.cuda.get_device_properties(device_index)
        bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except (AttributeError, RuntimeError, AssertionError):
        return None
    return _read_cpulist(Path("/sys/bus/pci/devices") / bus / "local_cpulist")


def bind_cpu_affinity(mode: str, local_rank: int, world: int) -> list[int] | None:
    """Pin this process (and the data workers it will start) to its CPUs; returns them, or None
    where nothing was changed. `mode`: auto (CUDA runs whose CPUs no launcher restricted),
    gpu (always, within the allowed CPUs), off."""
    if mode == "off" or not hasattr(os, "sched_setaffinity") or not torch.cuda.is_available():
        return None
    allowed = os.sched_getaffinity(0)
    if mode == "auto" and len(allowed) < (os.cpu_count() or 0):
        return None  # srun --cpu-bind / numactl / a cgroup already decided
    nlocal = local_world_size(world)
    gpu_cpus = [gpu_local_cpus(i) for i in range(min(nlocal, torch.cuda.device_count()))]
    if local_rank >= len(gpu_cpus):
        return None
    cpus = plan_cpu_affinity(local_rank, gpu_cpus, allowed)
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(max(1, len(cpus)))  # the intra-op pool must not outnumber its CPUs
    return cpus


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
        mode = getattr(cfg, "cpu_affinity", "off")
        cpus = bind_cpu_affinity(mode, local, world)
        if cpus is not None:
            print(f"[rank {rank}] CPU affinity: {len(cpus)} CPUs {_cpulist_text(cpus)} (GPU {local})", flush=True)
        elif mode != "off":
            print(f"[rank {rank}] CPU affinity left as the launcher set it: {len(os.sched_getaffinity(0))} CPUs", flush=True)
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
    each rank maps a /dev/shm segment that DeepSpeed never unlinks, so repeated launcher runs (a
    test suite) leak RAM until the machine runs out. DeepSpeed keeps its op
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


def all_gather_rows(row: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D `row` stacked into a [world, n] tensor, on every rank (a host sync)."""
    if not is_initialized():
        return row.unsqueeze(0)
    rows = [torch.empty_like(row) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(rows, row)
    return torch.stack(rows)


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank (a host sync)."""
    if not is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


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
