"""Multi-node for real on one host: 1 node x N GPUs against 2 launcher "nodes" x N/2 GPUs.

    python -m benchmarks.multinode_local --shape 7b --gpus 4 --max-steps 30 --workdir /tmp/mn --out mn.json
    python -m benchmarks.multinode_local --shape tiny --gpus 2 --max-steps 3 --warmup-steps 1   # CPU smoke run

Every run trains the real trainer with the same flags (shards, seed, `--max-steps`, per-GPU batch,
world size N: the same samples in every step), logging every step:
- `1x{N}`: `deepspeed --num_gpus N launch/train.sh <flags>` (one launcher, the design's form);
- `2x{N/2}-torchrun`: two `torchrun --nnodes 2 --node-rank r --nproc-per-node N/2 --master-addr
  127.0.0.1 --master-port P launch/train.sh <flags>`, node r on GPUs r*N/2 .. (r+1)*N/2-1
  (CUDA_VISIBLE_DEVICES), static rendezvous over localhost;
- `2x{N/2}-deepspeed`: two `deepspeed --hostfile H --no_ssh --node_rank r --master_addr 127.0.0.1
  --include node0:0..@node1:.. launch/train.sh <flags>` (H lists two node names; no ssh: each
  launcher starts its own node's ranks, as on a cluster without pdsh).
NCCL sees one host (it may pick shared memory/NVLink as across real nodes it would pick the network),
but the launch, rendezvous and rank layout are those of two nodes.

Reported (JSON `--out`, Markdown on stdout): per run the per-step losses and real tokens, steady-state
tokens/s (steps after `--warmup-steps`, as benchmarks/scaling.py computes it), wall time; per 2-node
run against 1xN: max and mean |loss difference| over the steps (bf16: noise of ~1e-2 expected, fp32 on
CPU: 0), whether every step saw the same real tokens (same samples), and the tokens/s ratio.
Inputs (synthetic shards, random model of --shape) come from benchmarks/multigpu/inputs.py's prepare_inputs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from benchmarks.multigpu.config import ScalingConfig
from benchmarks.multigpu.inputs import gpu_count, prepare_inputs
from benchmarks.multigpu.metrics import throughput
from benchmarks.multigpu.report import environment
from benchmarks.multigpu.runs import subprocess_env, train_flags
from common.config import parse_config, print_config
from common.io import atomic_write_json, atomic_write_text, read_jsonl
from common.log import setup_logging
from common.runtime import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("torchrun", "deepspeed")


@dataclass
class MultinodeConfig:
    """1 node x N GPUs vs 2 launcher nodes x N/2 GPUs on one host: same steps and samples; losses and tokens/s."""

    gpus: int = field(default=2, metadata={"help": "N: GPUs in all (processes on CPU); even, split 2 x N/2"})
    launchers: list[str] = field(default_factory=lambda: list(LAUNCHERS), metadata={"help": "2-node runs to do: torchrun and/or deepspeed"})
    shape: Literal["tiny", "7b"] = field(default="tiny", metadata={"help": "models: tiny test models, or the Mistral-7B shape (random weights)"})
    workdir: str = field(default="runs/multinode", metadata={"help": "data, models, runs and logs go here (runs are overwritten)"})
    out: str = field(default="", metadata={"help": "JSON result file ('' = <workdir>/multinode.json)"})
    max_steps: int = field(default=30, metadata={"help": "optimizer steps per run"})
    warmup_steps: int = field(default=10, metadata={"help": "first steps left out of the throughput"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch per GPU"})
    max_seq_len: int = field(default=256, metadata={"help": "the trainer's --max-seq-len"})
    num_workers: int = field(default=2, metadata={"help": "data-loader workers per GPU"})
    seed: int = field(default=1, metadata={"help": "the trainer's --seed"})
    train_args: str = field(default="", metadata={"help": "extra trainer flags for every run"})
    shard_dir: str = field(default="", metadata={"help": "existing shard directory ('' = synthetic)"})
    model_path: str = field(default="", metadata={"help": "existing LM directory ('' = random of --shape)"})
    run_timeout_s: int = field(default=1800, metadata={"help": "a run taking longer is killed and reported as failed"})

    def validate(self) -> None:
        if self.gpus < 2 or self.gpus % 2:
            raise ValueError(f"--gpus must be even and >= 2 (got {self.gpus})")
        if not self.launchers or any(name not in LAUNCHERS for name in self.launchers):
            raise ValueError(f"--launchers: choose from {', '.join(LAUNCHERS)} (got {self.launchers})")
        if self.max_steps < 1 or not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"need --max-steps >= 1 and 0 <= --warmup-steps < --max-steps "
                             f"(got {self.max_steps}, {self.warmup_steps})")

    def scaling(self) -> ScalingConfig:
        """The same inputs and flags as benchmarks/scaling.py would use for one run on N GPUs."""
        return ScalingConfig(shape=self.shape, gpus=[self.gpus], workdir=self.workdir, max_steps=self.max_steps,
                             warmup_steps=self.warmup_steps, log_steps=1, batch_size=self.batch_size,
                             max_seq_len=self.max_seq_len, num_workers=self.num_workers, seed=self.seed,
                             train_args=self.train_args, shard_dir=self.shard_dir, model_path=self.model_path,
                             check_coverage=False)


def node_commands(launcher: str, n: int, port: int, flags: list[str], work: Path) -> list[list[str]]:
    """The two nodes' launcher commands (module form of the `deepspeed` / `torchrun` scripts)."""
    half = n // 2
    if launcher == "torchrun":
        return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                 "--nproc-per-node", str(half), "--master-addr", "127.0.0.1", "--master-port", str(port),
                 "launch/train.sh", *flags] for r in (0, 1)]
    hostfile = work / "hostfile"
    hostfile.write_text(f"node0 slots={n}\nnode1 slots={n}\n")  # slots: the GPU ids --include may name
    include = "@".join(f"node{r}:" + ",".join(str(g) for g in range(r * half, (r + 1) * half)) for r in (0, 1))
    return [[sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
             "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", str(port), "--include", include,
             "launch/train.sh", *flags] for r in (0, 1)]


