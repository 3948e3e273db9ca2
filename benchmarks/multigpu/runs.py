"""Training runs of the real trainer: `launch/train.sh --num-gpus N` with the run's flags, its log,
and the fault drill (one rank killed mid-run, then `--resume`)."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.multigpu.config import ScalingConfig, engine_flags
from benchmarks.multigpu.inputs import Inputs
from common.io import read_jsonl
from data_prep.manifest import load_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO_ROOT / "launch" / "train.sh"


def subprocess_env(cuda: bool) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not cuda:
        env.setdefault("OMP_NUM_THREADS", "1")  # N processes share the cores
    return env


def train_flags(cfg: ScalingConfig, inputs: Inputs, grad_accum: int, out_dir: Path, engine: str = "") -> list[str]:
    """The trainer flags of one run: identical for every N except the gradient accumulation (and
    for every engine except `--engine`, `--deepspeed`: an --engines entry)."""
    s1 = load_manifest(inputs.shard_dir).stage1
    samples_per_epoch = load_manifest(inputs.shard_dir).num_samples("train")
    steps_per_epoch = max(1, samples_per_epoch // cfg.largest_global_batch)
    flags = ["--shard-dir", inputs.shard_dir, "--model-path", inputs.model_path, "--output-dir", str(out_dir),
             "--batch-size", cfg.batch_size, "--gradient-accumulation-steps", grad_accum,
             "--max-steps", cfg.max_steps, "--num-epochs", math.ceil(cfg.max_steps / steps_per_epoch) + 1,
             "--max-seq-len", cfg.max_seq_len, "--num-workers", cfg.num_workers, "--seed", cfg.seed,
             "--log-steps", cfg.log_steps, "--save-steps", 0, "--sample-log-steps", 0, "--val-max-samples", 0,
             "--image-size", s1.image_size, "--stage1-trainable-blocks", s1.trainable_blocks,
             "--latent-pooling", s1.pooling, "--gif-frame", s1.frame]
    encoder = inputs.stage1_encoder_ckpt or (inputs.stage1[0] if s1.trainable_blocks > 0 else "")
    if encoder:
        flags += ["--stage1-encoder-ckpt", encoder]
    if engine:
        flags += engine_flags(engine)
    return [str(f) for f in flags] + shlex.split(cfg.train_args)


@dataclass
class RunResult:
    num_gpus: int
    grad_accum: int
    command: str
    wall_s: float
    ok: bool
    log_file: str
    error: str = ""
    records: list[dict] = field(default_factory=list)  # kind == "train", one per step
    epochs: list[dict] = field(default_factory=list)  # kind == "epoch": the run's exactly-once digests
    start: dict = field(default_factory=dict)  # the trainer's "start" record


def run_command(cmd: list[str], env: dict, log_file: Path, timeout_s: int) -> tuple[int, float, str]:
    """Run with output to log_file; (exit code, wall seconds, last lines of the log)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher's whole process group (its ranks included)
            proc.wait()
            code = -9
    wall = time.perf_counter() - start
    tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
    return code, wall, tail


def run_name(n: int, repeat: int = 0, engine: str = "") -> str:
    """train-gpus<N>[-<engine>][-r<repeat>]: no engine part for a single-engine call (the older names)."""
    tag = "".join(c if c.isalnum() else "_" for c in engine)
    return f"train-gpus{n}" + (f"-{tag}" if tag else "") + (f"-r{repeat}" if repeat else "")


def run_training(cfg: ScalingConfig, inputs: Inputs, n: int, grad_accum: int, work: Path, cuda: bool,
                 repeat: int = 0, engine: str = "") -> RunResult:
    name = run_name(n, repeat, engine if len(cfg.engines) > 1 else "")
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)  # train_log.jsonl is appended to: start clean
    cmd = [str(TRAIN_SH), "--num-gpus", str(n), "--", *train_flags(cfg, inputs, grad_accum, run_dir,
                                                                    engine or cfg.engines[0])]
    log_file = work / f"{name}.log"
    print(f"[scaling] training on {n} GPU(s){'' if cuda else ' (CPU processes)'}, engine {engine or cfg.engines[0]}: "
          f"batch {cfg.batch_size} x accumulation {grad_accum} x {n} = {cfg.batch_size * grad_accum * n} examples/step, "
          f"{cfg.max_steps} steps; log {log_file}", flush=True)
    code, wall, tail = run_command(cmd, subprocess_env(cuda), log_file, cfg.run_timeout_s)
    result = RunResult(n, grad_accum, shlex.join(cmd), round(wall, 2), code == 0, str(log_file))
    records = read_jsonl(run_dir / "train_log.jsonl") if (run_dir / "train_log.jsonl").is_file() else []
    result.records = [r for r in records if r.get("kind") == "train"]
    result.epochs = [r for r in records if r.get("kind") == "epoch"]
    result.start = next((r for r in records if r.get("kind") == "start"), {})
    if code != 0:
        result.error = f"exit code {code}; last lines of {log_file}:\n{tail}"
        print(f"[scaling] run on {n} GPU(s) FAILED ({result.error})", flush=True)
    else:
        print(f"[scaling] run on {n} GPU(s) done in {wall:.1f} s", flush=True)
    return result


