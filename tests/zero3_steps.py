"""A few optimizer steps of the trainer's engine on fixed batches, then the inference checkpoint:
the worker of tests/test_zero3.py, run in 2 processes (ZeRO-3) or in the test's own process (the
1-process reference).

Global micro-batch i is `fixed_batch(i)`. With W ranks and G accumulation steps, optimizer step s
uses micro-batches s*W*G .. (s+1)*W*G - 1 (rank r, accumulation step a: s*W*G + a*W + r), so 2 ranks
x 1 accumulation step and 1 rank x 2 accumulation steps make the same updates.

    python -m torch.distributed.run --nproc-per-node 2 -m tests.zero3_steps MODEL_DIR OUT_DIR CONFIG [--full]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from models.collate import TrainItem, collate_train
from models.prefix_lm import build_prefix_lm
from models.tasks import build_prompt, tokenize_prompt
from trainer.config import TrainConfig, replace
from trainer.distributed import all_gather_objects, barrier

NUM_STEPS = 3
LATENT_DIM = 32
TEXTS = ["Strong shear over the northwest. It is moderate.", "Weak instability in the south. Storms are unlikely.",
         "A dry line over the plains. Storms may form by evening."]


def steps_config(model_dir: str, ds_config: str, use_lora: bool, grad_accum: int) -> TrainConfig:
    return replace(TrainConfig(), deepspeed=ds_config,
                   model={"model_path": str(model_dir), "precision": "fp32", "use_lora": use_lora,
                          "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                   optim={"lr": 1e-3 if use_lora else 1e-4, "gradient_accumulation_steps": grad_accum,
                          "max_grad_norm": 0.05, "warmup_ratio": 0.0})


def fixed_batch(tokenizer, i: int) -> dict:
    rng = np.random.default_rng(i)
    items = []
    for j in range(2 + i % 2):  # packed rows of 2 or 3 examples: ranks get different token counts
        task = ("caption", "summary")[(i + j) % 2]
        text = TEXTS[(i + j) % len(TEXTS)]
        p = build_prompt(task, cond_name="shr6", caption=text, global_summary=text)
        ex = tokenize_prompt(p, tokenizer, 256, 4)
        items.append(TrainItem(ex, rng.standard_normal(LATENT_DIM).astype(np.float32), (i + j) % 20, key=f"k{i}.{j}"))
    return collate_train(items, tokenizer.pad_token_id, 4)


def run_steps(cfg: TrainConfig, out_dir: Path, rank: int, world: int, is_main: bool) -> list[float]:
    """Train NUM_STEPS optimizer steps; returns every global micro-batch's loss (in order) and writes
    the inference checkpoint to `out_dir` (collective)."""
    from trainer.checkpoint import save_trained_checkpoint
    from trainer.engines import build_engine, zero3_model_init

    torch.manual_seed(0)
    with zero3_model_init(cfg, "fp32"):
        model, tok = build_prefix_lm(cfg.model, latent_dim=LATENT_DIM)
    engine = build_engine(model, cfg, total_steps=NUM_STEPS)
    gas = cfg.optim.gradient_accumulation_steps
    losses: dict[int, float] = {}
    for step in range(NUM_STEPS):
        for a in range(gas):
            i = step * world * gas + a * world + rank
            out = engine.forward(fixed_batch(tok, i))
            engine.backward(out.loss)
            losses[i] = float(out.loss.detach())
            engine.step()
    merged = {k: v for part in all_gather_objects(losses) for k, v in part.items()}
    save_trained_checkpoint(engine.module, tok, {"shr6": 0}, cfg, out_dir, is_main)
    barrier()
    return [merged[k] for k in sorted(merged)]


def main(argv: list[str]) -> None:
    from trainer.distributed import init_distributed

    model_dir, out_dir, ds_config = argv[:3]
    use_lora = "--full" not in argv
    dist = init_distributed(timeout_s=300)
    cfg = steps_config(model_dir, ds_config, use_lora, grad_accum=1)
    losses = run_steps(cfg, Path(out_dir) / "ckpt", dist.rank, dist.world_size, dist.is_main)
    if dist.is_main:
        (Path(out_dir) / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main(sys.argv[1:])
