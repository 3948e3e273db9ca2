"""The scaling benchmark's configuration (`ScalingConfig`, its `--help`), the engines it compares and the
gradient accumulation that keeps the global batch equal across GPU counts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ENGINES = ("deepspeed", "torch", "ddp")


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
