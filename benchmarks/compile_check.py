"""Compiled layers vs eager on the GPU: same loss and LoRA gradients within bf16 noise.

Three copies of one model (same weights, same packed row, LoRA dropout 0 so that no random mask
differs), adapters packed as the trainer's engines pack them (models.flat_lora): eager bf16 (the
reference path: one autograd node per LoRA sibling group), compiled bf16 (`--compile on`), and eager
fp32 as the yardstick. bf16 noise is what the eager bf16 step itself is away from fp32; the compiled step passes
when it is no further from fp32 than `--tolerance` times that, for the loss and for every LoRA
gradient taken together (relative L2 error). CPU fp32 equality of the two paths is a unit test
(tests/test_model.py); this is its GPU half.

    python -m benchmarks.compile_check --shape 7b --layers 4 --out compile_check.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.make_random_model import Shape
from benchmarks.throughput.config import BenchConfig
from benchmarks.throughput.models import build_project
from benchmarks.throughput.workload import example_stream, load_examples, pack_groups, project_batch
from common.config import parse_config
from common.io import atomic_write_text
from common.log import setup_logging
from models.collate import batch_to_device
from models.flat_lora import attach_flat_lora

log = setup_logging("benchmarks.compile_check")


@dataclass
class CompileCheckConfig:
    shape: Shape = field(default="tiny", metadata={"help": "model shape (benchmarks.train_throughput --shape)"})
    layers: int = field(default=4, metadata={"help": "real shapes: decoder layers kept (0 = all)"})
    tokens: int = field(default=4096, metadata={"help": "packed row length of the compared step"})
    tolerance: float = field(default=1.5, metadata={
        "help": "the compiled step may be this many times as far from fp32 as the eager bf16 step"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda or cpu"})
    seed: int = field(default=0, metadata={"help": "weights and example stream"})
    out: str = field(default="", metadata={"help": "write the comparison as JSON here"})


def _bench_config(cfg: CompileCheckConfig, compile_: str, precision: str, attn: str) -> BenchConfig:
    base = BenchConfig(shape=cfg.shape, layers=cfg.layers if cfg.shape != "tiny" else 0, seed=cfg.seed,
                          token_budget=str(cfg.tokens), device=cfg.device)
    return replace(base, model=replace(base.model, lora_dropout=0.0, compile=compile_, precision=precision,
                                       attn_implementation=attn, fused_kernels="chunked"))


def _step(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return float(out.loss), grads


def _rel(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((grads[n].to(ref[n].device) - ref[n]).pow(2).sum()) for n in ref)
    den = sum(float(ref[n].pow(2).sum()) for n in ref)
    return (num / max(den, 1e-30)) ** 0.5


def run(cfg: CompileCheckConfig) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    low = "bf16" if device.type == "cuda" else "fp32"
    fast_attn = "auto"
    with tempfile.TemporaryDirectory(prefix="compile_check_") as tmp:
        bcfg = _bench_config(cfg, "off", low, fast_attn)
        pool, model_dir, tokenizer = load_examples(bcfg, Path(tmp))
        stream = example_stream(pool, cfg.tokens // 16 + 64, cfg.seed)  # more than one row holds
        n_img = bcfg.model.num_image_tokens
        group = pack_groups(stream, 1, n_img, cfg.tokens, 0)[0]
        batch = project_batch(group, tokenizer.pad_token_id, n_img)

        results = {}
        state = None
        # fp32 yardstick: stock packed SDPA (FlashAttention has no fp32), same bf16-valued weights
        for name, compile_, precision, attn in (("eager", "off", low, fast_attn), ("compiled", "on", low, fast_attn),
                                                ("fp32", "off", "fp32", "packed_sdpa")):
            model, _ = build_project(_bench_config(cfg, compile_, precision, attn), model_dir, device)
            attach_flat_lora(model)  # packed adapters, as the trainer's engines run them (eager: one-node groups)
            if state is None:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                model.load_state_dict(state)
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            loss, grads = _step(model, batch_to_device(batch, device, float_dtype=dtype))
            results[name] = (loss, {n: g.cpu() for n, g in grads.items()})
            log.info("%s: loss %.6f, %d gradients", name, loss, len(grads))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    ref_loss, ref_grads = results["fp32"]
    report = {"config": asdict(cfg), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "row_tokens": int(batch["input_ids"].numel()), "losses": {k: v[0] for k, v in results.items()}}
    for name in ("eager", "compiled"):
        loss, grads = results[name]
        report[name] = {"loss_abs_err_vs_fp32": abs(loss - ref_loss), "grad_rel_err_vs_fp32": _rel(grads, ref_grads)}
    report["compiled_vs_eager"] = {"loss_abs_diff": abs(results["compiled"][0] - results["eager"][0]),
                                   "grad_rel_diff": _rel(results["compiled"][1], results["eager"][1])}
    noise = report["eager"]
    floor = 1e-6 if low == "fp32" else 0.0  # fp32 vs fp32: both errors are rounding-level
    report["passed"] = bool(
        report["compiled"]["grad_rel_err_vs_fp32"] <= cfg.tolerance * noise["grad_rel_err_vs_fp32"] + floor
        and report["compiled"]["loss_abs_err_vs_fp32"] <= cfg.tolerance * noise["loss_abs_err_vs_fp32"] + floor)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(CompileCheckConfig, argv, description=__doc__)
    report = run(cfg)
    text = json.dumps(report, indent=2)
    if cfg.out:
        atomic_write_text(cfg.out, text + "\n")
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
