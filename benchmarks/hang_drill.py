"""Hang drill: SIGSTOP one rank of a running job; the job must stop, naming it, within the hang timeout.

    python -m benchmarks.hang_drill --shape 7b --gpus 4 --hang-timeout 60 --workdir /tmp/hang --out hang.json
    python -m benchmarks.hang_drill --shape tiny --gpus 2 --hang-timeout 10          # CPU smoke run

Starts `launch/train.sh --num-gpus N -- <flags> --hang-timeout T` (the real trainer; inputs and flags as
benchmarks/scaling.py makes them), waits until `--stop-after-step` steps are logged, SIGSTOPs the last
rank and times how long the whole job takes to exit. Reported (JSON `--out`): the exit code, the seconds
from SIGSTOP to exit and the stated bound (T + T/10 for the heartbeat period + `--teardown-s`), the
HANG line of the log, and whether it names the stopped rank, its host and pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import psutil

from benchmarks.multigpu.config import ScalingConfig
from benchmarks.multigpu.inputs import gpu_count, prepare_inputs
from benchmarks.multigpu.report import environment
from benchmarks.multigpu.runs import subprocess_env, train_flags
from common.config import parse_config, print_config
from common.io import atomic_write_json, read_jsonl
from common.log import setup_logging

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class HangDrillConfig:
    """SIGSTOP the last rank of an N-GPU training job; time the job's stop and check the HANG message."""

    gpus: int = field(default=2, metadata={"help": "GPUs (processes on CPU) of the job"})
    hang_timeout: float = field(default=60, metadata={"help": "the trainer's --hang-timeout (seconds)"})
    stop_after_step: int = field(default=3, metadata={"help": "SIGSTOP once this many steps are logged"})
    teardown_s: float = field(default=15, metadata={"help": "allowance for the launcher to end the other ranks"})
    shape: Literal["tiny", "7b"] = field(default="tiny", metadata={"help": "models: tiny, or the Mistral-7B shape (random weights)"})
    workdir: str = field(default="runs/hang_drill", metadata={"help": "data, models, the run and its log"})
    out: str = field(default="", metadata={"help": "JSON result file ('' = <workdir>/hang_drill.json)"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch per GPU"})
    train_args: str = field(default="", metadata={"help": "extra trainer flags"})
    start_timeout_s: int = field(default=1200, metadata={"help": "give up when the steps are not logged by then"})


def rank_pid(launcher_pid: int, rank: int) -> Optional[int]:
    """The pid of the trainer process started with --local_rank=<rank> under the launcher."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if f"--local_rank={rank}" in child.cmdline():
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None


def run(cfg: HangDrillConfig) -> dict:
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cuda = gpu_count() > 0
    steps = cfg.stop_after_step + 1000  # never reached: the job is stopped first
    scfg = ScalingConfig(shape=cfg.shape, gpus=[cfg.gpus], workdir=str(work), max_steps=steps, warmup_steps=0,
                         log_steps=1, batch_size=cfg.batch_size, train_args=cfg.train_args, check_coverage=False,
                         num_cases=max(4, cfg.gpus * cfg.batch_size * 8 // 20))
    inputs = prepare_inputs(scfg, work)
    run_dir = work / "run"
    flags = train_flags(scfg, inputs, 1, run_dir) + ["--hang-timeout", str(cfg.hang_timeout)]
    cmd = [str(REPO_ROOT / "launch" / "train.sh"), "--num-gpus", str(cfg.gpus), "--", *flags]
    log_file = work / "hang_drill.log"
    victim_rank = cfg.gpus - 1
    result: dict = {"config": asdict(cfg), "environment": environment(), "command": cmd, "log_file": str(log_file),
                    "stopped_rank": victim_rank, "bound_s": cfg.hang_timeout * 1.1 + cfg.teardown_s}
    train_log = run_dir / "train_log.jsonl"
    with open(log_file, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(cuda), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + cfg.start_timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            done = [r for r in read_jsonl(train_log) if r.get("kind") == "train"] if train_log.is_file() else []
            if len(done) >= cfg.stop_after_step:
                break
            time.sleep(1)
        victim = rank_pid(proc.pid, victim_rank) if proc.poll() is None else None
        if victim is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {**result, "ok": False, "error": f"the job did not reach step {cfg.stop_after_step} (see {log_file})"}
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            code = proc.wait(timeout=cfg.hang_timeout * 3 + 120)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - stopped_at
        for kill in (lambda: os.kill(victim, signal.SIGKILL), lambda: os.killpg(proc.pid, signal.SIGKILL)):
            try:
                kill()
            except ProcessLookupError:
                pass
    hang = [line[line.find("[rank"):] for line in log_file.read_text(errors="replace").splitlines() if "HANG:" in line]
    names = bool(hang) and f"rank {victim_rank} (host {socket.gethostname()} pid {victim})" in hang[0]
    result.update(exit_code=code, stop_s=round(took, 1), hang_line=hang[0] if hang else None, names_rank_host_pid=names,
                  ok=code not in (None, 0) and took <= result["bound_s"] and names)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(HangDrillConfig, argv)
    setup_logging("benchmarks", rank=0)
    print_config(cfg)
    result = run(cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.workdir) / "hang_drill.json"
    atomic_write_json(out, result)
    print(f"[hang_drill] stopped rank {result['stopped_rank']}: job exit code {result.get('exit_code')} after "
          f"{result.get('stop_s')} s (bound {result['bound_s']:.0f} s); {result.get('hang_line')}\n"
          f"[hang_drill] ok: {result['ok']}; wrote {out}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
