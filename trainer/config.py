"""The trainer's one configuration object: `TrainConfig`, filled from defaults, YAML and CLI flags.

It composes the groups other modules own (the model, the Stage1 settings shared with the shard
builder and eval, the data pipeline, the task schedule) with the trainer's own groups (optimizer,
logging, checkpoints). Every leaf field is one flag (`--lora-r`, `--save-steps`, ...), so all the
training flags of the seed's README parse unchanged, e.g.

    python -m trainer.train --shard-dir shards/ --model-path mistral-7b --output-dir ckpt \\
        --batch-size 8 --num-epochs 1 --lr 2e-5 --encoder-lr 5e-6 --warmup-ratio 0.1 ...

Flags the seed needed for its own plumbing (`--distributed`, `--local_rank` from the DeepSpeed
launcher) are accepted and have no effect: the launcher environment decides the process layout.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from common.config import _flatten, _leaf_fields, _load_file, from_dict, load_config, parse_config
from models.prefix_lm import ModelConfig
from models.stage1 import Stage1Settings
from trainer.data import DataConfig
from trainer.schedules import ScheduleConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DS_CONFIG = "ds_configs/zero2.json"


@dataclass
class OptimConfig:
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate of the LoRA adapters and the image prefix"})
    encoder_lr: float = field(default=5e-6, metadata={"help": "peak learning rate of the trainable Stage1 tail (K > 0)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of the optimizer steps spent in linear warm-up before cosine decay"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "the cosine decays to this fraction of the peak learning rate"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "global gradient-norm clipping (0 = off)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})


@dataclass
class LoggingConfig:
    log_steps: int = field(default=10, metadata={"help": "optimizer steps between log records (the only periodic host syncs)"})
    sample_log_steps: int = field(default=500, metadata={"help": "steps between greedy sample generations from val samples (0 = off)"})
    sample_log_max_new_tokens: int = field(default=80, metadata={"help": "max new tokens of a logged sample generation"})
    sample_log_num: int = field(default=2, metadata={"help": "val samples generated at each sample log"})
    use_wandb: bool = field(default=False, metadata={"help": "log to Weights & Biases (WANDB_MODE=offline works without network)"})
    wandb_project: str = field(default="climate-to-text-stage2-mtl", metadata={"help": "wandb project"})
    wandb_run_name: str = field(default="", metadata={"help": "wandb run name (default: the output dir's name)"})
    log_dir: str = field(default="", metadata={"help": "where train_log.jsonl and samples.jsonl go (default: --output-dir)"})
    image_gap_every: int = field(default=1, metadata={
        "help": "at every Nth validation also compute the image-use gap: the held-out loss with each example's "
                "latent and image class swapped for another example's (same batches, one extra forward without "
                "gradients) minus the true loss, with a bootstrap 95% CI; a warning when the CI still includes 0 "
                "after the LR warm-up (0 = off)"})


@dataclass
class CheckpointConfig:
    output_dir: str = field(default="checkpoints/stage2", metadata={"help": "run directory: checkpoints, resume state, logs"})
    save_steps: int = field(default=500, metadata={"help": "optimizer steps between checkpoints (0 = only at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "resume checkpoints kept (older ones are deleted); inference checkpoint-<step> dirs are kept"})
    resume: bool = field(default=False, metadata={"help": "continue exactly from <output-dir>/resume/latest if it exists"})
    max_nan_steps: int = field(default=10, metadata={"help": "consecutive non-finite steps (skipped) before training stops"})


@dataclass
class TrainConfig:
    """Stage2 prefix-LM training (LoRA + image prefix, multi-task) with DeepSpeed ZeRO-2, the torch engine or DDP."""

    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Settings = field(default_factory=Stage1Settings)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    engine: Literal["deepspeed", "torch", "ddp", "fsdp2"] = field(default="deepspeed", metadata={
        "help": "training engine (trainer/engines/); same updates whichever: deepspeed = DeepSpeed ZeRO per "
                "--deepspeed (ds_configs/), the spec's default; torch = a lean data-parallel engine for LoRA "
                "(flat fp32 master weights, one all-reduce, fused AdamW, no per-step host sync): less host work "
                "per step, and ZeRO's sharding buys nothing for LoRA's small optimizer state; ddp = PyTorch "
                "DistributedDataParallel (no_sync inside the accumulation window) with the torch engine's step "
                "(README.md, Performance and Multi-GPU); fsdp2 = PyTorch FSDP2, every weight (frozen base too), "
                "gradient and optimizer state sharded over the ranks, each rank loading only its shard: full "
                "fine-tuning (--no-use-lora) or a base too big for one GPU; resume checkpoints reshard to another "
                "GPU count"})
    fsdp_cpu_offload: bool = field(default=False, metadata={
        "help": "--engine fsdp2: keep the parameter shards, gradients and optimizer state in host memory "
                "(all-gathered to the GPU per layer; AdamW on the CPU): less GPU memory, slower steps"})
    deepspeed: str = field(default=DEFAULT_DS_CONFIG, metadata={"help": "DeepSpeed JSON config (--engine deepspeed); its 'auto' fields are filled from this config. "
                                                                  "ds_configs/zero2.json (default), zero1.json, zero2_offload.json; "
                                                                  "zero3.json / zero3_offload.json partition the weights too (a base "
                                                                  "or a full fine-tune that one GPU cannot hold)"})
    seed: int = field(default=42, metadata={"help": "seed of the data order, task sampling, init and dropout"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1 = run all epochs); the LR schedule spans the capped run"})
    gc_interval_steps: int = field(default=50, metadata={
        "help": "Python's garbage collector runs every this many optimizer steps, on all ranks at the same step, "
                "instead of whenever one rank's counters say so (a pause there makes every rank wait at the next "
                "all-reduce); 0 = Python's automatic GC"})
    cpu_affinity: Literal["off", "auto", "gpu"] = field(default="off", metadata={
        "help": "pin each rank and its data workers to its share of the CPUs next to its GPU (whole physical "
                "cores, split among the ranks sharing them): auto = unless a launcher restricted the CPUs already "
                "(srun --cpu-bind, numactl, a cgroup), gpu = always, off = leave it to the OS. Off by default: where "
                "all GPUs share one NUMA node there is no remote memory to avoid, and confining each rank's host "
                "thread to fewer CPUs slowed its kernel issue (README.md, Multi-GPU); try auto on multi-socket "
                "nodes whose GPUs hang off different sockets"})
    dist_timeout_s: int = field(default=1800, metadata={"help": "collective timeout: a dead rank makes the others fail after this many seconds instead of hanging"})
    hang_timeout: float = field(default=300, metadata={
        "help": "seconds a rank may fall silent (stopped process or host: no heartbeat through the rendezvous "
                "store) before the rank watching it names it (rank, host, pid) and exits, so that the launcher "
                "ends the job (trainer/heartbeat.py); 0 = off"})
    # Accepted for compatibility with the seed's command lines; the launcher decides the layout.
    distributed: bool = field(default=False, metadata={"help": "accepted for compatibility; no effect (the launcher's environment decides)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the DeepSpeed launcher (--local_rank); no effect otherwise"})
    gemini_json: list[str] = field(default_factory=list, metadata={"help": "seed compatibility: training reads shards; build them first with data_prep.build_shards"})
    image_root: str = field(default="", metadata={"help": "seed compatibility (see --gemini-json)"})
    # Test-only fault injection: the loss at these optimizer steps (1-based) is made NaN.
    debug_nan_at_steps: list[int] = field(default_factory=list, metadata={"help": "TESTS ONLY: make the loss NaN at these optimizer steps"})

    def validate(self) -> None:
        if hasattr(self.model, "validate"):
            self.model.validate()
        if hasattr(self.data, "validate"):
            self.data.validate()
        if hasattr(self.schedule, "validate"):
            self.schedule.validate()
        if not self.data.shard_dir:
            if self.gemini_json:
                raise ValueError(
                    "--gemini-json/--image-root: training reads pre-built shards (cached Stage1 latents). "
                    "Build them once, then pass --shard-dir:\n  python -m data_prep.build_shards "
                    f"--gemini-json {' '.join(self.gemini_json)} --image-root {self.image_root or '<image root>'} "
                    "--stage1-encoder-ckpt ... --stage1-classifier-ckpt ... "
                    f"--stage1-trainable-blocks {self.stage1.stage1_trainable_blocks} --out <shard dir>")
            raise ValueError("--shard-dir is required (a directory built by python -m data_prep.build_shards)")
        if not self.model.model_path:
            raise ValueError("--model-path is required (a local Hugging Face model directory)")
        o = self.optim
        if o.lr <= 0 or o.encoder_lr < 0:
            raise ValueError(f"--lr must be > 0 and --encoder-lr >= 0 (got {o.lr}, {o.encoder_lr})")
        if not 0.0 <= o.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1) (got {o.warmup_ratio})")
        if o.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient-accumulation-steps must be >= 1 (got {o.gradient_accumulation_steps})")
        if self.hang_timeout < 0:
            raise ValueError(f"--hang-timeout must be >= 0 seconds (0 = off; got {self.hang_timeout})")
        if self.gc_interval_steps < 0:
            raise ValueError(f"--gc-interval-steps must be >= 0 (got {self.gc_interval_steps})")
        if self.logging.image_gap_every < 0:
            raise ValueError(f"--image-gap-every must be >= 0 (got {self.logging.image_gap_every})")
        if self.logging.log_steps < 1:
            raise ValueError(f"--log-steps must be >= 1 (got {self.logging.log_steps})")
        if self.checkpoint.save_steps < 0 or self.checkpoint.save_total_limit < 1:
            raise ValueError("--save-steps must be >= 0 and --save-total-limit >= 1")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max-steps must be -1 (all epochs) or >= 1 (got {self.max_steps})")
        if self.stage1.stage1_trainable_blocks > 0 and not self.stage1.stage1_encoder_ckpt:
            raise ValueError("--stage1-trainable-blocks > 0 needs --stage1-encoder-ckpt (the tail is trained from it)")
        if self.fsdp_cpu_offload and self.engine != "fsdp2":
            raise ValueError("--fsdp-cpu-offload needs --engine fsdp2 (DeepSpeed offload: --deepspeed "
                             "ds_configs/zero2_offload.json)")
        if self.engine == "deepspeed" and not resolve_ds_config_path(self.deepspeed).is_file():
            raise ValueError(f"--deepspeed: config file {self.deepspeed!r} not found")

    @property
    def log_dir(self) -> Path:
        return Path(self.logging.log_dir or self.checkpoint.output_dir)


def resolve_ds_config_path(path: str) -> Path:
    """A relative DeepSpeed config path is looked up in the CWD, then in the repo (launch-dir independent)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def _normalise_launcher_args(argv: Sequence[str]) -> list[str]:
    """The DeepSpeed launcher appends `--local_rank=N`; our flags use dashes."""
    out = []
    for a in argv:
        if a.startswith("--local_rank"):
            a = "--local-rank" + a[len("--local_rank"):]
        out.append(a)
    return out


