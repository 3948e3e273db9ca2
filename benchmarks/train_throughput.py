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

import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.throughput.config import MODE_NAMES, RUN_ORDER, BenchConfig
from benchmarks.throughput.models import lm_config
from benchmarks.throughput.modes import Context, run_mode, run_mode_isolated
from benchmarks.throughput.report import environment, markdown_table, ratios
from benchmarks.throughput.timing import FLOPS_FORMULA, free_memory, measure_peak_tflops
from benchmarks.throughput.workload import example_stream, length_stats, load_examples, stream_size, write_lengths_file
from common.config import parse_config, print_config
from common.io import atomic_write_json
from common.log import setup_logging

log = setup_logging("benchmarks.train_throughput")


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
