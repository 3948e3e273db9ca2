"""Multi-GPU scaling of the real trainer (and of the shard builder) on one host.

    python -m benchmarks.scaling --shape 7b --gpus 1 2 --builder-gpus 1 2 --workdir /tmp/scaling
    python -m benchmarks.scaling --shape 7b --gpus 1 2 4 --engines deepspeed torch ddp --repeats 2   # engines side by side
    python -m benchmarks.scaling --shape 7b --gpus 1 2 4 --weak --engines ddp                        # weak scaling
    python -m benchmarks.scaling --shape tiny --gpus 1 2 --max-steps 4 --warmup-steps 1   # CPU smoke run

Training scaling (`--gpus 1 2 ...`):
1. Inputs: a synthetic dataset (`data_prep.synthetic`) built into shards in this process
   (`data_prep.build_shards.build`) with random Stage1 models, and a random LM directory
   (`benchmarks.make_random_model`): `--shape 7b` = the Mistral-7B shape + ViT-B/16 MAE and
   EfficientNet-B0 at 224 px, `tiny` = the test models. `--shard-dir` / `--model-path` use existing
   ones instead.
2. For each N: `launch/train.sh --num-gpus N -- <trainer flags>`, i.e. the real `trainer.train`
   under the DeepSpeed launcher (on a machine without CUDA: DS_ACCELERATOR=cpu, N processes). Every
   run gets the same shards, seed and `--max-steps`, and the same GLOBAL batch (examples per
   optimizer step): the per-GPU micro-batch `--batch-size` is fixed and the gradient accumulation is
   global_batch / (batch_size x N). With `--weak` the accumulation is fixed too (the smallest N's), so
   the global batch grows with N (weak scaling: the same work per GPU per step). Each run logs every
   `--log-steps` steps; validation, sample generation and periodic checkpoints are off, so the steps
   measure training only. `--engines deepspeed torch ddp` (or `deepspeed:<ds config>`) measures
   each engine at each N, interleaved (repeat, N, engine), and reports them side by side.
3. From each run's `train_log.jsonl`, over the steady-state steps (`--warmup-steps` first steps left
   out): tokens/s = sum of real (non-padding) tokens / sum of step times, all ranks together, and
   per GPU; scaling efficiency = tokens/s(N) / (N x tokens/s(1)) (against the smallest N when 1 is
   not run). Loss agreement against the first N: max |loss_N - loss_ref| over the common steps and
   the mean |difference| over the last `--last-k` steps. The ranks read different contiguous parts
   of the epoch (trainer/data.py), so the same step sees other samples at another N: the curves
   agree statistically, not bit for bit; over a whole epoch every run sees the same samples.
   Where the time goes: the trainer logs every rank's ms per step by loop phase (`rank_ms_per_step`);
   the report tabulates them and splits the extra time per micro-batch of N GPUs over the smallest
   run into data wait, host issue, stragglers, sync/step and other (`slowdown_breakdown`).
   `--repeats R` runs the GPU counts R times in turn and pools them (host speed drifts between runs).
4. Sample coverage: (a) from the logs, the examples trained per run and the trainer's own `epoch`
   records (count + digest of the loss-weighted sample keys, checked against the manifest at each
   epoch's end; trainer/exactly_once.py); (b) the trainer's own data pipeline (`trainer.data.TrainStream`,
   with the run's exact flags) iterated over one whole epoch for every rank of every N: every train
   sample must come exactly once with loss weight > 0 (rank-padding duplicates carry weight 0).

Builder scaling (`--builder-gpus 1 2`): `python -m data_prep.build_shards` with N processes, each
`--num-nodes N --node-rank r` (and `CUDA_VISIBLE_DEVICES=r` on a GPU machine), into a fresh
directory per N, over `--builder-images` synthetic images of `--builder-image-px` pixels. Reported:
images/s of the building itself (all images / the slowest process's build time, from the builder's
per-node records: model loading excluded) and end to end (wall time of the whole command), the
ratios against the first N, and whether every layout wrote identical shards (the builder's promise).

On the GPU machine (device tool, `kind: nvidia-h100-x2`, `carry: [".whl"]`; see benchmarks/README.md for
the wheel kit), keeping the 15 GB random 7B model out of $OUT:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 \
      && python3 -m benchmarks.scaling --shape 7b --gpus 1 2 --builder-gpus 1 2 --max-steps 20 \
           --workdir /tmp/scaling --out $OUT/scaling.json; cp /tmp/scaling/*.log $OUT/

Expect about 1 minute to write the 7B model (bf16, initialised on the GPU), 1-2 minutes per training run
(7B load per rank, steps, final LoRA checkpoint) and under a minute per builder run.

Output: a Markdown report on stdout and in `<workdir>/scaling.md`, every number in
`<workdir>/scaling.json` (or `--out`), each run's log in `<workdir>/<run>/launcher.log`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from transformers import AutoTokenizer

from benchmarks.make_random_model import RandomModelConfig, stage1_shape_for, write_lm, write_stage1
from common.config import parse_config, print_config
from common.io import atomic_write_json, atomic_write_text, read_jsonl
from common.log import setup_logging
from data_prep.build_shards import BUILD_DIR, BuildConfig, build
from data_prep.manifest import load_manifest
from data_prep.synthetic import generate
from models.stage1 import load_stage1_encoder
from trainer.config import parse_train_config
from trainer.data import TrainStream
from trainer.schedules import build_phases

log = logging.getLogger("benchmarks.scaling")

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO_ROOT / "launch" / "train.sh"
TRAIN_FRACTION = 0.85  # the builder puts ~10% of the cases in val (by case-id hash): plan with margin


@dataclass
class ScalingConfig:
    """Multi-GPU scaling of trainer.train (and data_prep.build_shards) on one host."""

    shape: Literal["tiny", "7b"] = field(default="tiny", metadata={"help": "models: tiny test models, or the Mistral-7B shape + ViT-B/EfficientNet-B0 (random weights)"})
    gpus: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "training runs: one per GPU count (processes on CPU); empty list = no training runs"})
    builder_gpus: list[int] = field(default_factory=list, metadata={"help": "shard-builder runs: one per process count (one GPU each); none by default"})
    workdir: str = field(default="runs/scaling", metadata={"help": "data, models, runs and the report go here (runs are overwritten)"})
    out: str = field(default="", metadata={"help": "JSON result file ('' = <workdir>/scaling.json)"})
    # What every training run gets
    max_steps: int = field(default=30, metadata={"help": "optimizer steps per run"})
    warmup_steps: int = field(default=5, metadata={"help": "first steps left out of the throughput (start-up, allocator, first batches)"})
    last_k: int = field(default=10, metadata={"help": "loss agreement: mean |difference| over the last k common log records"})
    log_steps: int = field(default=10, metadata={"help": "the trainer's --log-steps (its default): a record, and a host sync, every this many steps; keep --warmup-steps a multiple of it"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch per GPU (the trainer's --batch-size)"})
    global_batch: int = field(default=0, metadata={"help": "examples per optimizer step, equal for every N (0 = batch_size x max(gpus))"})
    max_seq_len: int = field(default=256, metadata={"help": "the trainer's --max-seq-len"})
    num_workers: int = field(default=2, metadata={"help": "data-loader workers per GPU (the trainer's --num-workers)"})
    seed: int = field(default=1, metadata={"help": "the trainer's --seed (same for every run)"})
    train_args: str = field(default="", metadata={"help": "extra trainer flags for every run, e.g. '--attn-implementation flex --lora-r 16'"})
    run_timeout_s: int = field(default=3600, metadata={"help": "a run taking longer is killed and reported as failed"})
    fault_drill: bool = field(default=False, metadata={"help": "after the runs: on the largest N, SIGKILL one rank right after a mid-run resume checkpoint, time the job's stop, then --resume and compare every later step with the uninterrupted run"})
    fault_stop_timeout_s: int = field(default=300, metadata={"help": "fault drill: the stopped job must have exited within this many seconds of the kill"})
    repeats: int = field(default=1, metadata={"help": "run the --gpus sequence this many times in turn (1 2 1 2 ...): throughput and efficiency are pooled over the repeats and also given per repeat, so machine drift hits every N alike"})
    engines: list[str] = field(default_factory=lambda: ["deepspeed"], metadata={"help": "trainer engines to measure, interleaved (for each repeat and N, one run per engine in turn) and reported side by side: deepspeed, torch, ddp, or deepspeed:<ds config JSON> (e.g. deepspeed:ds_configs/zero1.json)"})
    weak: bool = field(default=False, metadata={"help": "weak scaling: the micro-batch per GPU AND the accumulation stay those of the smallest N (from --global-batch, default accumulation 1), so the global batch grows with N; default: strong scaling (the same global batch for every N)"})
    check_coverage: bool = field(default=True, metadata={"help": "iterate the trainer's data pipeline over one epoch per rank and N to check exactly-once coverage"})
    # Inputs (generated when not given)
    shard_dir: str = field(default="", metadata={"help": "existing shard directory ('' = generate synthetic data and build shards)"})
    model_path: str = field(default="", metadata={"help": "existing LM directory ('' = write a random one of --shape)"})
    stage1_encoder_ckpt: str = field(default="", metadata={"help": "with --shard-dir: the encoder the shards were built with (needed when K > 0)"})
    num_cases: int = field(default=0, metadata={"help": "synthetic cases (20 images each) for training (0 = enough for --max-steps)"})
    image_px: int = field(default=64, metadata={"help": "side of the synthetic GIFs for the training shards"})
    # Builder runs
    builder_images: int = field(default=2000, metadata={"help": "images the builder runs build (rounded up to whole cases of 20)"})
    builder_image_px: int = field(default=256, metadata={"help": "side of the builder runs' GIFs (WeatherQA's are a few hundred px)"})
    builder_num_workers: int = field(default=4, metadata={"help": "image-decoding workers per builder process"})
    builder_batch_size: int = field(default=64, metadata={"help": "Stage1 batch of the builder"})

    def validate(self) -> None:
        if not self.gpus and not self.builder_gpus:
            raise ValueError("nothing to run: give --gpus and/or --builder-gpus")
        for name in ("gpus", "builder_gpus"):
            if any(n < 1 for n in getattr(self, name)) or len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')}: distinct counts >= 1 expected, got {getattr(self, name)}")
        if self.max_steps < 1 or not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"need --max-steps >= 1 and 0 <= --warmup-steps < --max-steps (got {self.max_steps}, {self.warmup_steps})")
        if self.last_k < 1 or self.log_steps < 1:
            raise ValueError(f"--last-k and --log-steps must be >= 1 (got {self.last_k}, {self.log_steps})")
        if self.fault_drill and self.max_steps < 2 * self.log_steps:
            raise ValueError("--fault-drill: --max-steps must cover at least two log windows (2 x --log-steps)")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1 (got {self.repeats})")
        if self.batch_size < 1 or self.global_batch < 0:
            raise ValueError("--batch-size must be >= 1 and --global-batch >= 0")
        if self.gpus:
            grad_accum_steps(self)  # raises naming the N that does not divide
        if not self.engines:
            raise ValueError("--engines: give at least one engine")
        for spec in self.engines:
            engine_flags(spec)  # raises naming a bad entry
        if len(set(self.engines)) != len(self.engines):
            raise ValueError(f"--engines: each entry once (got {self.engines})")
        if self.shard_dir and not Path(self.shard_dir, "manifest.json").is_file():
            raise ValueError(f"--shard-dir {self.shard_dir}: no manifest.json (build it with python -m data_prep.build_shards)")
        if self.model_path and not Path(self.model_path, "config.json").is_file():
            raise ValueError(f"--model-path {self.model_path}: no config.json (not a Hugging Face model directory)")

    @property
    def effective_global_batch(self) -> int:
        """Strong scaling: every run's examples per optimizer step. Weak: the smallest N's."""
        if self.weak:
            return self.global_batch or self.batch_size * min(self.gpus or [1])
        return self.global_batch or self.batch_size * max(self.gpus or [1])

    def global_batch_of(self, n: int) -> int:
        """Examples per optimizer step of the N-GPU run."""
        return self.batch_size * grad_accum_steps(self)[n] * n

    @property
    def largest_global_batch(self) -> int:
        return max((self.global_batch_of(n) for n in self.gpus), default=self.effective_global_batch)


ENGINES = ("deepspeed", "torch", "ddp")


def engine_flags(spec: str) -> list[str]:
    """The trainer flags of one --engines entry: `deepspeed`, `torch`, `ddp` or `deepspeed:<config JSON>`."""
    kind, _, ds_config = spec.partition(":")
    if kind not in ENGINES or (ds_config and kind != "deepspeed") or (":" in spec and not ds_config):
        raise ValueError(f"--engines: {spec!r} is not one of {', '.join(ENGINES)} or deepspeed:<ds config JSON>")
    return ["--engine", kind] + (["--deepspeed", ds_config] if ds_config else [])


def grad_accum_steps(cfg: ScalingConfig) -> dict[int, int]:
    """Gradient accumulation per N. Strong scaling: batch_size x accumulation x N == the global batch
    for every N. Weak: the smallest N's accumulation for every N (the global batch grows with N)."""
    g = cfg.effective_global_batch
    if cfg.weak and cfg.gpus:
        base = min(cfg.gpus)
        if g % (cfg.batch_size * base):
            raise ValueError(f"--global-batch {g} is not a multiple of --batch-size {cfg.batch_size} x {base} GPUs")
        return {n: g // (cfg.batch_size * base) for n in cfg.gpus}
    out = {}
    for n in cfg.gpus:
        per_step = cfg.batch_size * n
        if g % per_step:
            raise ValueError(f"--global-batch {g} is not a multiple of --batch-size {cfg.batch_size} x {n} GPUs; "
                             f"use a multiple of {math.lcm(*(cfg.batch_size * m for m in cfg.gpus))}")
        out[n] = g // per_step
    return out


# ----------------------------------------------------------------------------------------------
# Inputs: data, shards, models
# ----------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    shard_dir: str
    model_path: str
    stage1_encoder_ckpt: str = ""
    gemini_json: list[str] = field(default_factory=list)
    stage1: tuple[str, str] = ("", "")


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _stage1(cfg: ScalingConfig, work: Path) -> tuple[str, str]:
    shape = stage1_shape_for(cfg.shape)
    folder = work / f"stage1-{shape}"
    enc, cls = write_stage1(folder, shape, seed=0)
    return str(enc), str(cls)


def synthetic_data(out: Path, num_images: int, image_px: int, seed: int = 0) -> list[str]:
    """A synthetic WeatherQA-like dataset of about num_images images; returns its JSON paths."""
    num_cases = max(2, math.ceil(num_images / 20))
    return [str(p) for p in generate(out, num_cases=num_cases, num_files=2, seed=seed, image_px=image_px)]


def build_shards_inprocess(json_paths: Sequence[str], image_root: Path, stage1: tuple[str, str], image_size: int,
                           out: Path, samples_per_shard: int, num_workers: int) -> None:
    build(BuildConfig(gemini_json=list(json_paths), image_root=str(image_root), stage1_encoder_ckpt=stage1[0],
                      stage1_classifier_ckpt=stage1[1], image_size=image_size, out=str(out),
                      samples_per_shard=samples_per_shard, num_workers=num_workers))


def training_samples_needed(cfg: ScalingConfig) -> int:
    """Train samples for one epoch that outlasts --max-steps at the global batch (with margin for
    the val split and the ranks' partial last batches)."""
    return math.ceil(cfg.largest_global_batch * (cfg.max_steps + 2) / TRAIN_FRACTION * 1.1)


def prepare_inputs(cfg: ScalingConfig, work: Path) -> Inputs:
    """Shards and model directory for the training runs: the given ones, or generated ones."""
    inputs = Inputs(shard_dir=cfg.shard_dir, model_path=cfg.model_path, stage1_encoder_ckpt=cfg.stage1_encoder_ckpt)
    if not cfg.shard_dir:
        data_dir = work / "train-data"
        num_images = 20 * cfg.num_cases if cfg.num_cases else training_samples_needed(cfg)
        log.info("generating ~%d synthetic images for training into %s", num_images, data_dir)
        inputs.gemini_json = synthetic_data(data_dir, num_images, cfg.image_px)
        inputs.stage1 = _stage1(cfg, work)

        image_size = load_stage1_encoder(inputs.stage1[0]).config.image_size
        shard_dir = work / "train-shards"
        shutil.rmtree(shard_dir, ignore_errors=True)
        build_shards_inprocess(inputs.gemini_json, data_dir, inputs.stage1, image_size, shard_dir,
                               samples_per_shard=128, num_workers=min(4, os.cpu_count() or 1) if _cuda_count() else 0)
        inputs.shard_dir = str(shard_dir)
    if not cfg.model_path:
        model_dir = work / f"lm-{cfg.shape}"
        # Files are moved in sorted order once complete: tokenizer_config.json comes last.
        if (model_dir / "tokenizer_config.json").is_file() and cfg.shape == "7b":
            log.info("reusing the random 7B model in %s (delete it to rewrite)", model_dir)
        else:
            write_lm(RandomModelConfig(out=str(model_dir), shape=cfg.shape, gemini_json=inputs.gemini_json))
        inputs.model_path = str(model_dir)
    return inputs


# ----------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Fault drill: one rank killed mid-run, then --resume
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Metrics from the logs
# ----------------------------------------------------------------------------------------------

def step_seconds(rec: dict) -> float:
    """A log window's duration: the trainer logs real_tokens and tokens_per_s = real_tokens / seconds."""
    return rec["real_tokens"] / rec["tokens_per_s"] if rec.get("tokens_per_s") else float("nan")


def steady_windows(records: Sequence[dict], warmup_steps: int) -> list[tuple[int, dict]]:
    """(steps in the window, record) for the log records whose window (the steps since the previous
    record) lies wholly after the warm-up, in step order."""
    out, prev = [], 0
    for r in sorted(records, key=lambda r: r["step"]):
        window, prev = r["step"] - prev, r["step"]
        if r["step"] - window >= warmup_steps:
            out.append((window, r))
    return out


def throughput(records: Sequence[dict], warmup_steps: int, num_gpus: int) -> dict:
    """Steady-state tokens/s (all ranks) and per GPU, over the steady log windows."""
    windows = steady_windows(records, warmup_steps)
    steady, steps = [r for _, r in windows], sum(w for w, _ in windows)
    if not steady:
        return {"steady_steps": 0}
    tokens = sum(r["real_tokens"] for r in steady)
    seconds = sum(step_seconds(r) for r in steady)
    tps = tokens / seconds
    return {"steady_steps": steps, "log_records": len(steady), "first_step": steady[0]["step"],
            "last_step": steady[-1]["step"], "real_tokens": tokens, "seconds": seconds, "tokens_per_s": tps,
            "tokens_per_s_per_gpu": tps / num_gpus, "ms_per_step": 1000 * seconds / steps,
            "tokens_per_step": tokens / steps}


def pooled_throughput(parts: Sequence[dict], num_gpus: int) -> dict:
    """Several runs' steady-state throughput as one: tokens and seconds summed."""
    parts = [p for p in parts if p.get("steady_steps")]
    if not parts:
        return {"steady_steps": 0}
    steps = sum(p["steady_steps"] for p in parts)
    tokens, seconds = sum(p["real_tokens"] for p in parts), sum(p["seconds"] for p in parts)
    return {"steady_steps": steps, "runs": len(parts), "real_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / num_gpus,
            "ms_per_step": 1000 * seconds / steps, "tokens_per_step": tokens / steps}


def timed_windows(runs: Sequence[Sequence[dict]], warmup_steps: int):
    """(steps in the window, its `rank_ms_per_step`) over the steady windows of every run that logged them."""
    for records in runs:
        for window, r in steady_windows(records, warmup_steps):
            if r.get("rank_ms_per_step"):
                yield window, r["rank_ms_per_step"]


def rank_times(runs: Sequence[Sequence[dict]], warmup_steps: int) -> dict[str, list[float]]:
    """Each rank's ms per optimizer step by loop phase (the trainer's `rank_ms_per_step`: data wait,
    forward + backward issue, engine step, other), step-weighted over the steady log windows of
    one or more runs (each a list of train records)."""
    sums: dict[str, list[float]] = {}
    steps = 0
    for window, times in timed_windows(runs, warmup_steps):
        steps += window
        for phase, per_rank in times.items():
            acc = sums.setdefault(phase, [0.0] * len(per_rank))
            for i, ms in enumerate(per_rank):
                acc[i] += ms * window
    return {phase: [v / steps for v in acc] for phase, acc in sums.items()} if steps else {}


def slowdown_breakdown(runs_n: Sequence[Sequence[dict]], accum_n: int, times_1: dict[str, list[float]],
                       accum_1: int, warmup_steps: int) -> dict[str, float]:
    """Where N GPUs lose time against 1, in ms per micro-batch, from the per-rank phase times.

    In every log window all ranks take the same wall time T, and for the rank that issued its
    forward + backward slowest (r*): T = data* + fwd_bwd_max + step* + other*. So, exactly,
    T_N - T_1 = data (r*'s wait for batches beyond 1 GPU's)
              + host issue (the ranks' mean fwd_bwd beyond 1 GPU's: slower hosts, contention)
              + stragglers (fwd_bwd_max - the mean: the others wait for the slowest rank)
              + sync/step (r*'s engine step beyond 1 GPU's: gradient collectives, optimizer, and
                waits for a rank that was slower at another step of the same window)
              + other.
    `times_1`: the 1-GPU run's rank_times (one rank)."""
    base = {p: v[0] / accum_1 for p, v in times_1.items()}
    acc = {"data": 0.0, "host_issue": 0.0, "stragglers": 0.0, "sync_step": 0.0, "other": 0.0, "total": 0.0}
    steps = 0
    for window, t in timed_windows(runs_n, warmup_steps):
        fb = [v / accum_n for v in t["fwd_bwd"]]
        slow = max(range(len(fb)), key=fb.__getitem__)
        mean_fb = sum(fb) / len(fb)
        parts = {"data": t["data"][slow] / accum_n - base["data"], "host_issue": mean_fb - base["fwd_bwd"],
                 "stragglers": fb[slow] - mean_fb, "sync_step": t["step"][slow] / accum_n - base["step"],
                 "other": t["other"][slow] / accum_n - base["other"]}
        parts["total"] = sum(parts.values())
        for k, v in parts.items():
            acc[k] += v * window
        steps += window
    if not steps:
        return {}
    out = {k: v / steps for k, v in acc.items()}
    out["ms_per_micro_batch_1"] = sum(base.values())
    return out


def scaling_efficiency(results: dict[int, dict]) -> dict[int, float]:
    """tokens/s(N) / (N x tokens/s(1)), against the smallest N run when 1 is missing."""
    ok = {n: r["tokens_per_s"] for n, r in results.items() if r.get("tokens_per_s")}
    if not ok:
        return {}
    base = min(ok)
    return {n: (tps / n) / (ok[base] / base) for n, tps in ok.items()}


def loss_agreement(runs: dict[int, Sequence[dict]], last_k: int) -> dict:
    """|loss_N - loss_ref| at equal steps for every N against the first run."""
    if len(runs) < 2:
        return {}
    ref_n = next(iter(runs))
    ref = {r["step"]: r["loss"] for r in runs[ref_n]}
    out = {"reference_gpus": ref_n, "per_gpus": {}}
    for n, records in list(runs.items())[1:]:
        steps = sorted(set(ref) & {r["step"] for r in records})
        if not steps:
            continue
        mine = {r["step"]: r["loss"] for r in records}
        diff = [abs(mine[s] - ref[s]) for s in steps]
        last = steps[-last_k:]
        out["per_gpus"][n] = {
            "common_steps": len(steps), "max_abs_diff": max(diff), "max_abs_diff_step": steps[diff.index(max(diff))],
            "mean_abs_diff_last_k": sum(abs(mine[s] - ref[s]) for s in last) / len(last),
            "mean_loss_last_k": sum(mine[s] for s in last) / len(last),
            "ref_mean_loss_last_k": sum(ref[s] for s in last) / len(last), "k": len(last)}
    return out


def logged_example_counts(records: Sequence[dict], epochs: Sequence[dict] = ()) -> dict:
    """What the logs say about the samples consumed: examples trained (with loss), per task and in total;
    and the trainer's own `epoch` records (count + digest of the loss-weighted sample keys per epoch,
    checked against the manifest at each epoch's end; `complete: false` for an epoch cut by --max-steps)."""
    per_task = Counter()
    for r in records:
        per_task.update(r.get("task_mix") or {})
    return {"examples_trained": sum(per_task.values()), "per_task": dict(per_task),
            "epoch_records": [{k: e.get(k) for k in ("epoch", "complete", "count", "expected_count", "ok", "rank_counts")}
                              for e in epochs],
            "exactly_once_ok": (all(e.get("ok") for e in epochs if e.get("complete"))
                                if any(e.get("complete") for e in epochs) else None),
            "bad_samples": sum(int(r.get("bad_samples", 0)) for r in records),
            "pad_duplicates": sum(int(r.get("pad_duplicates", 0)) for r in records),
            "epochs_logged": sorted({r.get("epoch") for r in records if r.get("epoch") is not None})}


def epoch_coverage(flags: Sequence[str], world_size: int) -> dict:
    """Iterate the trainer's own data pipeline (with the run's flags) over epoch 0 for every rank of
    `world_size`; count how often each train sample comes with loss weight > 0."""
    tcfg = parse_train_config(list(flags))
    manifest = load_manifest(tcfg.data.shard_dir)
    tokenizer = AutoTokenizer.from_pretrained(tcfg.model.model_path)
    phases = build_phases(tcfg.schedule)
    seen: Counter = Counter()
    batches_per_rank, weight0 = [], 0
    for rank in range(world_size):
        stream = TrainStream(manifest, tcfg.data.shard_dir, tokenizer, tcfg.data, phases,
                             tcfg.model.num_image_tokens, rank, world_size, tcfg.seed)
        batches = 0
        for batch in stream.loader(0):
            batches += 1
            for key, weight in zip(batch["keys"], batch["loss_weights"]):
                if weight > 0:
                    seen[key] += 1
                else:
                    weight0 += 1
        batches_per_rank.append(batches)
    expected = manifest.num_samples("train")
    repeated = sorted(k for k, c in seen.items() if c > 1)
    return {"world_size": world_size, "train_samples": expected, "distinct_seen": len(seen),
            "missing": expected - len(seen), "repeated": len(repeated), "repeated_examples": repeated[:5],
            "loss_free_duplicates": weight0, "batches_per_rank": batches_per_rank,
            "equal_batches_per_rank": len(set(batches_per_rank)) == 1,
            "exactly_once": len(seen) == expected and not repeated}


# ----------------------------------------------------------------------------------------------
# Builder runs
# ----------------------------------------------------------------------------------------------

def run_builder(cfg: ScalingConfig, n: int, data: tuple[list[str], Path], stage1: tuple[str, str], image_size: int,
                samples_per_shard: int, work: Path, cuda: bool) -> dict:
    """N build_shards processes (one per GPU) into a fresh directory; their per-node records + wall time."""
    json_paths, image_root = data
    out = work / f"build-procs{n}"
    shutil.rmtree(out, ignore_errors=True)
    base = [sys.executable, "-m", "data_prep.build_shards", "--gemini-json", *json_paths, "--image-root", str(image_root),
            "--stage1-encoder-ckpt", stage1[0], "--stage1-classifier-ckpt", stage1[1], "--image-size", str(image_size),
            "--out", str(out), "--samples-per-shard", str(samples_per_shard), "--batch-size", str(cfg.builder_batch_size),
            "--num-workers", str(cfg.builder_num_workers), "--num-nodes", str(n)]
    print(f"[scaling] shard builder with {n} process(es), {samples_per_shard} images per shard -> {out}", flush=True)
    env = subprocess_env(cuda)
    out.mkdir(parents=True)
    start = time.perf_counter()
    procs = []
    for rank in range(n):
        penv = {**env, **({"CUDA_VISIBLE_DEVICES": str(rank)} if cuda else {})}
        f = open(work / f"build-procs{n}-rank{rank}.log", "w")
        procs.append((subprocess.Popen([*base, "--node-rank", str(rank)], cwd=REPO_ROOT, env=penv, stdout=f,
                                       stderr=subprocess.STDOUT), f))
    codes = []
    for p, f in procs:
        try:
            codes.append(p.wait(timeout=cfg.run_timeout_s))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
        f.close()
    wall = time.perf_counter() - start
    result = {"processes": n, "wall_s": wall, "ok": all(c == 0 for c in codes), "exit_codes": codes,
              "out": str(out), "logs": [str(work / f"build-procs{n}-rank{r}.log") for r in range(n)]}
    nodes = [json.loads((out / BUILD_DIR / f"node-{r}-of-{n}.json").read_text())
             for r in range(n) if (out / BUILD_DIR / f"node-{r}-of-{n}.json").is_file()]
    result["nodes"] = nodes
    images = sum(nd["images"] for nd in nodes)
    slowest = max((nd["seconds"] for nd in nodes), default=0.0)
    result.update(images=images, build_s=slowest,
                  images_per_s=images / slowest if slowest else None,
                  images_per_s_end_to_end=images / wall if wall else None)
    manifest = out / "manifest.json"
    result["shard_sha256"] = ({s["name"]: s["sha256"] for s in json.loads(manifest.read_text())["shards"]}
                              if manifest.is_file() else {})
    if not result["ok"] or not result["shard_sha256"]:
        result["error"] = f"exit codes {codes}; manifest {'present' if manifest.is_file() else 'missing'}; see {result['logs']}"
        print(f"[scaling] builder with {n} process(es) FAILED: {result['error']}", flush=True)
    return result


def builder_scaling(cfg: ScalingConfig, work: Path, cuda: bool) -> dict:
    data_dir = work / "builder-data"
    if not (data_dir / "md_image").is_dir():
        log.info("generating ~%d synthetic %d px images for the builder runs", cfg.builder_images, cfg.builder_image_px)
    json_paths = synthetic_data(data_dir, cfg.builder_images, cfg.builder_image_px, seed=1)
    stage1 = _stage1(cfg, work)
    image_size = load_stage1_encoder(stage1[0]).config.image_size
    # Several shards per process, so that no process idles while another builds its last shard.
    samples_per_shard = max(1, math.ceil(cfg.builder_images / (4 * max(cfg.builder_gpus))))
    runs = [run_builder(cfg, n, (json_paths, data_dir), stage1, image_size, samples_per_shard, work, cuda)
            for n in cfg.builder_gpus]
    base = next((r for r in runs if r.get("images_per_s")), None)
    for r in runs:
        if base and r.get("images_per_s"):
            r["speedup"] = r["images_per_s"] / base["images_per_s"]
            r["speedup_end_to_end"] = r["images_per_s_end_to_end"] / base["images_per_s_end_to_end"]
    shas = [r["shard_sha256"] for r in runs if r["shard_sha256"]]
    return {"runs": runs, "stage1": stage1, "image_size": image_size, "samples_per_shard": samples_per_shard,
            "identical_shards": all(s == shas[0] for s in shas) if len(shas) > 1 else None}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _fmt(v, spec: str = ",.0f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _engine_lines(t: dict) -> list[str]:
    """One engine's tables: runs, where the time goes, loss agreement, samples, fault drill, failures."""
    lines = ["", "| GPUs | accum | global batch | steady steps | tokens/s | tokens/s/GPU | ms/step | efficiency | wall s | status |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n, r in t["runs"].items():
        tp = r["throughput"]
        lines.append(f"| {n} | {r['grad_accum']} | {r.get('global_batch', '–')} | {tp.get('steady_steps', 0)} | "
                     f"{_fmt(tp.get('tokens_per_s'))} | {_fmt(tp.get('tokens_per_s_per_gpu'))} | {_fmt(tp.get('ms_per_step'), ',.1f')} | "
                     f"{_fmt(t['efficiency'].get(n), '.1%')} | {r['wall_s']:.0f} | {'ok' if r['ok'] else 'FAILED'} |")
    effs = t.get("efficiency_per_repeat") or []
    if len(effs) > 1:
        lines += ["", "Efficiency per repeat (run in turn: " + ", ".join(
            f"repeat {i + 1}: " + " / ".join(f"{n} GPUs {_fmt(e, '.1%')}" for n, e in eff.items())
            for i, eff in enumerate(effs)) + ")."]
    timed = {n: r for n, r in t["runs"].items() if r.get("rank_ms_per_step")}
    if timed:
        lines += ["", "Where each rank's time goes, ms per micro-batch (the trainer's per-rank `rank_ms_per_step` "
                  "÷ accumulation, steady windows): host clocks, so `fwd+bwd` is the time to issue them and waits "
                  "for the device or for the other ranks land in `step` (DeepSpeed syncs there) or `other` (the "
                  "torch engine syncs at log steps); a rank that waits less than the others is their straggler.", "",
                  "| GPUs | rank | data wait | fwd+bwd | step | other | total |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for n, r in timed.items():
            times, ga = r["rank_ms_per_step"], r["grad_accum"]
            for rank in range(len(times.get("fwd_bwd", []))):
                row = [times[p][rank] / ga for p in ("data", "fwd_bwd", "step", "other")]
                lines.append(f"| {n} | {rank} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {sum(row):.1f} |")
    slow = {n: r["slowdown_ms_per_micro_batch"] for n, r in t["runs"].items() if r.get("slowdown_ms_per_micro_batch")}
    if slow:
        lines += ["", "What the extra GPUs cost, ms per micro-batch beyond the smallest run's (exact per log window, "
                  "read at the rank that issued its forward + backward slowest): `data` its wait for batches, "
                  "`host issue` the ranks' mean issue time (slower hosts), `stragglers` the slowest rank's issue "
                  "time beyond the mean (the others wait for it), `sync/step` its engine step (gradient "
                  "collectives, optimizer, waits for a rank slow at another step of the window), `other`.", "",
                  "| GPUs | base ms/micro-batch | extra | data | host issue | stragglers | sync/step | other |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, b in slow.items():
            lines.append(f"| {n} | {b['ms_per_micro_batch_1']:.1f} | {b['total']:+.1f} | " + " | ".join(
                f"{b[k]:+.1f}" for k in ("data", "host_issue", "stragglers", "sync_step", "other")) + " |")
    agree = t.get("loss_agreement") or {}
    if agree.get("per_gpus"):
        lines += ["", f"Loss agreement against {agree['reference_gpus']} GPU(s) at equal steps (the ranks read other "
                  "parts of the epoch at another N, so the curves agree statistically, not bit for bit):", "",
                  "| GPUs | common steps | max abs diff (step) | mean abs diff, last k | mean loss last k (ref) |",
                  "|---:|---:|---:|---:|---:|"]
        for n, a in agree["per_gpus"].items():
            lines.append(f"| {n} | {a['common_steps']} | {a['max_abs_diff']:.4f} ({a['max_abs_diff_step']}) | "
                         f"{a['mean_abs_diff_last_k']:.4f} (k={a['k']}) | {a['mean_loss_last_k']:.4f} "
                         f"({a['ref_mean_loss_last_k']:.4f}) |")
    lines += ["", "Samples: examples trained per run from the logs, and the run's own `epoch` records (count of "
              "loss-weighted samples per epoch; at an epoch's end their digest is checked against the manifest, "
              "`partial` = an epoch cut by --max-steps, not checked); exactly-once per epoch also from the trainer's "
              "data pipeline replayed over a whole epoch for every rank with the run's flags:", "",
              "| GPUs | examples trained (logs) | run's epoch records | bad | exactly once (replay) | missing | repeated | "
              "loss-free dups | batches/rank |",
              "|---:|---:|---|---:|---|---:|---:|---:|---|"]
    for n, r in t["runs"].items():
        c, cov = r["logged_samples"], r.get("coverage") or {}
        epochs = "; ".join(f"{e['epoch']}: {e['count']} " + ("partial" if not e.get("complete") else
                                                              "ok" if e.get("ok") else "MISMATCH")
                           for e in c.get("epoch_records") or []) or "–"
        lines.append(f"| {n} | {c['examples_trained']} | {epochs} | {c['bad_samples']} | "
                     f"{'yes' if cov.get('exactly_once') else ('NO' if cov else '–')} | {cov.get('missing', '–')} | "
                     f"{cov.get('repeated', '–')} | {cov.get('loss_free_duplicates', '–')} | {cov.get('batches_per_rank', '–')} |")
    d = t.get("fault_drill")
    if d:
        lines += ["", f"Fault drill on {d['gpus']} GPU(s): rank {d.get('killed_rank')} SIGKILLed right after the "
                  f"step-{d.get('save_at_step')} resume checkpoint; job stopped in {d.get('stop_s', '–')} s (exit code "
                  f"{d.get('exit_code')}, {d.get('survivors', '–')} processes left); `--resume` started at step "
                  f"{d.get('resumed_at_step')}, trained {d.get('resumed_steps')} steps, same data position as the "
                  f"uninterrupted run: {'yes' if d.get('same_data_position') else 'NO'}, max |loss difference| "
                  f"{_fmt(d.get('max_abs_loss_diff'), '.2e')}: **{'ok' if d.get('ok') else 'FAILED'}**."]
        if d.get("error"):
            lines += ["```", d["error"], "```"]
    for n, r in t["runs"].items():
        if r.get("error"):
            lines += ["", f"Run on {n} GPU(s) failed:", "```", r["error"], "```"]
    return lines


def markdown_report(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# Scaling on {result['environment']['device']}", ""]
    if result.get("training"):
        t = result["training"]
        batch = (f"global batch {t['global_batch']} examples/step" if not t.get("weak") else
                 "weak scaling: micro-batch and accumulation fixed, global batch " + ", ".join(
                     f"{b} at {n} GPU(s)" for n, b in (t.get("global_batch_per_gpus") or {}).items()))
        lines += [f"## Training (`trainer.train` via `launch/train.sh`, shape {cfg['shape']})", "",
                  f"Every run: {cfg['max_steps']} optimizer steps, {batch} "
                  f"(micro-batch {cfg['batch_size']} per GPU x accumulation x GPUs), seed {cfg['seed']}, "
                  f"max_seq_len {cfg['max_seq_len']}, {t['train_samples']} train samples. Throughput = real (non-padding) "
                  f"tokens / step time, summed over ranks, over steps > {cfg['warmup_steps']} (warm-up excluded)."]
        sections = t.get("per_engine") or {(cfg.get("engines") or ["deepspeed"])[0]: t}
        if len(sections) > 1:
            first = next(iter(sections))
            lines += ["", f"Engines side by side (run interleaved: for each repeat and N, every engine in turn); "
                      f"`vs {first}` = tokens/s over {first}'s at the same N:", "",
                      "| engine | GPUs | tokens/s | efficiency | vs " + first + " | status |", "|---|---:|---:|---:|---:|---|"]
            for engine, per_n in t["engine_comparison"].items():
                for n, c in per_n.items():
                    lines.append(f"| {engine} | {n} | {_fmt(c['tokens_per_s'])} | {_fmt(c['efficiency'], '.1%')} | "
                                 f"{_fmt(c['vs_first_engine'], '.3f')} | {'ok' if c['ok'] else 'FAILED'} |")
        for engine, sec in sections.items():
            lines += ["", f"### Engine `{engine}`"] if len(sections) > 1 else []
            lines += _engine_lines(sec)
        lines += ["", t["coverage_note"]]
    if result.get("builder"):
        b = result["builder"]
        lines += ["", "## Shard builder (`data_prep.build_shards`, one process per GPU, `--num-nodes N --node-rank r`)", "",
                  f"{b['runs'][0]['images'] if b['runs'] else 0} images, Stage1 at {b['image_size']} px, "
                  f"{b['samples_per_shard']} images per shard. Build images/s = all images / the slowest process's "
                  "build time (model loading excluded); end to end = / wall time of the whole command.", "",
                  "| processes | images | build s | images/s | speed-up | end-to-end images/s | speed-up | status |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in b["runs"]:
            lines.append(f"| {r['processes']} | {r['images']} | {r['build_s']:.1f} | {_fmt(r.get('images_per_s'), ',.1f')} | "
                         f"{_fmt(r.get('speedup'), '.2f')}x | {_fmt(r.get('images_per_s_end_to_end'), ',.1f')} | "
                         f"{_fmt(r.get('speedup_end_to_end'), '.2f')}x | {'ok' if r['ok'] else 'FAILED'} |")
        if b["identical_shards"] is not None:
            lines += ["", f"Identical shards (sha256) for every process count: {'yes' if b['identical_shards'] else 'NO'}."]
    return "\n".join(lines) + "\n"


COVERAGE_NOTE = ("Exactly-once is checked twice: by the run itself (trainer/exactly_once.py: each rank sums a digest "
                 "of the keys of the samples it trained with loss weight > 0, all-reduced and compared with the manifest's "
                 "train samples at each epoch's end: the `epoch` records of train_log.jsonl), and by replaying the data "
                 "plan above. Examples per step are not constant: --balance-window regroups each window of batches into "
                 "batches of ~equal TOKENS, longest examples first, so the first batches of a window hold fewer examples; "
                 "a run stopped inside windows (--max-steps) trains fewer examples than steps x global batch, and more "
                 "so with more ranks x workers cut mid-window (README.md, Multi-GPU). Over a whole epoch every N trains "
                 "every sample once.")


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {"device": (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if cuda
                       else f"CPU ({os.cpu_count()} cores; GPUs = processes)"),
            "torch": torch.__version__, "cuda": cuda, "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            # what each rank's intra-op thread pool starts from (the DeepSpeed launcher leaves it unset)
            "OMP_NUM_THREADS": subprocess_env(cuda).get("OMP_NUM_THREADS")}


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def training_scaling(cfg: ScalingConfig, work: Path, cuda: bool) -> dict:
    """Every --engines entry at every N, interleaved (repeat, N, engine), then one report section per
    engine; the first engine's section is also at the top level (the single-engine layout)."""
    inputs = prepare_inputs(cfg, work)
    accum = grad_accum_steps(cfg)
    repeats: dict[str, dict[int, list[RunResult]]] = {e: {n: [] for n in cfg.gpus} for e in cfg.engines}
    for i in range(cfg.repeats):  # in turn, so that drift of the machine meets every N and engine alike
        for n in cfg.gpus:
            for engine in cfg.engines:
                repeats[engine][n].append(run_training(cfg, inputs, n, accum[n], work, cuda, repeat=i, engine=engine))
    coverage = {}
    if cfg.check_coverage:  # the data plan depends on N and the batch size, not on the engine
        for n in cfg.gpus:
            print(f"[scaling] replaying one epoch of the data pipeline for {n} rank(s)", flush=True)
            coverage[n] = epoch_coverage(train_flags(cfg, inputs, accum[n], work / "coverage-unused"), n)
    per_engine = {e: engine_section(cfg, inputs, e, repeats[e], accum, coverage, work, cuda,
                                    drill=cfg.fault_drill and e == cfg.engines[0]) for e in cfg.engines}
    first = per_engine[cfg.engines[0]]
    return {"inputs": asdict(inputs), "global_batch": cfg.effective_global_batch, "weak": cfg.weak,
            "global_batch_per_gpus": {n: cfg.global_batch_of(n) for n in cfg.gpus},
            "train_samples": load_manifest(inputs.shard_dir).num_samples("train"), "coverage_note": COVERAGE_NOTE,
            "engines": list(cfg.engines), "per_engine": per_engine, "engine_comparison": engine_comparison(per_engine),
            **first}


def engine_section(cfg: ScalingConfig, inputs: Inputs, engine: str, repeats: dict[int, list[RunResult]],
                   accum: dict[int, int], coverage: dict[int, dict], work: Path, cuda: bool, drill: bool) -> dict:
    """One engine's runs at every N: throughput pooled over repeats, efficiency, where the time goes,
    loss agreement, samples (and the fault drill on the largest N when asked)."""
    results = {n: rs[0] for n, rs in repeats.items()}  # the first repeat: loss curves, coverage, drill
    runs = {}
    for n, r in results.items():
        per_repeat = [{"ok": x.ok, "wall_s": x.wall_s, "throughput": throughput(x.records, cfg.warmup_steps, n),
                       "rank_ms_per_step": rank_times([x.records], cfg.warmup_steps)} for x in repeats[n]]
        ok = all(x.ok for x in repeats[n])
        entry = {"grad_accum": r.grad_accum, "global_batch": cfg.global_batch_of(n), "ok": ok, "wall_s": r.wall_s,
                 "command": r.command, "log_file": r.log_file,
                 "error": "\n".join(x.error for x in repeats[n] if x.error), "start": r.start,
                 "throughput": (pooled_throughput([p["throughput"] for p in per_repeat], n) if cfg.repeats > 1
                                else per_repeat[0]["throughput"]),
                 "rank_ms_per_step": rank_times([x.records for x in repeats[n]], cfg.warmup_steps),
                 "repeats": per_repeat,
                 "logged_samples": logged_example_counts(r.records, r.epochs),
                 "steps": [{k: rec.get(k) for k in ("step", "loss", "real_tokens", "tokens_per_s", "lr", "rank_ms_per_step")}
                           for rec in r.records]}
        if n in coverage:
            entry["coverage"] = coverage[n]
        runs[n] = entry
    base = min(cfg.gpus)
    for n in cfg.gpus:
        if n != base and runs[base].get("rank_ms_per_step"):
            runs[n]["slowdown_ms_per_micro_batch"] = slowdown_breakdown(
                [x.records for x in repeats[n]], accum[n], runs[base]["rank_ms_per_step"], accum[base], cfg.warmup_steps)
    tps = {n: r["throughput"] for n, r in runs.items() if r["ok"]}
    fault = None
    if drill:
        n = max(cfg.gpus)
        fault = (fault_drill(cfg, inputs, n, accum[n], work, cuda, results[n]) if results[n].ok
                 else {"gpus": n, "ok": False, "error": f"the reference run on {n} GPU(s) failed"})
    per_repeat_eff = [scaling_efficiency({n: r["repeats"][i]["throughput"] for n, r in runs.items() if r["repeats"][i]["ok"]})
                      for i in range(cfg.repeats)]
    return {"engine": engine, "runs": runs, "efficiency": scaling_efficiency(tps), "efficiency_per_repeat": per_repeat_eff,
            "loss_agreement": loss_agreement({n: r.records for n, r in results.items() if r.records}, cfg.last_k),
            "fault_drill": fault}


def engine_comparison(per_engine: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """{engine: {N: tokens/s, efficiency, tokens/s against the first engine at the same N}}."""
    first = next(iter(per_engine.values()))["runs"]
    out = {}
    for engine, sec in per_engine.items():
        out[engine] = {}
        for n, r in sec["runs"].items():
            tps = r["throughput"].get("tokens_per_s")
            ref = first.get(n, {}).get("throughput", {}).get("tokens_per_s")
            out[engine][n] = {"tokens_per_s": tps, "efficiency": sec["efficiency"].get(n),
                              "vs_first_engine": tps / ref if tps and ref else None, "ok": r["ok"]}
    return out


def run(cfg: ScalingConfig) -> dict:
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cuda_count = _cuda_count()
    wanted = max(cfg.gpus + cfg.builder_gpus)
    if cuda_count and wanted > cuda_count:
        raise ValueError(f"asked for {wanted} GPUs, this machine has {cuda_count}")
    result: dict = {"config": asdict(cfg), "environment": environment()}
    if cfg.gpus:
        result["training"] = training_scaling(cfg, work, cuda_count > 0)
    if cfg.builder_gpus:
        result["builder"] = builder_scaling(cfg, work, cuda_count > 0)
    report = markdown_report(result)
    out = Path(cfg.out) if cfg.out else work / "scaling.json"
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), report)
    print(report)
    print(f"[scaling] wrote {out} and {out.with_suffix('.md')}", flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(ScalingConfig, argv)
    setup_logging("benchmarks", rank=0)
    print_config(cfg)
    result = run(cfg)
    failed = [n for n, r in (result.get("training") or {}).get("runs", {}).items() if not r["ok"]]
    drill = (result.get("training") or {}).get("fault_drill")
    failed += ["fault drill"] if drill and not drill["ok"] else []
    failed += [r["processes"] for r in (result.get("builder") or {}).get("runs", []) if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
