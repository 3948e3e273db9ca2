"""Parameter-sharded training benchmark (issue #17): the trainer's engine on N GPUs, one process each.

Runs the project's model build and the trainer's engine step (engine.forward -> backward -> step,
as trainer.train does) on random weights of a real shape, with packed batches of synthetic
examples (token ids don't change speed), and reports per GPU: tokens/s, MFU and peak memory.

    # (a) full fine-tune of the 7B shape: FSDP2 vs ZeRO-3 vs ZeRO-2 (the engine and its DeepSpeed
    #     config pass through, so the same code path times every engine)
    torchrun --nproc-per-node 2 -m benchmarks.sharding --shape 7b --mode full --engine fsdp2 --out f.json
    torchrun --nproc-per-node 2 -m benchmarks.sharding --shape 7b --mode full --engine deepspeed \\
        --deepspeed ds_configs/zero3.json --out z3.json
    # (b) LoRA on a Llama-3-70B-shaped base: its random weights are made shard by shard on the GPUs
    #     (meta-device model, fully_shard, to_empty, then each rank fills its own shards), never whole
    torchrun --nproc-per-node 2 -m benchmarks.sharding --shape llama3-70b --mode lora --engine fsdp2 --out l70.json
    # CPU smoke (gloo): torchrun --nproc-per-node 2 -m benchmarks.sharding --shape tiny --steps 1 --warmup-steps 1

Model FLOPs per token (the issue's convention): 6 N for full fine-tuning (forward 2N, activation and
weight gradients 4N), 4 N for LoRA (the frozen base gets no weight gradients), N = all parameters;
the re-computation of activation checkpointing is not counted (MFU, not hardware utilisation).
`mfu_with_attention` adds the attention matmuls, 6 * layers * hidden * sum(n_i^2) per row of
documents n_i (QK^T and PV, causal half, backward twice the forward). The peak is an 8192^3 bf16
GEMM measured on each GPU in the same run (`--peak-tflops` overrides it, e.g. the datasheet's).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from benchmarks.make_random_model import mistral_7b_shape_config
from benchmarks.throughput.timing import measure_peak_tflops, synchronize
from common.config import parse_config, print_config
from common.io import atomic_write_json
from common.log import setup_logging
from common.runtime import resolve_device, resolve_dtype, resolve_precision
from models.collate import TrainItem, collate_train
from models.prefix_lm import meta_prefix_lm, wrap_lm
from models.tasks import TokenizedExample
from trainer.config import TrainConfig, replace
from trainer.distributed import init_distributed
from trainer.engines import build_engine
from trainer.engines.fsdp2_engine import FSDP2Engine

log = setup_logging("benchmarks.sharding")

LATENT_DIM = 768
NUM_CLASSES = 20


def llama3_70b_shape_config() -> LlamaConfig:
    """Llama-3-70B shape: 8192 hidden, 80 layers, 28672 MLP, 64 heads / 8 KV heads, theta 5e5, vocab 128256."""
    return LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_shape_config() -> MistralConfig:
    """A few-layer Mistral for the CPU smoke test of this code path."""
    return MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=None)


SHAPES = {"tiny": tiny_shape_config, "7b": mistral_7b_shape_config, "llama3-70b": llama3_70b_shape_config}


@dataclass
class ShardingBenchConfig:
    """The trainer's engine step on N GPUs (torchrun): full fine-tune or LoRA, FSDP2 / ZeRO-3 / ZeRO-2;
    tokens/s per GPU, MFU, peak memory (see the module docstring)."""

    shape: Literal["tiny", "7b", "llama3-70b"] = field(default="7b", metadata={"help": "model shape (random weights)"})
    mode: Literal["full", "lora"] = field(default="lora", metadata={"help": "full fine-tune (--no-use-lora) or LoRA"})
    engine: Literal["fsdp2", "deepspeed", "torch"] = field(default="fsdp2", metadata={"help": "the trainer's --engine"})
    deepspeed: str = field(default="ds_configs/zero2.json", metadata={
        "help": "--engine deepspeed: its config (ds_configs/zero2.json, ds_configs/zero3.json, ...)"})
    tokens_per_gpu: int = field(default=8192, metadata={"help": "tokens per micro-batch per GPU (one packed row)"})
    example_len: int = field(default=512, metadata={"help": "tokens per example (image prefix + prompt + target)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_steps: int = field(default=2, metadata={"help": "optimizer steps before timing"})
    steps: int = field(default=5, metadata={"help": "timed optimizer steps"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "activation checkpointing per decoder layer"})
    gradient_checkpointing_layers: int = field(default=-1, metadata={
        "help": "with --gradient-checkpointing: recompute only the first N layers (-1 = all)"})
    cpu_offload: bool = field(default=False, metadata={"help": "--engine fsdp2: --fsdp-cpu-offload"})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (alpha = 2r), on all seven projections"})
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={"help": "auto: bf16 on GPU, fp32 on CPU"})
    attn_implementation: str = field(default="auto", metadata={"help": "the trainer's --attn-implementation"})
    fused_kernels: str = field(default="auto", metadata={"help": "the trainer's --fused-kernels"})
    peak_tflops: float = field(default=0.0, metadata={"help": "MFU denominator per GPU (0 = measure a bf16 GEMM)"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic batches"})
    out: str = field(default="", metadata={"help": "JSON result file (rank 0 writes it)"})

    def validate(self) -> None:
        if self.example_len < 16 or self.tokens_per_gpu < self.example_len:
            raise ValueError("--example-len must be >= 16 and <= --tokens-per-gpu")
        if self.steps < 1 or self.warmup_steps < 0 or self.grad_accum < 1:
            raise ValueError("--steps >= 1, --warmup-steps >= 0, --grad-accum >= 1")
        if self.shape == "llama3-70b" and self.engine != "fsdp2":
            raise ValueError("--shape llama3-70b needs --engine fsdp2 (no other engine builds it without a whole copy)")


def init_process_group(engine: str) -> tuple[int, int, torch.device]:
    """torchrun's layout; DeepSpeed's own init for its engine, a plain process group otherwise
    (so an FSDP2 run needs no DeepSpeed installed)."""
    if dist.is_initialized():  # e.g. a test's 1-process group
        return dist.get_rank(), dist.get_world_size(), resolve_device(None)
    if engine == "deepspeed":
        info = init_distributed()
        return info.rank, info.world_size, info.device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def train_config(cfg: ShardingBenchConfig) -> TrainConfig:
    model = {"model_path": "", "use_lora": cfg.mode == "lora", "lora_r": cfg.lora_r, "lora_alpha": 2 * cfg.lora_r,
             "lora_dropout": 0.0, "precision": cfg.precision, "gradient_checkpointing": cfg.gradient_checkpointing,
             "gradient_checkpointing_layers": cfg.gradient_checkpointing_layers,
             "attn_implementation": cfg.attn_implementation, "fused_kernels": cfg.fused_kernels}
    return replace(TrainConfig(), model=model, engine=cfg.engine, deepspeed=cfg.deepspeed,
                   fsdp_cpu_offload=cfg.cpu_offload,
                   optim={"lr": 1e-5, "warmup_ratio": 0.0, "gradient_accumulation_steps": cfg.grad_accum})


@torch.no_grad()
def random_shards(model: torch.nn.Module, names: list[str]) -> None:
    """Random base weights, made by each rank for its own shards only, on its device."""
    params = dict(model.named_parameters())
    for n in names:
        p = params[n]
        local = p.to_local() if isinstance(p, DTensor) else p
        if n.endswith("norm.weight"):
            local.fill_(1.0)
        else:
            local.normal_(0.0, 0.02)


@torch.no_grad()
def check_base_filled(model: torch.nn.Module) -> None:
    """Refuse to time a model whose base LM weights (this rank's shards) are all zero: its logits are
    0, its loss is ln(vocab) at every step and its GEMMs run on zeros. (ZeRO-3 keeps its partitions
    outside the parameters, which are then empty here: nothing to check.)"""
    seen = False
    for name, p in model.named_parameters():
        if "lora_" in name or name.startswith("prefix."):
            continue
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.numel() and not local.is_meta:
            seen = True
            if bool(local.abs().max() > 0):
                return
    if seen:
        raise RuntimeError("every base LM weight of this rank is zero: the random shards were not written into "
                           "the weights the engine computes with")


def build(cfg: ShardingBenchConfig, tcfg: TrainConfig, device: torch.device, total_steps: int):
    """(engine, the model's parameter count N, layers, hidden)."""
    hf = SHAPES[cfg.shape]()
    torch.manual_seed(cfg.seed)
    if cfg.engine == "fsdp2":
        model = meta_prefix_lm(hf, tcfg.model, LATENT_DIM, NUM_CLASSES, device=device)
        n_params = sum(p.numel() for p in model.parameters())  # before sharding: the whole model's
        precision = resolve_precision(cfg.precision, device)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        engine = FSDP2Engine(model, tcfg, total_steps, device, dtype, meta_init=random_shards)
    else:
        with torch.device(device):
            lm = AutoModelForCausalLM.from_config(hf, dtype=resolve_dtype(cfg.precision, device),
                                                  attn_implementation="sdpa")
        model = wrap_lm(lm, tcfg.model, LATENT_DIM, NUM_CLASSES, device=device)
        n_params = sum(p.numel() for p in model.parameters())
        engine = build_engine(model, tcfg, total_steps, device)
    return engine, n_params, hf.num_hidden_layers, hf.hidden_size


def synthetic_batch(cfg: ShardingBenchConfig, num_image_tokens: int, vocab: int, rng: np.random.Generator) -> dict:
    """One packed row of tokens_per_gpu // example_len image-caption examples (prompt 1/4, target 3/4)."""
    items = []
    prefix = num_image_tokens + 1
    for i in range(cfg.tokens_per_gpu // cfg.example_len):
        text = cfg.example_len - prefix
        prompt = max(2, text // 4)
        ids = rng.integers(3, vocab, text).tolist()
        tok = TokenizedExample("caption", True, [1] + ids[1:prompt], ids[prompt:], has_bos=True)
        items.append(TrainItem(tok, rng.standard_normal(LATENT_DIM).astype(np.float32),
                               int(rng.integers(NUM_CLASSES)), key=f"ex{i}"))
    return collate_train(items, 0, num_image_tokens, packed=True)


def run(cfg: ShardingBenchConfig) -> dict:
    cfg.validate()
    rank, world, device = init_process_group(cfg.engine)
    tcfg = train_config(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    engine, n_params, layers, hidden = build(cfg, tcfg, device, cfg.warmup_steps + cfg.steps)
    check_base_filled(engine.module)
    synchronize(device)
    build_s = time.perf_counter() - t0
    build_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    rng = np.random.default_rng(cfg.seed * 1000 + rank)
    vocab = SHAPES[cfg.shape]().vocab_size
    micro = [engine.to_device(synthetic_batch(cfg, tcfg.model.num_image_tokens, vocab, rng))
             for _ in range(cfg.grad_accum)]  # the same rows every step: the loader is not what is timed
    tokens = sum(int(b["num_real_tokens"]) for b in micro)
    lengths = [cfg.example_len] * (len(micro) * (cfg.tokens_per_gpu // cfg.example_len))
    engine.train()

    def step() -> float:
        for b in micro:
            out = engine.forward(b)
            engine.backward(out.loss)
            engine.step()
        return float(out.loss.detach())

    for _ in range(cfg.warmup_steps):
        step()
    synchronize(device)
    dist.barrier()
    t = time.perf_counter()
    losses = [step() for _ in range(cfg.steps)]
    synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    peak = cfg.peak_tflops or measure_peak_tflops(device)["tflops"]
    mem = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
                        torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else 0.0,
                        -peak], dtype=torch.float64, device=device)
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)  # the fullest GPU; the slowest GEMM peak (min)
    peak = -float(mem[2])
    seconds = float(elapsed)
    tok_s = tokens * cfg.steps / seconds  # per GPU
    k = 6 if cfg.mode == "full" else 4
    attn_per_step = 6 * layers * hidden * sum(n * n for n in lengths)
    result = {
        "shape": cfg.shape, "mode": cfg.mode, "engine": cfg.engine,
        "deepspeed": cfg.deepspeed if cfg.engine == "deepspeed" else None, "world_size": world,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params": n_params, "tokens_per_step_per_gpu": tokens, "seconds_per_step": seconds / cfg.steps,
        "tokens_per_s_per_gpu": tok_s, "flops_per_token": f"{k}N",
        "model_tflops_per_gpu": tok_s * k * n_params / 1e12, "peak_tflops_per_gpu": peak,
        "mfu": tok_s * k * n_params / 1e12 / peak,
        "mfu_with_attention": (tok_s * k * n_params + attn_per_step * cfg.steps / seconds) / 1e12 / peak,
        "peak_gib_per_gpu": float(mem[0]) if device.type == "cuda" else None,
        "peak_reserved_gib_per_gpu": float(mem[1]) if device.type == "cuda" else None,
        "build_peak_gib_rank0": build_peak, "build_seconds": build_s, "losses": losses,
        "config": asdict(cfg),
    }
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(ShardingBenchConfig, argv)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        print_config(cfg)
    result = run(cfg)
    if dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1), flush=True)
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cfg.out, result)
            log.info("wrote %s", cfg.out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
