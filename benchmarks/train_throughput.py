"""Training-throughput benchmark: the full prefix-LM LoRA step, four ways, same process, same data.

Every mode runs the whole Stage2 step — image prefix (projected latent + class embedding) spliced
into the token embeddings, forward, backward, AdamW step — on the same stream of real examples
(prompts and targets built by `models.tasks` from the synthetic data, a shard dir, or a length
file), so only the way the step is executed differs:

| mode | name           | what                                                                        |
|------|----------------|-----------------------------------------------------------------------------|
| 1    | seed-like      | batch 1, padded to max_seq_len (256), eager attention (the seed's recipe)   |
| 2    | padded-sdpa    | plain HF padded batching (pad to the longest), SDPA, best batch that fits   |
| 3    | packed-offshelf| packed rows, stock HF SDPA/flex (document mask from `position_ids`) + Liger |
| 4    | project        | `build_prefix_lm` + `collate_train(packed=True)` + the trainer's engine     |

Modes 1-3 use plain HF + PEFT and a minimal prefix module written here (nothing of the project's
model code) with torch AdamW; mode 4 is exactly what `trainer.train` runs: the same model build
and the same step, `trainer.engines.build_engine` (DeepSpeed ZeRO-2 from ds_configs/zero2.json,
bf16 compute weights with fp32 master weights in the optimizer, gradient clipping, LR schedule) in
a 1-process world; `--step-engine torch` runs the trainer's `--engine torch` instead (the lean
data-parallel engine: flat bf16 weights + fp32 masters, fused AdamW, no per-step host sync). The 7B shape is Mistral-7B's
(`benchmarks.make_random_model.mistral_7b_shape_config`) with random bf16 weights (values don't change speed);
`--shape llama3-8b` / `--shape qwen2.5-7b` are Llama-3-8B's and Qwen2.5-7B's (`SHAPE_CONFIGS` there).

Throughput counts real (non-pad) tokens only. Model FLOPs per step (printed with the results):
    linear:    4 N per real token (forward 2N + activation gradients 2N; frozen base weights get
               no weight gradients; LoRA's own weight gradients are negligible), 6 N with
               activation checkpointing (the forward runs twice)
    attention: 6 * layers * hidden * sum(n_i^2) per step for documents of n_i real tokens
               (QK^T and PV, 2 FLOPs per MAC, causal half; backward = 2x forward), 8 * ... with
               activation checkpointing
MFU = model FLOP/s / the bf16 matmul peak measured in the same run (an 8192^3 GEMM). Padding
work is not counted: it is waste, not model work.

    python -m benchmarks.train_throughput --shape tiny --steps 2 --out /tmp/tp.json      # CPU smoke
    python -m benchmarks.train_throughput --shape 7b --out $OUT/throughput.json         # one H100
    python -m benchmarks.train_throughput --shape llama3-8b --out $OUT/throughput_llama3_8b.json
    python -m benchmarks.train_throughput --shape qwen2.5-7b --out $OUT/throughput_qwen2_5_7b.json
"""

from __future__ import annotations

import collections
import contextlib
import gc
import importlib
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import webdataset as wds
from peft import LoraConfig, get_peft_model
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from benchmarks.make_random_model import Shape, shape_config
from common.config import parse_config, print_config
from common.io import atomic_write_json, atomic_write_text
from common.log import setup_logging
from data_prep.gemini import load_gemini_json
from data_prep.shard_format import CASES_FILENAME, decode_sample
from data_prep.synthetic import generate
from models.attention import resolve_attn_implementation
from models.collate import TrainItem, batch_to_device, collate_train
from models.cond_names import default_cond_name_to_id
from models.kernels import liger_patch_function
from models.layer_compile import resolve_compile
from models.prefix_lm import ModelConfig, build_prefix_lm, load_tokenizer
from models.tasks import (
    IMAGE_TASKS,
    TASKS,
    TaskUnavailable,
    TokenizedExample,
    build_prompt,
    prefix_length,
    tokenize_prompt,
)
from tiny_models.lm import make_tiny_lm
from trainer.batch_tokens import AUTO_MAX_TOKENS, probe_batch_tokens
from trainer.config import TrainConfig, resolve_ds_config_path
from trainer.data import DEFAULT_AUTO_MEMORY_FRACTION, DEFAULT_BATCH_TOKENS
from trainer.distributed import init_distributed, is_initialized
from trainer.engines import build_engine
from trainer.gc_steps import StepAlignedGC

log = setup_logging("benchmarks.train_throughput")

MODE_NAMES = {1: "seed-like", 2: "padded-sdpa", 3: "packed-offshelf", 4: "project"}
# Mode 3 goes last: Liger's RoPE patch is module-level in transformers and would leak into any
# model built after it.
RUN_ORDER = (1, 2, 4, 3)
LATENT_DIM = 768
NUM_CLASSES = 20
IGNORE_INDEX = -100


@dataclass
class BenchConfig:
    """Training-throughput benchmark of the full prefix-LM step (see the module docstring)."""

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


# ---------------------------------------------------------------------------------------------
# Examples: one seeded stream of real prompts/targets that every mode consumes from the start
# ---------------------------------------------------------------------------------------------

@dataclass
class Example:
    """A tokenized example plus the image inputs the collators need."""

    tok: TokenizedExample
    latent: np.ndarray  # [768] float32
    cond_id: int

    def length(self, num_image_tokens: int) -> int:
        return (len(self.tok.prompt_ids) + len(self.tok.target_ids)
                + prefix_length(self.tok.uses_image, num_image_tokens))


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


@dataclass
class _Element:  # what an example is built from, whichever the source
    cond_name: str
    cond_id: int
    caption: str
    global_summary: str
    case_captions: Sequence[str]
    latent: Optional[np.ndarray] = None