def run_nodes(name: str, cmds: list[list[str]], envs: list[dict], work: Path, timeout_s: int) -> dict:
    """Start every node's command at once, wait for all; a failing node ends the others."""
    logs = [work / f"{name}-node{r}.log" for r in range(len(cmds))]
    start = time.perf_counter()
    procs = []
    for cmd, env, log_file in zip(cmds, envs, logs):
        with open(log_file, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = start + timeout_s
    while time.perf_counter() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    print(f"[multinode] {name}: exit codes {codes}, {wall:.1f} s", flush=True)
    return {"commands": [shlex.join(c) for c in cmds], "exit_codes": codes, "ok": all(c == 0 for c in codes),
            "wall_s": round(wall, 2), "logs": [str(x) for x in logs],
            "log_tail": "" if all(c == 0 for c in codes) else
            "\n".join("\n".join(x.read_text(errors="replace").splitlines()[-30:]) for x in logs)}


def collect(entry: dict, run_dir: Path, n: int, warmup_steps: int) -> dict:
    log = run_dir / "train_log.jsonl"
    records = read_jsonl(log) if log.is_file() else []
    train = [r for r in records if r.get("kind") == "train"]
    start = next((r for r in records if r.get("kind") == "start"), {})
    return {**entry, "world_size": start.get("world_size"),
            "steps": [{k: r.get(k) for k in ("step", "loss", "real_tokens", "tokens_per_s")} for r in train],
            "throughput": throughput(train, warmup_steps, n) if train else {}}


def compare(run: dict, ref: dict) -> dict:
    """Loss and data agreement of a 2-node run with the 1-node run, step by step, and the speed ratio."""
    mine, theirs = {s["step"]: s for s in run["steps"]}, {s["step"]: s for s in ref["steps"]}
    common = sorted(set(mine) & set(theirs))
    diffs = [abs(mine[s]["loss"] - theirs[s]["loss"]) for s in common]
    tps, ref_tps = run["throughput"].get("tokens_per_s"), ref["throughput"].get("tokens_per_s")
    return {"compared_steps": len(common),
            "same_samples_every_step": bool(common) and all(mine[s]["real_tokens"] == theirs[s]["real_tokens"] for s in common),
            "max_abs_loss_diff": max(diffs, default=None),
            "mean_abs_loss_diff": sum(diffs) / len(diffs) if diffs else None,
            "tokens_per_s_ratio": tps / ref_tps if tps and ref_tps else None}


def markdown(result: dict) -> str:
    n = result["config"]["gpus"]
    lines = [f"## 1 node x {n} vs 2 nodes x {n // 2} on one host ({result['config']['shape']}, "
             f"{result['config']['max_steps']} steps)", "",
             "| run | ok | world | tokens/s | ms/step | vs 1 node: tokens/s | max abs loss diff | mean abs loss diff | same samples |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        c, t = r.get("vs_one_node", {}), r.get("throughput", {})
        fmt = (lambda v, spec: "–" if v is None else format(v, spec))
        lines.append(f"| {name} | {r['ok']} | {r.get('world_size')} | {fmt(t.get('tokens_per_s'), ',.0f')} | "
                     f"{fmt(t.get('ms_per_step'), '.1f')} | {fmt(c.get('tokens_per_s_ratio'), '.3f')} | "
                     f"{fmt(c.get('max_abs_loss_diff'), '.2e')} | {fmt(c.get('mean_abs_loss_diff'), '.2e')} | "
                     f"{c.get('same_samples_every_step', '–')} |")
    return "\n".join(lines) + "\n"


def run(cfg: MultinodeConfig) -> dict:
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cuda_count = gpu_count()
    if cuda_count and cfg.gpus > cuda_count:
        raise ValueError(f"--gpus {cfg.gpus}: this machine has {cuda_count} GPUs")
    scfg = cfg.scaling()
    inputs = prepare_inputs(scfg, work)
    env = subprocess_env(cuda_count > 0)
    if not cuda_count:
        env["DS_ACCELERATOR"] = "cpu"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    n, half = cfg.gpus, cfg.gpus // 2
    runs: dict[str, dict] = {}

    def flags_for(name: str) -> tuple[list[str], Path]:
        run_dir = work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        return train_flags(scfg, inputs, 1, run_dir), run_dir

    name = f"1x{n}"
    flags, run_dir = flags_for(name)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", str(free_port()),
           "launch/train.sh", *flags]
    runs[name] = collect(run_nodes(name, [cmd], [env], work, cfg.run_timeout_s), run_dir, n, cfg.warmup_steps)
    for launcher in cfg.launchers:
        name = f"2x{half}-{launcher}"
        flags, run_dir = flags_for(name)
        cmds = node_commands(launcher, n, free_port(), flags, work)
        envs = [dict(env) for _ in cmds]
        if cuda_count and launcher == "torchrun":  # DeepSpeed's --include does this for its nodes
            for r, e in enumerate(envs):
                e["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(r * half, (r + 1) * half))
        runs[name] = collect(run_nodes(name, cmds, envs, work, cfg.run_timeout_s), run_dir, n, cfg.warmup_steps)
    ref = runs[f"1x{n}"]
    for name, r in runs.items():
        if name != f"1x{n}" and r["steps"] and ref["steps"]:
            r["vs_one_node"] = compare(r, ref)
    result = {"config": asdict(cfg), "environment": environment(), "inputs": asdict(inputs), "runs": runs}
    out = Path(cfg.out) if cfg.out else work / "multinode.json"
    report = markdown(result)
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), report)
    print(report)
    print(f"[multinode] wrote {out} and {out.with_suffix('.md')}", flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(MultinodeConfig, argv)
    setup_logging("benchmarks", rank=0)
    print_config(cfg)
    result = run(cfg)
    return 0 if all(r["ok"] and r["steps"] for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