def parse_train_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    return parse_config(TrainConfig, _normalise_launcher_args(argv))


def load_train_config(path: str | Path, ignore_unknown: bool = False) -> TrainConfig:
    """A saved `train_config.json` (e.g. from a checkpoint) back as a TrainConfig; unknown fields are an error.

    With `ignore_unknown`, fields TrainConfig does not have are dropped instead: for readers of
    checkpoints (eval), whose train_config.json may come from another version of the trainer or hold
    extra keys. Not validated either way (a checkpoint's config need not name reachable shards).
    """
    if not ignore_unknown:
        return load_config(TrainConfig, path)
    # The same reading as load_config (flat or nested files), less the unknown names.
    known = {p[-1] for p, _, _ in _leaf_fields(TrainConfig)}
    values = _flatten(_load_file(str(path)), TrainConfig, str(path))
    return from_dict(TrainConfig, {k: v for k, v in values.items() if k in known}, source=str(path))


def replace(cfg: TrainConfig, **groups) -> TrainConfig:
    """`dataclasses.replace` for nested groups: replace(cfg, optim={"lr": 1e-4}, max_steps=3)."""
    changes = {}
    for name, value in groups.items():
        current = getattr(cfg, name)
        changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) and dataclasses.is_dataclass(current) else value
    return dataclasses.replace(cfg, **changes)