def _elements_from_gemini(paths: Sequence[str]) -> list[_Element]:
    cases, _ = load_gemini_json(list(paths), default_cond_name_to_id(), strict=False)
    return [_Element(e.cond_name, e.cond_id, e.caption, c.global_summary, [x.caption for x in c.elements])
            for c in cases for e in c.elements]


def _elements_from_shards(shard_dir: str) -> list[_Element]:
    shards = sorted(str(p) for p in Path(shard_dir).glob("train-*.tar"))
    if not shards:
        raise FileNotFoundError(f"{shard_dir}: no train-*.tar shards")
    captions: dict[str, list[str]] = {}
    cases_file = Path(shard_dir) / CASES_FILENAME
    if cases_file.exists():
        for line in cases_file.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                captions[rec["case_id"]] = rec.get("captions", [])
    out = []
    for raw in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        s = decode_sample(raw)
        out.append(_Element(s.cond_name, s.cond_id, s.caption, s.global_summary,
                            captions.get(s.case_id, [s.caption]), s.latent.astype(np.float32)))
    return out


def _tokenize_elements(elements: list[_Element], tokenizer, cfg: BenchConfig) -> list[Example]:
    """One example per element, its task drawn from the mix (cot falls back to caption, as in
    the trainer); the latent is the shard's or a seeded random one (values don't change speed)."""
    rng = random.Random(cfg.seed)
    mix = parse_task_mix(cfg.task_mix)
    tasks, weights = list(mix), list(mix.values())
    num_image_tokens = cfg.model.num_image_tokens
    out = []
    for el in elements:
        task = rng.choices(tasks, weights)[0]
        try:
            prompt = build_prompt(task, cond_name=el.cond_name, caption=el.caption,
                                  global_summary=el.global_summary, case_captions=el.case_captions)
        except TaskUnavailable:
            prompt = build_prompt("caption", cond_name=el.cond_name, caption=el.caption)
        tok = tokenize_prompt(prompt, tokenizer, cfg.max_seq_len, num_image_tokens)
        if tok is None:
            continue
        latent = el.latent if el.latent is not None else \
            np.random.default_rng(rng.randrange(2**32)).standard_normal(LATENT_DIM).astype(np.float32)
        out.append(Example(tok, latent, el.cond_id))
    return out


def write_lengths_file(path: str, examples: list[Example]) -> None:
    atomic_write_json(path, {"examples": [
        {"task": e.tok.task, "uses_image": e.tok.uses_image, "prompt_len": len(e.tok.prompt_ids),
         "target_len": len(e.tok.target_ids)} for e in examples]})


