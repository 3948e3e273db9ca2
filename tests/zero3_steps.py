"""A few optimizer steps of the trainer's engine on fixed batches, with a resume checkpoint on the
way and the inference checkpoint at the end: the worker of tests/test_zero3.py, run in 2 processes
(ZeRO-3) or in the test's own process (the 1-process runs).

Global micro-batch i is `fixed_batch(i)`. With W ranks and G accumulation steps, optimizer step s
uses micro-batches s*W*G .. (s+1)*W*G - 1 (rank r, accumulation step a: s*W*G + a*W + r), so 2 ranks
x 1 accumulation step and 1 rank x 2 accumulation steps make the same updates.

    python -m torch.distributed.run --nproc-per-node 2 -m tests.zero3_steps MODEL_DIR OUT_DIR CONFIG

runs LoRA (OUT_DIR/lora/) then full fine-tuning (OUT_DIR/full/) in one launch, each with
`run_steps(..., check_resume=True)`: result.json, run/ (resume checkpoint), ckpt/, ckpt_resumed/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from common.runtime import resolve_precision
from models.collate import TrainItem, collate_train
from models.prefix_lm import build_prefix_lm
from models.tasks import build_prompt, tokenize_prompt
from trainer.checkpoint import TrainerState, load_resume_checkpoint, save_resume_checkpoint, save_trained_checkpoint
from trainer.config import TrainConfig, replace
from trainer.distributed import all_gather_objects, barrier
from trainer.engines import build_engine, zero3_model_init

NUM_STEPS = 3
RESUME_AT = 2  # the resume checkpoint is saved after this many steps
LATENT_DIM = 32
COND_MAP = {"shr6": 0}
TEXTS = ["Strong shear over the northwest. It is moderate.", "Weak instability in the south. Storms are unlikely.",
         "A dry line over the plains. Storms may form by evening."]


def steps_config(model_dir: str, ds_config: str, use_lora: bool, grad_accum: int) -> TrainConfig:
    return replace(TrainConfig(), deepspeed=ds_config,
                   model={"model_path": str(model_dir), "precision": "fp32", "use_lora": use_lora,
                          "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                   optim={"lr": 1e-3, "gradient_accumulation_steps": grad_accum, "max_grad_norm": 0.05,
                          "warmup_ratio": 0.0})


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


def build(cfg: TrainConfig):
    torch.manual_seed(0)  # the same initial weights in every run
    with zero3_model_init(cfg, resolve_precision(cfg.model.precision)):
        model, tok = build_prefix_lm(cfg.model, latent_dim=LATENT_DIM)
    return build_engine(model, cfg, total_steps=NUM_STEPS), tok


def train(engine, tok, cfg: TrainConfig, steps: range, rank: int, world: int) -> dict[int, float]:
    """The optimizer steps `steps`; {global micro-batch index: loss} over all ranks."""
    gas = cfg.optim.gradient_accumulation_steps
    losses = {}
    for step in steps:
        for a in range(gas):
            i = step * world * gas + a * world + rank
            out = engine.forward(fixed_batch(tok, i))
            engine.backward(out.loss)
            losses[i] = float(out.loss.detach())
            engine.step()
    return {k: v for part in all_gather_objects(losses) for k, v in part.items()}


def in_order(losses: dict[int, float]) -> list[float]:
    return [losses[k] for k in sorted(losses)]


def run_steps(cfg: TrainConfig, out_dir: Path, rank: int, world: int, is_main: bool,
              check_resume: bool = False) -> dict:
    """NUM_STEPS steps, saving the resume checkpoint (out_dir/run) after RESUME_AT of them and the
    inference checkpoint (out_dir/ckpt) at the end. With `check_resume`, a second engine resumes from
    out_dir/run and redoes the last steps (out_dir/ckpt_resumed). Returns the losses in micro-batch
    order (and the resumed ones), and whether the engine packed LoRA into one flat tensor."""
    engine, tok = build(cfg)
    losses = train(engine, tok, cfg, range(RESUME_AT), rank, world)
    save_resume_checkpoint(engine, out_dir / "run", TrainerState(step=RESUME_AT, world_size=world), is_main)
    losses.update(train(engine, tok, cfg, range(RESUME_AT, NUM_STEPS), rank, world))
    save_trained_checkpoint(engine.module, tok, COND_MAP, cfg, out_dir / "ckpt", is_main)
    result = {"losses": in_order(losses), "flat_lora": engine.flat_lora is not None}
    if check_resume:
        result["resumed_losses"] = resume_and_finish(cfg, out_dir / "run", out_dir / "ckpt_resumed", rank, world,
                                                     is_main)
    barrier()
    return result


def resume_and_finish(cfg: TrainConfig, run_dir: Path, ckpt_dir: Path, rank: int, world: int,
                      is_main: bool) -> list[float]:
    """A fresh engine resumed from `run_dir` (any number of ranks) does the steps after RESUME_AT and
    writes the inference checkpoint to `ckpt_dir`; returns their losses in micro-batch order."""
    engine, tok = build(cfg)
    state = load_resume_checkpoint(engine, run_dir, rank, world)
    assert state is not None and state.step == RESUME_AT, state
    losses = train(engine, tok, cfg, range(RESUME_AT, NUM_STEPS), rank, world)
    save_trained_checkpoint(engine.module, tok, COND_MAP, cfg, ckpt_dir, is_main)
    barrier()
    return in_order(losses)


def main(argv: list[str]) -> None:
    from trainer.distributed import init_distributed

    model_dir, out_dir, ds_config = argv[:3]
    dist = init_distributed(timeout_s=300)
    for name, use_lora in (("lora", True), ("full", False)):
        cfg = steps_config(model_dir, ds_config, use_lora, grad_accum=1)
        out = Path(out_dir) / name
        result = run_steps(cfg, out, dist.rank, dist.world_size, dist.is_main, check_resume=True)
        if dist.is_main:
            (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
