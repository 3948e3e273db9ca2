"""The benchmark's configuration (`BenchConfig`, its `--help`), the mode names and the constants of
the image prefix every mode builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from benchmarks.make_random_model import Shape
from models.prefix_lm import ModelConfig
from models.tasks import TASKS
from trainer.data import DEFAULT_AUTO_MEMORY_FRACTION, DEFAULT_BATCH_TOKENS

LATENT_DIM = 768
NUM_CLASSES = 20
IGNORE_INDEX = -100

MODE_NAMES = {1: "seed-like", 2: "padded-sdpa", 3: "packed-offshelf", 4: "project"}
# Mode 3 goes last: Liger's RoPE patch is module-level in transformers and would leak into any
# model built after it.
RUN_ORDER = (1, 2, 4, 3)


@dataclass
class BenchConfig:
    """Training-throughput benchmark of the full prefix-LM step, four ways (benchmarks/README.md explains them)."""

    shape: Shape = field(default="tiny", metadata={
        "help": "model shape: 'tiny' (CPU smoke runs), or random bf16 weights of a real shape: '7b' (Mistral-7B), "
                "'llama3-8b' (Llama-3-8B), 'qwen2.5-7b' (Qwen2.5-7B)"})
    modes: list[int] = field(default_factory=lambda: [1, 2, 3, 4], metadata={
        "help": "modes to run: 1 seed-like, 2 padded SDPA, 3 packed off-the-shelf, 4 project"})
    steps: int = field(default=10, metadata={"help": "timed steps per mode"})
    warmup_steps: int = field(default=3, metadata={"help": "untimed steps before timing"})
    token_budget: str = field(default="auto", metadata={
        "help": "packed modes (3, 4): examples are packed into one row up to this many tokens; auto = mode 4 "
                "probes the largest row that fits, as the trainer's --batch-tokens auto (mode 3 and CPU runs: "
                f"{DEFAULT_BATCH_TOKENS})"})
    auto_memory_fraction: float = field(default=DEFAULT_AUTO_MEMORY_FRACTION, metadata={
        "help": "--token-budget auto: the share of the GPU's memory the probed peak may reach (the trainer's "
                "--auto-memory-fraction)"})
    batch_size: int = field(default=0, metadata={
        "help": "packed modes (3, 4): a fixed number of examples per row (the trainer's "
                "--batch-size); overrides --token-budget when > 0"})
    padded_batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64], metadata={
        "help": "mode 2 tries these batch sizes and reports the fastest that fits"})
    baseline_attn: Literal["sdpa", "flex_attention"] = field(default="sdpa", metadata={
        "help": "mode 3's stock HF attention (document mask from position_ids)"})
    max_seq_len: int = field(default=256, metadata={"help": "truncation length, prefix included"})
    gemini_json: list[str] = field(default_factory=list, metadata={
        "help": "Gemini JSON files for the length mix (default: generate synthetic data)"})
    shard_dir: str = field(default="", metadata={"help": "take examples (and latents) from train shards"})
    lengths_file: str = field(default="", metadata={
        "help": "JSON from --write-lengths: example lengths only (token ids are random)"})
    write_lengths: str = field(default="", metadata={
        "help": "only write the examples' lengths to this JSON (for --lengths-file elsewhere) and exit"})
    tokenizer: str = field(default="", metadata={
        "help": "tokenizer dir for the lengths (default: the tiny BPE trained on the data)"})
    layers: int = field(default=0, metadata={
        "help": "real shapes: keep only the first N decoder layers (0 = all): quick same-call comparisons of "
                "changes inside a layer; report whole-model figures, not these"})
    synthetic_cases: int = field(default=40, metadata={"help": "cases of synthetic data (20 elements each)"})
    task_mix: str = field(default="caption:1,summary:1,cot:1,text_summary:0", metadata={
        "help": "task weights of the example stream (the uniform A/B/C schedule by default)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda or cpu"})
    step_engine: Literal["auto", "deepspeed", "torch"] = field(default="auto", metadata={
        "help": "mode 4's step, the trainer's build_engine with --engine deepspeed (ZeRO-2, bf16 + fp32 master "
                "weights) or --engine torch (flat bf16 weights + fp32 masters, fused AdamW, no per-step host "
                "sync); auto = deepspeed if importable"})
    deepspeed_config: str = field(default="ds_configs/zero2.json", metadata={
        "help": "mode 4 with the deepspeed engine: the DeepSpeed JSON (as the trainer's --deepspeed)"})
    ds_override: str = field(default="", metadata={
        "help": "JSON merged (recursively) into --deepspeed-config, e.g. '{\"zero_optimization\": "
                "{\"overlap_comm\": false}}', to measure engine settings without editing the file"})
    isolate_modes: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "run each mode in a fresh process (same machine, same session, one after another) so that no "
                "mode inherits another's allocator and Python state; auto = on for CUDA"})
    gc_interval_steps: int = field(default=50, metadata={
        "help": "Python GC as the trainer runs it (trainer.gc_steps, the trainer's --gc-interval-steps): automatic "
                "collection off, a young-generation collection every N steps; 0 = Python's automatic GC. Applies "
                "to every mode alike"})
    grad_accum: int = field(default=1, metadata={
        "help": "mode 4: micro-batches per optimizer step (the trainer's --gradient-accumulation-steps); "
                "every micro-batch is a timed step, so the optimizer's cost is spread over this many"})
    profile: bool = field(default=False, metadata={
        "help": "mode 4: write a torch.profiler summary (top ops by device time and by host time) next to --out"})
    sync_debug: bool = field(default=False, metadata={
        "help": "mode 4, CUDA: after timing, run 2 steps under torch.cuda.set_sync_debug_mode('warn') and list every "
                "host<->device synchronisation with the project frames that issued it (JSON + a text file next to --out)"})
    out: str = field(default="", metadata={"help": "write the results as JSON here"})
    seed: int = field(default=0, metadata={"help": "seed of the example stream and the weights"})
    model: ModelConfig = field(default_factory=ModelConfig)

    @property
    def auto_budget(self) -> bool:
        return self.batch_size <= 0 and self.token_budget.strip().lower() == "auto"

    @property
    def fixed_budget(self) -> int:
        """The row budget of mode 3 (and of mode 4 unless it probes one)."""
        return DEFAULT_BATCH_TOKENS if self.token_budget.strip().lower() == "auto" else int(self.token_budget)

    def validate(self) -> None:
        bad = sorted(set(self.modes) - set(MODE_NAMES))
        if bad or not self.modes:
            raise ValueError(f"--modes: unknown mode(s) {bad}; choose from {sorted(MODE_NAMES)}")
        if self.steps < 1 or self.warmup_steps < 0:
            raise ValueError("--steps must be >= 1 and --warmup-steps >= 0")
        if self.token_budget.strip().lower() != "auto" and not self.token_budget.strip().isdigit():
            raise ValueError(f"--token-budget must be 'auto' or a number of tokens (got {self.token_budget!r})")
        if self.batch_size <= 0 and self.fixed_budget < self.max_seq_len:
            raise ValueError(f"--token-budget ({self.fixed_budget}) must hold one example "
                             f"(--max-seq-len {self.max_seq_len})")
        if sum(bool(x) for x in (self.gemini_json, self.shard_dir, self.lengths_file)) > 1:
            raise ValueError("give at most one of --gemini-json, --shard-dir, --lengths-file")
        parse_task_mix(self.task_mix)
        if self.gc_interval_steps < 0:
            raise ValueError(f"--gc-interval-steps must be >= 0 (got {self.gc_interval_steps})")
        if self.layers < 0 or (self.layers and self.shape == "tiny"):
            raise ValueError(f"--layers must be >= 0 and needs a real --shape (got {self.layers}, {self.shape})")
        if self.grad_accum < 1:
            raise ValueError(f"--grad-accum must be >= 1 (got {self.grad_accum})")


def parse_task_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        if name not in TASKS:
            raise ValueError(f"--task-mix: unknown task {name!r}; known: {TASKS}")
        mix[name] = float(weight or 1)
    if not mix or sum(mix.values()) <= 0 or min(mix.values()) < 0:
        raise ValueError(f"--task-mix {text!r}: weights must be >= 0 and not all 0")
    return {k: v for k, v in mix.items() if v > 0}