def examples_from_lengths_file(path: str, vocab_size: int, bos_id: int, seed: int) -> list[Example]:
    """Examples of the recorded lengths with random token ids (ids don't change speed)."""
    try:
        records = json.loads(Path(path).read_text())["examples"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: expected {{'examples': [{{task, uses_image, prompt_len, "
                         f"target_len}}, ...]}} as --write-lengths writes it ({e})") from None
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(records):
        try:
            task, uses_image = r["task"], bool(r["uses_image"])
            prompt_len, target_len = int(r["prompt_len"]), int(r["target_len"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: examples[{i}] lacks or has a bad field: {e}") from None
        if task not in TASKS or prompt_len < 1 or target_len < 1:
            raise ValueError(f"{path}: examples[{i}]: bad task {task!r} or lengths {prompt_len}/{target_len}")
        ids = rng.integers(3, vocab_size, prompt_len + target_len).tolist()
        tok = TokenizedExample(task, uses_image and task in IMAGE_TASKS, [bos_id] + ids[1:prompt_len],
                               ids[prompt_len:], has_bos=True)
        out.append(Example(tok, rng.standard_normal(LATENT_DIM).astype(np.float32),
                           int(rng.integers(NUM_CLASSES))))
    return out


def example_stream(pool: list[Example], n: int, seed: int) -> list[Example]:
    """`n` examples: the pool in seeded shuffled passes, so the length mix is the pool's."""
    rng = random.Random(seed)
    out: list[Example] = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out += order
    return out[:n]


def length_stats(examples: list[Example], num_image_tokens: int) -> dict:
    lengths = [e.length(num_image_tokens) for e in examples]
    q = np.percentile(lengths, [10, 50, 90])
    tasks = {t: sum(e.tok.task == t for e in examples) for t in TASKS}
    return {"num_examples": len(lengths), "mean": round(statistics.fmean(lengths), 1),
            "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]), "max": max(lengths),
            "tasks": tasks}


def pack_groups(stream: list[Example], count: int, num_image_tokens: int, token_budget: int,
                batch_size: int) -> list[list[Example]]:
    """`count` packed rows from the stream's start: `batch_size` examples each, or as many as fit
    in `token_budget` tokens."""
    groups, i = [], 0
    while len(groups) < count:
        group, used = [], 0
        while i < len(stream):
            n = stream[i].length(num_image_tokens)
            if (batch_size > 0 and len(group) == batch_size) or (batch_size <= 0 and group and used + n > token_budget):
                break
            group.append(stream[i])
            used += n
            i += 1
        if not group:
            raise RuntimeError("example stream exhausted while packing (internal sizing error)")
        groups.append(group)
    return groups


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def lm_config(shape: str, model_dir: Path, layers: int = 0):
    """The LM's config: the tiny model dir's own, or a real shape's (its first `layers` layers if > 0)."""
    if shape == "tiny":
        return AutoConfig.from_pretrained(model_dir)
    config = shape_config(shape)
    if layers:
        config.num_hidden_layers = layers
    return config


@contextlib.contextmanager
def random_weights(device: torch.device):
    """Make `from_pretrained` build the model from its config with random weights, directly on
    `device`: there are no 7B weights here, and their values don't change speed."""
    original = PreTrainedModel.__dict__["from_pretrained"]

    def from_config(cls, path, *args, config=None, **kwargs):
        config = config or AutoConfig.from_pretrained(path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if not isinstance(dtype, torch.dtype):
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        attn = kwargs.get("attn_implementation")
        with torch.device(device):
            return cls._from_config(config, dtype=dtype, **({"attn_implementation": attn} if attn else {}))

    PreTrainedModel.from_pretrained = classmethod(from_config)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original


class BaselinePrefix(nn.Module):
    """The seed's prefix, minimally: latent -> P token embeddings, plus a class embedding."""

    def __init__(self, hidden: int, num_image_tokens: int):
        super().__init__()
        self.num_image_tokens, self.hidden = num_image_tokens, hidden
        self.proj = nn.Linear(LATENT_DIM, num_image_tokens * hidden)
        self.cls = nn.Embedding(NUM_CLASSES, hidden)

    def forward(self, latents: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        img = self.proj(latents.to(self.proj.weight.dtype)).view(-1, self.num_image_tokens, self.hidden)
        return torch.cat([img, self.cls(cond_ids)[:, None]], dim=1)


class BaselinePrefixLM(nn.Module):
    """Plain HF + PEFT prefix-LM: prefix spliced into inputs_embeds, HF's own `labels=` loss."""

    def __init__(self, lm: nn.Module, prefix: BaselinePrefix):
        super().__init__()
        self.lm, self.prefix = lm, prefix

    def forward(self, batch: dict) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(batch["input_ids"])
        if "latents" in batch:
            pre = self.prefix(batch["latents"], batch["cond_ids"]).to(emb.dtype)
            emb = emb.masked_scatter(batch["prefix_mask"][..., None], pre.reshape(-1, emb.shape[-1]))
        out = self.lm(inputs_embeds=emb, attention_mask=batch.get("attention_mask"),
                      position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
        return out.loss


def build_baseline(cfg: BenchConfig, hf_config, attn: str, device: torch.device, dtype: torch.dtype,
                   liger: bool) -> BaselinePrefixLM:
    if liger:  # the shape's architecture's patch (class-level: the model built below gets it)
        liger_patch_function(hf_config.model_type)(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                                   fused_linear_cross_entropy=True)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn, dtype=dtype)
        prefix = BaselinePrefix(hf_config.hidden_size, cfg.model.num_image_tokens).to(dtype)
    m = cfg.model
    lm = get_peft_model(lm, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                       target_modules=list(m.lora_target_modules), task_type="CAUSAL_LM"))
    return BaselinePrefixLM(lm, prefix).train()


def build_project(cfg: BenchConfig, model_dir: Path, device: torch.device):
    mcfg = replace(cfg.model, model_path=str(model_dir))
    torch.manual_seed(cfg.seed)
    with random_weights(device):
        model, tokenizer = build_prefix_lm(mcfg, latent_dim=LATENT_DIM, num_classes=NUM_CLASSES, device=device)
    return model.to(device).train(), tokenizer


# ---------------------------------------------------------------------------------------------
# Baseline batches (modes 1-3): the textbook layout, written here, independent of models.collate
# ---------------------------------------------------------------------------------------------

def _baseline_layout(ex: Example, pad_id: int, num_image_tokens: int):
    t = ex.tok
    p = prefix_length(t.uses_image, num_image_tokens)
    head, rest = (t.prompt_ids[:1], t.prompt_ids[1:]) if t.has_bos else ([], t.prompt_ids)
    ids = head + [pad_id] * p + rest + t.target_ids
    labels = [IGNORE_INDEX] * (len(ids) - len(t.target_ids)) + t.target_ids
    is_prefix = [False] * len(head) + [True] * p + [False] * (len(rest) + len(t.target_ids))
    return ids, labels, is_prefix


def baseline_batch(group: list[Example], pad_id: int, num_image_tokens: int, packed: bool,
                   pad_to: int = 0) -> dict:
    """Packed: one row, position_ids restarting per example, no attention mask (HF derives the
    document mask from position_ids). Padded: one row per example, right-padded to the longest
    (or to `pad_to`), with an attention mask."""
    rows = [_baseline_layout(e, pad_id, num_image_tokens) for e in group]
    positions = [list(range(len(r[0]))) for r in rows]
    if packed:  # concatenate the examples; positions still restart per example
        rows = [tuple(sum((r[k] for r in rows), []) for k in range(3))]
        positions = [sum(positions, [])]
    width = max(pad_to, max(len(r[0]) for r in rows))

    def pad(seqs, value):
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    batch = {"input_ids": pad([r[0] for r in rows], pad_id),
             "labels": pad([r[1] for r in rows], IGNORE_INDEX),
             "prefix_mask": pad([r[2] for r in rows], False),
             "position_ids": pad(positions, 0),
             "attention_mask": None if packed else pad([[1] * len(r[0]) for r in rows], 0)}
    img = [e for e in group if e.tok.uses_image]
    if img:
        batch["latents"] = torch.from_numpy(np.stack([e.latent for e in img]))
        batch["cond_ids"] = torch.tensor([e.cond_id for e in img])
    return batch


def project_batch(group: list[Example], pad_id: int, num_image_tokens: int) -> dict:
    items = [TrainItem(e.tok, e.latent, e.cond_id, key=f"ex{i}") for i, e in enumerate(group)]
    return collate_train(items, pad_id, num_image_tokens, packed=True)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(device: torch.device) -> dict:
    """bf16 (CUDA) / fp32 (CPU) matmul peak measured now, as the MFU denominator."""
    n, dtype, iters = (8192, torch.bfloat16, 20) if device.type == "cuda" else (512, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    dt = (time.perf_counter() - t) / iters
    return {"tflops": round(2 * n**3 / dt / 1e12, 3), "gemm": f"{n}^3 {str(dtype).split('.')[-1]}"}


def doc_lengths(group: list[Example], num_image_tokens: int) -> list[int]:
    return [e.length(num_image_tokens) for e in group]


def step_flops(lengths: list[int], n_params: int, layers: int, hidden: int, checkpointing: float) -> float:
    """`checkpointing`: the fraction of decoder layers recomputed in backward (bool = all/none)."""
    c = float(checkpointing)
    linear = (4 + 2 * c) * n_params * sum(lengths)
    attention = (6 + 2 * c) * layers * hidden * sum(n * n for n in lengths)
    return float(linear + attention)


FLOPS_FORMULA = ("model FLOPs/step = 4*N*real_tokens + 6*layers*hidden*sum(n_i^2) "
                 "((4+2c)*N and (6+2c)*... when a fraction c of the layers is recomputed in backward); N = all parameters incl. LoRA and "
                 "prefix, n_i = real tokens of example i; padding not counted")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, **fused)


def train_step(loss_fn: Callable[[dict], torch.Tensor], opt: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    loss = loss_fn(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def torch_stepper(loss_fn: Callable[[dict], torch.Tensor], opt: torch.optim.Optimizer) -> Callable[[dict], torch.Tensor]:
    return lambda batch: train_step(loss_fn, opt, batch)


class PhaseTimer:
    """Where a step's time goes, without syncing: host time to issue each phase (perf_counter) and
    device time between the phase's markers (CUDA events, read after the final sync). The host may
    run ahead in one phase and spend its lead in the next (a full launch queue blocks it), so the
    step's totals decide: host below device = GPU-bound; equal = the GPU waited for the Python, or the
    step synchronises with the device (DeepSpeed's overflow check: its step phase then shows host time
    far above device time; `--sync-debug` lists such points). To tell those two apart, `issue` sums
    the phases that issue the model's work (forward, backward): host below device there, with the
    totals equal, means the host ran ahead of the device and then waited for it in the step."""

    PHASES = ("forward", "backward", "step")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = {p: [] for p in self.PHASES}
        self.events: list[list] = []
        self.enabled = False

    def mark(self):
        if not self.enabled:
            return None
        t = time.perf_counter()
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return t, e
        return t, None

    def add(self, marks: list) -> None:
        if not self.enabled:
            return
        for phase, (a, b) in zip(self.PHASES, zip(marks, marks[1:])):
            self.host[phase].append(1000 * (b[0] - a[0]))
        if self.cuda:
            self.events.append([m[1] for m in marks])

    def summary(self) -> dict:
        out = {}
        for i, phase in enumerate(self.PHASES):
            h = self.host[phase]
            if not h:
                continue
            row = {"host_ms": round(statistics.fmean(h), 2)}
            if self.events:
                row["device_ms"] = round(statistics.fmean(ev[i].elapsed_time(ev[i + 1]) for ev in self.events), 2)
            out[phase] = row
        if out and all("device_ms" in r for r in out.values()):
            # Per phase, the host may run ahead in one (forward) and spend the lead in the next; the
            # whole step says who waits: host below device = the GPU is the bottleneck.
            host, device = sum(r["host_ms"] for r in out.values()), sum(r["device_ms"] for r in out.values())
            out["step_total"] = {"host_ms": round(host, 2), "device_ms": round(device, 2),
                                 "gpu_bound": host < device}
            if "forward" in out and "backward" in out:
                host = out["forward"]["host_ms"] + out["backward"]["host_ms"]
                device = out["forward"]["device_ms"] + out["backward"]["device_ms"]
                out["issue"] = {"host_ms": round(host, 2), "device_ms": round(device, 2), "gpu_bound": host < device}
        return out


def bound_label(phases: dict) -> str:
    """Who waits, in words, from PhaseTimer.summary()."""
    total, issue = phases["step_total"], phases.get("issue")
    if total["gpu_bound"]:
        return "GPU-bound"
    if issue and issue["gpu_bound"]:
        wait = phases["step"]["host_ms"] - phases["step"]["device_ms"]
        return (f"GPU-bound while issuing (forward + backward: host {issue['host_ms']:.1f} < device "
                f"{issue['device_ms']:.1f} ms), then the step waits ~{wait:.0f} ms for the device (a sync in it)")
    return "host-bound"


def engine_stepper(engine, timer: PhaseTimer) -> Callable[[dict], torch.Tensor]:
    """The trainer's step (trainer.train): engine.forward -> engine.backward -> engine.step
    (which applies the update at the end of each gradient-accumulation window), timed by phase
    while `timer` is enabled."""
    def step(batch: dict) -> torch.Tensor:
        start = timer.mark()
        loss = engine.forward(batch).loss
        forward_done = timer.mark()
        engine.backward(loss)
        backward_done = timer.mark()
        engine.step()
        timer.add([start, forward_done, backward_done, timer.mark()])
        return loss.detach()

    return step


def gpu_state(device: torch.device) -> dict | None:
    """SM clock, temperature and power of the GPU (NVML through torch; None where unavailable): a
    mode timed on a hot, clock-throttled GPU after a heavy one is slower for reasons of its own."""
    if device.type != "cuda":
        return None
    out = {}
    for key, fn in (("sm_clock_mhz", torch.cuda.clock_rate), ("temperature_c", torch.cuda.temperature),
                    ("power_w", lambda d: torch.cuda.power_draw(d) / 1000)):
        try:
            out[key] = round(float(fn(device)), 1)
        except Exception:  # noqa: BLE001 - pynvml missing or the query unsupported
            out[key] = None
    return out


def time_mode(step: Callable[[dict], torch.Tensor], batches: list[dict], groups: list[list[Example]],
              cfg: BenchConfig, device: torch.device, desc: str, timer: PhaseTimer | None = None) -> dict:
    """Warm-up steps, then timed steps between two device syncs. Batches are on the device
    already, so the time is the step's alone (the trainer's loader prefetches them too)."""
    w = cfg.warmup_steps
    step_gc = StepAlignedGC(cfg.gc_interval_steps)
    try:
        def gc_step(i: int, b: dict) -> torch.Tensor:
            loss = step(b)
            step_gc.step(i + 1)
            return loss

        for i, b in enumerate(tqdm(batches[:w], desc=f"{desc} warm-up", leave=False, disable=None)):
            gc_step(i, b)
        synchronize(device)
        gpu_before = gpu_state(device)
        if timer:
            timer.enabled = True
        t0 = time.perf_counter()
        losses = [gc_step(w + i, b) for i, b in enumerate(tqdm(batches[w:], desc=desc, leave=False, disable=None))]
        synchronize(device)
        seconds = time.perf_counter() - t0
        gpu_after = gpu_state(device)
    finally:
        step_gc.close()
        if timer:
            timer.enabled = False
    timed = groups[w:]
    n_img = cfg.model.num_image_tokens
    real = sum(sum(doc_lengths(g, n_img)) for g in timed)
    slots = sum(int(b["input_ids"].numel()) for b in batches[w:])
    return {"seconds": seconds, "ms_per_step": 1000 * seconds / len(timed), "real_tokens": real,
            "tokens_per_s": real / seconds, "pad_fraction": 1 - real / slots,
            "slots_per_step": slots / len(timed),
            "examples_per_step": statistics.fmean(len(g) for g in timed),
            "loss_last": float(losses[-1].float()), "loss_finite": all(bool(torch.isfinite(x)) for x in losses),
            **({"phases": timer.summary()} if timer else {}),
            **({"gpu_before": gpu_before, "gpu_after": gpu_after} if gpu_before is not None else {})}


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------

@dataclass
class Context:
    cfg: BenchConfig
    device: torch.device
    dtype: torch.dtype
    hf_config: object
    model_dir: Path
    pad_id: int
    stream: list[Example]
    peak_tflops: float

    @property
    def n_steps(self) -> int:
        return self.cfg.warmup_steps + self.cfg.steps


def _finish(ctx: Context, result: dict, groups: list[list[Example]], n_params: int, checkpointing: float) -> dict:
    cfg, hf = ctx.cfg, ctx.hf_config
    timed = groups[cfg.warmup_steps:]
    flops = sum(step_flops(doc_lengths(g, cfg.model.num_image_tokens), n_params, hf.num_hidden_layers,
                           hf.hidden_size, checkpointing) for g in timed)
    tflops = flops / result["seconds"] / 1e12
    result.update(params=n_params, activation_checkpointing=checkpointing, tflops=tflops,
                  mfu=tflops / ctx.peak_tflops,
                  peak_gib=(torch.cuda.max_memory_allocated(ctx.device) / 2**30
                            if ctx.device.type == "cuda" else None))
    return result


def run_baseline_mode(ctx: Context, attn: str, batch_size: int, packed: bool, pad_to: int,
                      liger: bool, model=None) -> tuple[dict, nn.Module]:
    cfg, n_img = ctx.cfg, ctx.cfg.model.num_image_tokens
    if packed:
        groups = pack_groups(ctx.stream, ctx.n_steps, n_img, cfg.fixed_budget, cfg.batch_size)
    else:
        groups = [ctx.stream[i * batch_size:(i + 1) * batch_size] for i in range(ctx.n_steps)]
    batches = [batch_to_device(baseline_batch(g, ctx.pad_id, n_img, packed, pad_to), ctx.device)
               for g in groups]
    model = model or build_baseline(cfg, ctx.hf_config, attn, ctx.device, ctx.dtype, liger)
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, ctx.device)
    try:
        result = time_mode(torch_stepper(model, opt), batches, groups, cfg, ctx.device, f"{attn} b{batch_size}")
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
    return _finish(ctx, result, groups, n_params, checkpointing=False), model


def mode_seed_like(ctx: Context) -> dict:
    free_memory(ctx.device)
    r, model = run_baseline_mode(ctx, "eager", 1, packed=False, pad_to=ctx.cfg.max_seq_len, liger=False)
    del model
    return dict(r, label=f"batch 1, padded to {ctx.cfg.max_seq_len}, eager attention, HF loss")


def mode_padded_sdpa(ctx: Context) -> dict:
    """The fastest of the batch sizes that fit (one model, rebuilt batches per size)."""
    free_memory(ctx.device)
    model, tries, best = None, [], None
    for bs in ctx.cfg.padded_batch_sizes:
        try:
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            r, model = run_baseline_mode(ctx, "sdpa", bs, packed=False, pad_to=0, liger=False, model=model)
            tries.append({"batch_size": bs, "tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"]})
            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                best = dict(r, batch_size=bs)
        except Exception as e:  # noqa: BLE001 - an OOM ends the search, anything else is a failure
            if not is_oom(e):
                raise
            tries.append({"batch_size": bs, "error": "OOM"})
            if model is not None:
                model.zero_grad(set_to_none=True)
            free_memory(ctx.device)
            break
    del model
    if best is None:
        raise RuntimeError(f"no batch size of {ctx.cfg.padded_batch_sizes} fits")
    return dict(best, tries=tries,
                label=f"padded to the longest, batch {best['batch_size']} (best of {ctx.cfg.padded_batch_sizes}), SDPA, HF loss")


def _liger_importable() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def mode_packed_offshelf(ctx: Context) -> dict:
    free_memory(ctx.device)
    liger = ctx.device.type == "cuda" and _liger_importable()
    attn = ctx.cfg.baseline_attn
    r, model = run_baseline_mode(ctx, attn, 0, packed=True, pad_to=0, liger=liger)
    del model
    what = ("+ Liger (RoPE, RMSNorm, SwiGLU, fused linear CE)" if liger else
            "WITHOUT Liger (" + ("not importable" if ctx.device.type == "cuda" else "CPU: Liger is CUDA-only") + ")")
    return dict(r, liger=liger, label=f"packed rows ({_packing_desc(ctx.cfg)}), stock HF {attn} with a "
                                      f"document mask from position_ids, {what}")


def _packing_desc(cfg: BenchConfig) -> str:
    return f"{cfg.batch_size} examples/row" if cfg.batch_size > 0 else f"<= {cfg.fixed_budget} tokens/row"


def mode_project(ctx: Context) -> dict:
    free_memory(ctx.device)
    cfg, n_img = ctx.cfg, ctx.cfg.model.num_image_tokens
    model, _ = build_project(cfg, ctx.model_dir, ctx.device)
    budget, probe = cfg.fixed_budget, None
    if cfg.auto_budget and ctx.device.type == "cuda":
        probe = probe_batch_tokens(model, seq_len=cfg.max_seq_len, num_image_tokens=n_img, latent_dim=LATENT_DIM,
                                   vocab_size=ctx.hf_config.vocab_size, pad_id=ctx.pad_id, device=ctx.device,
                                   dtype=ctx.dtype, memory_fraction=cfg.auto_memory_fraction)
        budget = probe.tokens
        free_memory(ctx.device)
    groups = pack_groups(ctx.stream, ctx.n_steps, n_img, budget, cfg.batch_size)
    batches = [batch_to_device(project_batch(g, ctx.pad_id, n_img), ctx.device) for g in groups]
    n_params = sum(p.numel() for p in model.parameters())
    engine_name = resolve_step_engine(cfg.step_engine)
    engine = build_bench_engine(model, cfg, ctx, engine_name)
    timer = PhaseTimer(ctx.device)
    step = engine_stepper(engine, timer)
    result = time_mode(step, batches, groups, cfg, ctx.device, "project", timer)
    ckpt_layers = _checkpointed_layers(cfg.model, ctx.hf_config.num_hidden_layers)
    result = _finish(ctx, result, groups, n_params, checkpointing=ckpt_layers / ctx.hf_config.num_hidden_layers)
    result["packed_vs_padded_loss_diff"] = packed_vs_padded(model, groups[0], ctx)
    if cfg.profile:
        result["profile"] = profile_steps(step, batches[:3], ctx)
    if cfg.sync_debug:
        result["sync_points"] = sync_points(step, batches[:2], ctx)
    backend = resolve_attn_implementation(cfg.model.attn_implementation, ctx.device)
    loss_impl = model.loss_impl
    compiled = resolve_compile(cfg.model.compile, ctx.device)
    lora_dtype = next((str(p.dtype).split(".")[-1] for n, p in model.named_parameters() if "lora_A" in n), None)
    result.update(token_budget=budget, token_budget_probe=probe.record() if probe else None)
    zero = int(engine.ds.zero_optimization_stage()) if engine_name == "deepspeed" else None
    result.update(attn_implementation=backend, fused_kernels=loss_impl, compiled=compiled, step_engine=engine_name,
                  zero_stage=zero,
                  flat_lora=engine.flat_lora is not None,
                  fused_lora=cfg.model.fused_lora, lora_dtype=lora_dtype, checkpointed_layers=ckpt_layers,
                  label=f"build_prefix_lm + collate_train packed (<= {budget} tokens/row{' (probed)' if probe else ''}"
                        f"{f', {cfg.batch_size} examples/row' if cfg.batch_size > 0 else ''}), attention "
                        f"{backend!r}, kernels {loss_impl!r}{', compiled layers' if compiled else ''}, LoRA {lora_dtype}"
                        f"{' fused' if cfg.model.fused_lora else ''} dropout {cfg.model.lora_dropout}, "
                        + (f"DeepSpeed ZeRO-{zero} engine" if engine_name == "deepspeed" else "torch engine")
                        + " (the trainer's step)"
                        + (f", {cfg.grad_accum} micro-batches per optimizer step" if cfg.grad_accum > 1 else "")
                        + (f", activation checkpointing of {ckpt_layers} layers" if ckpt_layers else ""))
    model.zero_grad(set_to_none=True)
    del model, engine, step, batches
    return result


def resolve_step_engine(name: str) -> str:
    if name == "torch":
        return "torch"
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        if name == "deepspeed":
            raise
        return "torch"
    return "deepspeed"


def build_bench_engine(model: nn.Module, cfg: BenchConfig, ctx: "Context", engine: str = "deepspeed"):
    """`trainer.engines.build_engine` exactly as `trainer.train` calls it, in a 1-process world."""
    if engine == "deepspeed" and not is_initialized():  # the torch engine needs no process group alone
        init_distributed(timeout_s=600)
    if engine == "deepspeed":  # a group made earlier in this process may have left no env behind
        os.environ.setdefault("LOCAL_RANK", "0")
    ds_path = cfg.deepspeed_config
    if cfg.ds_override:
        merged = _merge(json.loads(resolve_ds_config_path(ds_path).read_text()), json.loads(cfg.ds_override))
        ds_path = str(Path(tempfile.mkdtemp(prefix="ds_config_")) / "ds_config.json")
        atomic_write_json(ds_path, merged)
    tcfg = TrainConfig(model=replace(cfg.model, model_path=str(ctx.model_dir)), deepspeed=ds_path, seed=cfg.seed,
                       engine=engine)
    tcfg.optim.gradient_accumulation_steps = cfg.grad_accum
    return build_engine(model, tcfg, total_steps=ctx.n_steps + 3, device=ctx.device)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _checkpointed_layers(m: ModelConfig, num_layers: int) -> int:
    if not m.gradient_checkpointing:
        return 0
    return num_layers if m.gradient_checkpointing_layers < 0 else min(m.gradient_checkpointing_layers, num_layers)


@torch.no_grad()
def packed_vs_padded(model, group: list[Example], ctx: Context) -> float:
    """|loss(packed row) - loss(same examples padded)|: ~0 (fp32) iff attention stops at example
    boundaries. In bf16 expect ~1e-2 of rounding; crossing boundaries shows as a larger gap."""
    items = [TrainItem(e.tok, e.latent, e.cond_id, key=f"ex{i}") for i, e in enumerate(group)]
    n_img = ctx.cfg.model.num_image_tokens
    losses = [float(model(batch_to_device(collate_train(items, ctx.pad_id, n_img, packed=p), ctx.device)).loss)
              for p in (True, False)]
    return abs(losses[0] - losses[1])


def profile_steps(step: Callable[[dict], torch.Tensor], batches: list[dict], ctx: Context) -> dict:
    """torch.profiler over a few steps: the top ops by self device time and by self host time, and
    how busy the device was (sum of kernel times / wall time; < 1 means it waited for the host)."""
    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(ctx.device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for b in batches:
            step(b)
        synchronize(ctx.device)
    wall_us = (time.perf_counter() - t0) * 1e6

    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    tables = f"# mode 4, {len(batches)} steps, sorted by {sort}\n{events.table(sort_by=sort, row_limit=30)}\n"
    if cuda:
        tables += f"\n# sorted by self_cpu_time_total (host work)\n{events.table(sort_by='self_cpu_time_total', row_limit=30)}\n"
    total = sum(getattr(e, sort) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, sort), reverse=True)[:25]
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    busy = (kernel_us / wall_us) if cuda else None  # kernels of one stream rarely overlap here
    path = (Path(ctx.cfg.out).with_suffix(".profile.txt") if ctx.cfg.out
            else Path(tempfile.gettempdir()) / "train_throughput.profile.txt")
    atomic_write_text(path, tables + (f"\ndevice busy: {busy:.1%} of {wall_us / 1000:.1f} ms wall (profiled)\n" if cuda else ""))
    return {"file": str(path), "sorted_by": sort, "steps": len(batches),
            "device_busy_fraction": None if busy is None else round(busy, 4),
            "top": [{"name": e.key, "self_ms": round(getattr(e, sort) / 1000 / len(batches), 3),
                     "share": round(getattr(e, sort) / total, 4), "calls": e.count} for e in top]}


def sync_points(step: Callable[[dict], torch.Tensor], batches: list[dict], ctx: Context) -> dict:
    """Every host<->device synchronisation inside a few steps, grouped by where the project's code
    (not torch's) issued it: torch reports each one as a warning in sync-debug mode."""
    if ctx.device.type != "cuda":
        return {"skipped": "sync debug mode needs CUDA"}
    seen: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and "/warnings.py" not in f.filename][-5:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        seen[(str(message).splitlines()[0][:100], where)] += 1

    synchronize(ctx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for b in batches:
                step(b)
            synchronize(ctx.device)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    rows = [{"per_step": n / len(batches), "what": what, "where": where} for (what, where), n in seen.most_common()]
    path = (Path(ctx.cfg.out).with_suffix(".syncs.txt") if ctx.cfg.out
            else Path(tempfile.gettempdir()) / "train_throughput.syncs.txt")
    atomic_write_text(path, "".join(f"{r['per_step']:6.1f}/step  {r['what']}\n        {r['where']}\n" for r in rows))
    return {"file": str(path), "steps": len(batches), "per_step": sum(seen.values()) / len(batches), "points": rows}


MODES: dict[int, Callable[[Context], dict]] = {1: mode_seed_like, 2: mode_padded_sdpa,
                                               3: mode_packed_offshelf, 4: mode_project}


# ---------------------------------------------------------------------------------------------
# Setup, report, main
# ---------------------------------------------------------------------------------------------

def prepare_model_dir(cfg: BenchConfig, workdir: Path, corpus_json: Sequence[str]) -> Path:
    """A model dir `build_prefix_lm` can read: the tiny LM + its tokenizer; for a real shape, the same
    dir with that shape's config.json (weights are then built randomly by `random_weights`)."""
    model_dir = make_tiny_lm(workdir / "lm", corpus_json=list(corpus_json) or None,
                             corpus_texts=None if corpus_json else ["The image is a map."], seed=cfg.seed)
    if cfg.shape != "tiny":
        for f in model_dir.glob("*.safetensors"):
            f.unlink()  # never read: random_weights builds from the config
        lm_config(cfg.shape, model_dir, cfg.layers).save_pretrained(model_dir)
    return Path(model_dir)


def load_examples(cfg: BenchConfig, workdir: Path) -> tuple[list[Example], Path, object]:
    """(example pool, model dir, tokenizer)."""
    corpus: list[str] = list(cfg.gemini_json)
    if not (cfg.gemini_json or cfg.shard_dir or cfg.lengths_file):
        log.info("generating %d synthetic cases for the length mix", cfg.synthetic_cases)
        corpus = [str(p) for p in generate(workdir / "synthetic", num_cases=cfg.synthetic_cases,
                                           num_files=1, seed=cfg.seed, image_px=32)]
    model_dir = prepare_model_dir(cfg, workdir, corpus)
    tokenizer = load_tokenizer(cfg.tokenizer or model_dir)
    if cfg.lengths_file:
        vocab = min(len(tokenizer), lm_config(cfg.shape, model_dir, cfg.layers).vocab_size)
        pool = examples_from_lengths_file(cfg.lengths_file, vocab, tokenizer.bos_token_id or 1, cfg.seed)
    else:
        elements = _elements_from_shards(cfg.shard_dir) if cfg.shard_dir else _elements_from_gemini(corpus)
        pool = _tokenize_elements(elements, tokenizer, cfg)
    if not pool:
        raise ValueError("no usable examples (all dropped by truncation?)")
    return pool, model_dir, tokenizer


def stream_size(cfg: BenchConfig, pool: list[Example]) -> int:
    """Enough examples for the largest consumer (mode 2's biggest batch or a packed mode)."""
    n_steps = cfg.warmup_steps + cfg.steps
    mean_len = statistics.fmean(e.length(cfg.model.num_image_tokens) for e in pool)
    budget = AUTO_MAX_TOKENS if cfg.auto_budget else cfg.fixed_budget
    per_row = cfg.batch_size if cfg.batch_size > 0 else math.ceil(budget / max(1.0, min(
        e.length(cfg.model.num_image_tokens) for e in pool)))
    return n_steps * max(max(cfg.padded_batch_sizes), per_row, 1) + int(mean_len)


def environment(device: torch.device) -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "device": str(device),
           "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for mod in ("transformers", "peft", "liger_kernel", "flash_attn", "triton"):
        try:
            env[mod] = getattr(importlib.import_module(mod), "__version__", "yes")
        except Exception as e:  # noqa: BLE001 - report, whatever the reason
            env[mod] = f"no ({type(e).__name__})"
    return env


def ratios(results: dict) -> dict:
    ok = {m: r for m, r in results.items() if "tokens_per_s" in r}
    return {f"4/{b}": ok[4]["tokens_per_s"] / ok[b]["tokens_per_s"] for b in (1, 2, 3) if 4 in ok and b in ok}


def markdown_table(results: dict, ratio: dict, peak: dict) -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["| mode | configuration | ex/step | ms/step | real tok/s | pad % | TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in sorted(results):
        r = results[m]
        if "error" in r:
            lines.append(f"| {m} {MODE_NAMES[m]} | FAILED: {r['error'][:120]} | | | | | | | |")
            continue
        lines.append(f"| {m} {MODE_NAMES[m]} | {r['label']} | {r['examples_per_step']:.1f} | "
                     f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['pad_fraction']:.0f} | "
                     f"{r['tflops']:.4g} | {100 * r['mfu']:.1f}% | {f(r['peak_gib'], '.1f')} |")
    lines.append("")
    for m in sorted(results):
        phases = results[m].get("phases")
        if phases:
            lines.append(f"mode {m} per step, host time to issue / device time between markers (ms): " + ", ".join(
                f"{k} {v['host_ms']:.1f}" + (f" / {v['device_ms']:.1f}" if "device_ms" in v else "")
                for k, v in phases.items() if k != "issue") + (
                f" -> {bound_label(phases)}" if "step_total" in phases else ""))
        if results[m].get("gpu_after"):
            b, a = results[m]["gpu_before"], results[m]["gpu_after"]
            lines.append(f"mode {m} GPU before / after the timed steps: SM {b['sm_clock_mhz']} / {a['sm_clock_mhz']} MHz, "
                         f"{b['temperature_c']} / {a['temperature_c']} C, {b['power_w']} / {a['power_w']} W")
        busy = results[m].get("profile", {}).get("device_busy_fraction")
        if busy is not None:
            lines.append(f"mode {m} device busy (profiled steps): {100 * busy:.1f}%")
    lines.append("ratios (real tokens/s): " + (", ".join(f"{k} = {v:.2f}x" for k, v in ratio.items()) or "–"))
    lines.append(f"MFU against the measured matmul peak: {peak['tflops']:.4g} TFLOP/s ({peak['gemm']})")
    lines.append(FLOPS_FORMULA)
    return "\n".join(lines)


def run_mode(m: int, ctx: Context) -> dict:
    try:
        return MODES[m](ctx)
    except Exception as e:  # noqa: BLE001 - one failed mode must not hide the others
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def run_mode_isolated(m: int, ctx: Context) -> dict:
    """`run_mode` in a fresh (spawned) process: every mode starts from the same state, whatever ran
    before it, so leftover process state (allocator, caches, compiled kernels) cannot explain a gap
    between modes (README.md's Performance section discusses an order effect that remains even so)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_mode, (m, ctx))


def run(cfg: BenchConfig) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        pool, model_dir, tokenizer = load_examples(cfg, Path(tmp))
        if cfg.write_lengths:
            write_lengths_file(cfg.write_lengths, pool)
            log.info("wrote %d example lengths to %s: %s", len(pool), cfg.write_lengths,
                     length_stats(pool, cfg.model.num_image_tokens))
            return {"lengths_file": cfg.write_lengths, "lengths": length_stats(pool, cfg.model.num_image_tokens)}
        hf_config = lm_config(cfg.shape, model_dir, cfg.layers)
        if len(tokenizer) > hf_config.vocab_size:
            raise ValueError(f"tokenizer {cfg.tokenizer!r} has {len(tokenizer)} tokens, more than the "
                             f"{cfg.shape} model's vocab ({hf_config.vocab_size}): write its lengths with "
                             f"--write-lengths and run with --lengths-file instead")
        peak = measure_peak_tflops(device)
        ctx = Context(cfg, device, dtype, hf_config, model_dir, tokenizer.pad_token_id,
                      example_stream(pool, stream_size(cfg, pool), cfg.seed), peak["tflops"])
        log.info("device %s, peak %.1f TFLOP/s, lengths %s", device, peak["tflops"],
                 length_stats(pool, cfg.model.num_image_tokens))
        results: dict[int, dict] = {}
        isolate = cfg.isolate_modes == "on" or (cfg.isolate_modes == "auto" and device.type == "cuda")
        for m in [m for m in RUN_ORDER if m in cfg.modes]:
            log.info("mode %d (%s)%s ...", m, MODE_NAMES[m], " in a fresh process" if isolate else "")
            results[m] = run_mode_isolated(m, ctx) if isolate else run_mode(m, ctx)
            if "error" not in results[m]:
                log.info("mode %d: %.0f real tokens/s", m, results[m]["tokens_per_s"])
            free_memory(device)
    ratio = ratios(results)
    report = {"config": asdict(cfg), "env": environment(device), "peak_matmul": peak,
              "flops_formula": FLOPS_FORMULA, "lengths": length_stats(pool, cfg.model.num_image_tokens),
              "modes": {str(m): dict(results[m], name=MODE_NAMES[m]) for m in sorted(results)},
              "ratios": ratio, "markdown": markdown_table(results, ratio, peak)}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(BenchConfig, argv)
    print_config(cfg)
    report = run(cfg)
    if "markdown" not in report:  # --write-lengths: nothing was timed
        return 0
    print(report["markdown"], flush=True)
    if cfg.out:
        atomic_write_json(cfg.out, report)
        log.info("wrote %s", cfg.out)
    return 0 if all("error" not in r for r in report["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
