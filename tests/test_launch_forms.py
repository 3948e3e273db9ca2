"""Every documented way to start training, as typed, on CPU (gloo), with one shared tiny run config.

- `deepspeed launch/train.sh ...` (the design's form: launch/train.sh is also valid Python), 2 processes:
  the reference run.
- `torchrun --nnodes 2 --node-rank r ... launch/train.sh ...`: two "nodes" of one process on this host
  (static rendezvous over localhost) must reproduce the reference's losses exactly (fp32, same samples
  per step).
- `launch/train.sbatch` on a 2-node job acted out by tests/fake_slurm.py (srun starts both nodes' tasks
  with the variables SLURM sets; scontrol expands the nodelist): the same losses again.
- `deepspeed trainer/train.py --deepspeed ...` (LLaVA-style): the 2-process job of tests/test_heartbeat.py
  (one job for both, to keep the suite's time).
The bash part of launch/train.sh under a launcher (`deepspeed --no_python launch/train.sh`, `srun
launch/train.sh`) runs in the torchrun test's node 1 and in the sbatch test.
`launch/train.sh --num-gpus N -- ...` is what tests/test_train_e2e.py and most end-to-end tests run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.runtime import free_port
from tests.test_train_e2e import REPO, base_flags, run_env, train_records

STEPS = 2
VENV_BIN = Path(sys.executable).parent


def form_flags(shard_dir, lm_dir, out: Path) -> list[str]:
    """The shared tiny run: STEPS steps, no validation, the final checkpoint only."""
    return base_flags(shard_dir, lm_dir, out, **{"max-steps": STEPS, "val-max-samples": 0, "image-gap-every": 0})


def launcher(name: str) -> str:
    """The venv's console script (`deepspeed`, `torchrun`), as a user with the venv active types it."""
    path = VENV_BIN / name
    assert path.is_file(), f"{name} is not installed in {VENV_BIN}"
    return str(path)


def cpu_env(**extra) -> dict:
    env = {**run_env(), "DS_ACCELERATOR": "cpu", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)  # the launch scripts find the repo themselves
    return {**env, **extra}


def run(cmd: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def check_trained(out: Path, world_size: int, steps: int) -> list[float]:
    """The run's per-step losses, after checking it trained `steps` steps on `world_size` ranks."""
    start = train_records(out, "start")
    assert start and start[-1]["world_size"] == world_size, start
    recs = train_records(out)
    assert [r["step"] for r in recs] == list(range(1, steps + 1)), recs
    assert (out / "final" / "adapter_model.safetensors").is_file()
    return [r["loss"] for r in recs]


@pytest.fixture(scope="module")
def reference(shard_dir, tiny_lm_dir, tmp_path_factory) -> list[float]:
    """`deepspeed launch/train.sh <flags>` with 2 CPU processes: the losses every 2-rank form must match."""
    out = tmp_path_factory.mktemp("form-deepspeed") / "run"
    run([launcher("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.sh",
         *form_flags(shard_dir, tiny_lm_dir, out)], cpu_env())
    return check_trained(out, 2, STEPS)


@pytest.mark.slow
def test_deepspeed_runs_launch_train_sh_as_python(reference):
    assert len(reference) == STEPS and all(loss > 0 for loss in reference)


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost_reproduce_one_node(reference, shard_dir, tiny_lm_dir, tmp_path):
    """Node 0 types `torchrun ... launch/train.sh` (its Python part); node 1 adds --no-python, so its rank
    runs the bash part, which finds RANK/WORLD_SIZE set (as under `deepspeed --no_python`) and execs
    the trainer: both ways of being a rank in one job."""
    out, port = tmp_path / "run", free_port()
    nodes = [subprocess.Popen([launcher("torchrun"), *(["--no-python"] if r else []), "--nnodes", "2",
                               "--node-rank", str(r), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                               "--master-port", str(port), "launch/train.sh", *form_flags(shard_dir, tiny_lm_dir, out)],
                              cwd=REPO, env=cpu_env(PYTHON=sys.executable), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert check_trained(out, 2, STEPS) == pytest.approx(reference, abs=1e-6)


@pytest.mark.slow
def test_sbatch_on_two_nodes_reproduces_one_node(reference, shard_dir, tiny_lm_dir, tmp_path):
    """launch/train.sbatch's own code path (srun -> launch/train.sh -> trainer) on a fake 2-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO}/tests/fake_slurm.py" {tool} "$@"\n')
        (bin_dir / tool).chmod(0o755)
    port = free_port()
    while not 20000 <= port < 40000:  # train.sbatch takes the port from the job id: 20000 + id % 20000
        port = free_port()
    env = cpu_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable, STAGE2_REPO=str(REPO),
                  SLURM_JOB_ID=str(port - 20000), SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2",
                  SLURM_NTASKS_PER_NODE="1", SLURM_CPUS_PER_TASK="1", SLURM_JOB_NODELIST="127.0.0.[1-2]",
                  SLURM_NODELIST="127.0.0.[1-2]", SLURM_SUBMIT_DIR=str(REPO))
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    out = tmp_path / "run"
    proc = run(["bash", str(REPO / "launch" / "train.sbatch"), *form_flags(shard_dir, tiny_lm_dir, out)], env)
    assert f"2 node(s), 2 task(s), master 127.0.0.1:{port}" in proc.stdout, proc.stdout[-2000:]
    assert check_trained(out, 2, STEPS) == pytest.approx(reference, abs=1e-6)


def test_launcher_options_inside_a_launcher_are_refused():
    """As `deepspeed [--no_python] launch/train.sh --num-gpus 2 -- ...` would start a rank (--local_rank first)."""
    env = cpu_env(RANK="0", WORLD_SIZE="2", PYTHON=sys.executable)
    for cmd in (["bash", "launch/train.sh", "--local_rank=0", "--num-gpus", "2", "--", "--max-steps", "1"],
                [sys.executable, "launch/train.sh", "--local_rank=0", "--num-gpus", "2", "--", "--max-steps", "1"]):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "--num-gpus has no effect inside a launcher" in proc.stderr, proc.stderr

