"""The four ways to run the same step (see `benchmarks.train_throughput`): modes 1-3 with plain HF +
PEFT and torch AdamW, mode 4 with the trainer's own model build and engine."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from benchmarks.throughput.config import LATENT_DIM, BenchConfig
from benchmarks.throughput.models import build_baseline, build_project
from benchmarks.throughput.timing import (
    PhaseTimer,
    free_memory,
    is_oom,
    profile_steps,
    step_flops,
    sync_points,
    time_mode,
)
from benchmarks.throughput.workload import Example, baseline_batch, doc_lengths, pack_groups, project_batch
from common.io import atomic_write_json
from models.attention import resolve_attn_implementation
from models.collate import TrainItem, batch_to_device, collate_train
from models.layer_compile import resolve_compile
from models.prefix_lm import ModelConfig
from trainer.batch_tokens import probe_batch_tokens
from trainer.config import TrainConfig, resolve_ds_config_path
from trainer.distributed import init_distributed, is_initialized
from trainer.engines import build_engine


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
        result["profile"] = profile_steps(step, batches[:3], ctx.device, cfg.out)
    if cfg.sync_debug:
        result["sync_points"] = sync_points(step, batches[:2], ctx.device, cfg.out)
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


MODES: dict[int, Callable[[Context], dict]] = {1: mode_seed_like, 2: mode_padded_sdpa,
                                               3: mode_packed_offshelf, 4: mode_project}


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
