"""Stand-ins for `srun` and `scontrol` that act out a multi-node SLURM job on this one host.

    python tests/fake_slurm.py srun [--opt=...] CMD ARGS...        # every task of the job, here
    python tests/fake_slurm.py scontrol show hostnames NODELIST

`srun` starts SLURM_NNODES x SLURM_NTASKS_PER_NODE copies of CMD with the variables real srun gives
each task (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_*), as on a job of that many nodes;
like `--kill-on-bad-exit=1`, a failing task ends the others. `scontrol show hostnames` expands
'prefix[a-b,c]' lists; `scontrol requeue` is accepted. Used by tests/test_launch_forms.py to run
launch/train.sbatch's 2-node path without a cluster (tests/slurm.py runs a real one-node SLURM).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time


def hostnames(nodelist: str) -> list[str]:
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def srun(argv: list[str]) -> int:
    while argv and argv[0].startswith("-"):
        argv = argv[1:]  # srun's own options (all given as --opt=value here)
    nodes = int(os.environ["SLURM_NNODES"])
    per_node = int(os.environ["SLURM_NTASKS_PER_NODE"])
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    procs = []
    for node in range(nodes):
        for local in range(per_node):
            env = {**os.environ, "SLURM_PROCID": str(node * per_node + local), "SLURM_LOCALID": str(local),
                   "SLURM_NODEID": str(node), "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_ID": "0",
                   "SLURM_STEP_NUM_TASKS": str(nodes * per_node), "SLURM_STEP_NUM_NODES": str(nodes),
                   "SLURM_STEP_NODELIST": nodelist, "SLURMD_NODENAME": hostnames(nodelist)[node]}
            procs.append(subprocess.Popen(argv, env=env))
    while True:  # --kill-on-bad-exit=1
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes) or all(c == 0 for c in codes):
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return max(abs(p.wait()) for p in procs)


def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "hostnames"]:
        print("\n".join(hostnames(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit({"srun": srun, "scontrol": scontrol}[sys.argv[1]](sys.argv[2:]))