def _rank_pids(session_id: int) -> dict[int, int]:
    """{RANK: pid} of the trainer processes of the launcher whose session is `session_id`.

    A rank process has RANK in its environment and its parent (the DeepSpeed launcher) has not;
    its data-loader workers are forked from it and inherit RANK, so their parent has it too.
    """
    procs: dict[int, tuple[int, dict]] = {}  # pid -> (parent pid, environment)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) != session_id:
                continue
            parent = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        procs[int(d.name)] = (parent, env)
    return {int(env[b"RANK"]): pid for pid, (parent, env) in procs.items()
            if b"RANK" in env and b"LOCAL_RANK" in env and b"RANK" not in procs.get(parent, (0, {}))[1]}


def fault_drill(cfg: ScalingConfig, inputs: Inputs, n: int, grad_accum: int, work: Path, cuda: bool,
                reference: RunResult) -> dict:
    """Kill the last rank right after the mid-run checkpoint; the job must stop, `--resume` must continue.

    1. The run of `reference` (same flags) again, with a resume checkpoint at step max_steps // 2.
    2. As soon as that checkpoint is committed (`resume/latest`), SIGKILL rank n-1 (a preempted or crashed
       GPU process): every other process must be gone within `--fault-stop-timeout-s` (the DeepSpeed launcher
       tears the job down; collectives also time out after the trainer's `--dist-timeout-s`).
    3. The same command with `--resume`: it must start at the checkpoint's step and train every later step on
       the same examples as the uninterrupted run (equal real-token counts per step: the data position) with
       the same losses (within bf16 noise on GPU).
    """
    # At a log-window boundary, so the resumed run's first window covers the same steps as the reference's.
    save_at = max(1, cfg.max_steps // 2 // cfg.log_steps) * cfg.log_steps
    logged_after = sum(1 for st in range(save_at + 1, cfg.max_steps + 1) if st % cfg.log_steps == 0 or st == cfg.max_steps)
    run_dir = work / f"fault-gpus{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = train_flags(cfg, inputs, grad_accum, run_dir, cfg.engines[0])
    flags[flags.index("--save-steps") + 1] = str(save_at)
    cmd = [str(TRAIN_SH), "--num-gpus", str(n), "--", *flags]
    log_file = work / f"fault-gpus{n}.log"
    victim = n - 1
    print(f"[scaling] fault drill on {n} GPU(s): SIGKILL rank {victim} after the step-{save_at} checkpoint; log {log_file}",
          flush=True)
    result: dict = {"gpus": n, "save_at_step": save_at, "killed_rank": victim, "log_file": str(log_file)}
    latest = run_dir / "resume" / "latest"
    with open(log_file, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(cuda), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + cfg.run_timeout_s
        while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = _rank_pids(proc.pid)
        if proc.poll() is not None or victim not in pids:
            os.killpg(proc.pid, 9)
            proc.wait()
            return {**result, "ok": False, "error": f"no checkpoint/rank {victim} to kill (ranks seen: {sorted(pids)}, "
                                                    f"exit code {proc.returncode}); see {log_file}"}
        result["checkpoint"] = latest.read_text().strip()
        os.kill(pids[victim], 9)
        killed_at = time.monotonic()
        try:
            code = proc.wait(timeout=cfg.fault_stop_timeout_s)
            survivors = [pid for pid in pids.values() if Path(f"/proc/{pid}").exists()]
        except subprocess.TimeoutExpired:
            code, survivors = None, list(pids.values())
        result["stop_s"] = round(time.monotonic() - killed_at, 2)
        # Whatever is left of the job goes now, so it cannot hold the GPUs for the resume.
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
    tail = log_file.read_text(errors="replace").splitlines()
    result.update(exit_code=code, stopped_in_time=code is not None and not survivors, survivors=len(survivors),
                  stop_message=[line for line in tail if "exit" in line.lower() or "kill" in line.lower()][-3:])
    # Resume from the committed checkpoint.
    code, wall, rtail = run_command(cmd + ["--resume"], subprocess_env(cuda), work / f"fault-gpus{n}-resume.log",
                                    cfg.run_timeout_s)
    records = read_jsonl(run_dir / "train_log.jsonl")
    starts = [r for r in records if r.get("kind") == "start"]
    resumed = [r for r in records[records.index(starts[-1]):] if r.get("kind") == "train"] if len(starts) > 1 else []
    ref = {r["step"]: r for r in reference.records}
    common = [r for r in resumed if r["step"] in ref]
    result.update(resume_exit_code=code, resume_wall_s=round(wall, 1),
                  resumed_at_step=starts[-1]["step"] if len(starts) > 1 else None,
                  resumed_steps=len(resumed), compared_steps=len(common),
                  same_data_position=bool(common) and all(r["real_tokens"] == ref[r["step"]]["real_tokens"] for r in common),
                  max_abs_loss_diff=max((abs(r["loss"] - ref[r["step"]]["loss"]) for r in common), default=None))
    result["ok"] = bool(result["stopped_in_time"] and code == 0 and result["resumed_at_step"] == save_at
                        and result["same_data_position"] and result["resumed_steps"] == logged_after)
    if code != 0:
        result["error"] = f"resume exit code {code}; last lines:\n{rtail}"
    print(f"[scaling] fault drill: stopped in {result['stop_s']} s (exit code {result['exit_code']}), resumed at step "
          f"{result['resumed_at_step']}, same data position: {result['same_data_position']}, max |loss diff| "
          f"{result['max_abs_loss_diff']}", flush=True)
    return result
