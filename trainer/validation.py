"""Evaluation during training: the held-out loss and logged sample generations.

    Validator      held-out loss before the first update, at each epoch's end, and where the run
                   stops if that is mid-epoch (--max-steps)
    SampleLogger   greedy generations for a few val examples every --sample-log-steps (rank 0)
"""

from __future__ import annotations

import torch

from models.collate import collate_generation
from models.tasks import TASKS
from trainer.checkpoint import TrainerState
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, all_reduce_sum
from trainer.metrics import RunLog


class Validator:
    def __init__(self, cfg: TrainConfig, engine, stream, runlog: RunLog):
        self.engine, self.stream, self.runlog = engine, stream, runlog
        self.enabled = cfg.data.val_max_samples > 0 and stream.num_val_samples > 0
        self.last_step: int | None = None

    def at_start(self, state: TrainerState) -> None:
        """The held-out loss before any update: the baseline every later one is read against."""
        if state.step == 0:
            self._validate(state.step, epoch=-1)
        self.last_step = state.step

    def at_epoch_end(self, state: TrainerState, epoch: int) -> None:
        self._validate(state.step, epoch)

    def at_end(self, state: TrainerState) -> None:
        """A run stopped mid-epoch (--max-steps) reports where it ended too."""
        if self.last_step != state.step:
            self._validate(state.step, state.epoch)

    def _validate(self, step: int, epoch: int) -> None:
        if self.enabled:
            self.runlog.write("val", step, {"epoch": epoch, **validation_loss(self.engine, self.stream)})
            self.last_step = step


class SampleLogger:
    def __init__(self, cfg: TrainConfig, dist: DistInfo, engine, tokenizer, stream, runlog: RunLog):
        self.every, self.num = cfg.logging.sample_log_steps, cfg.logging.sample_log_num
        self.max_new_tokens = cfg.logging.sample_log_max_new_tokens
        self.enabled = bool(self.every) and dist.is_main
        self.engine, self.tokenizer, self.stream, self.runlog, self.device = engine, tokenizer, stream, runlog, dist.device

    def maybe_sample(self, step: int) -> None:
        if self.enabled and step % self.every == 0:
            for s in sample_generations(self.engine.module, self.tokenizer, self.stream, self.num,
                                        self.max_new_tokens, self.device):
                self.runlog.write("sample", step, s)


@torch.no_grad()
def validation_loss(engine, stream) -> dict:
    """Held-out target loss (token-weighted, all ranks) overall and per task."""
    engine.eval()
    sums = torch.zeros(2, len(TASKS), dtype=torch.float64, device=engine.device)
    for batch in stream.val_loader():
        out = engine.forward(batch)
        sums[0] += out.task_loss_sum.to(torch.float64)
        sums[1] += out.task_token_count.to(torch.float64)
    engine.train()
    loss_sum, tokens = all_reduce_sum(sums).tolist()
    rec = {"val_loss": sum(loss_sum) / sum(tokens) if sum(tokens) else float("nan"), "val_tokens": int(sum(tokens))}
    rec.update({f"val_loss_{t}": s / n for t, s, n in zip(TASKS, loss_sum, tokens) if n > 0})
    return rec


@torch.no_grad()
def sample_generations(model, tokenizer, stream, num: int, max_new_tokens: int, device) -> list[dict]:
    """Greedy generations for a few val examples next to their references (rank 0 only)."""
    items = stream.val_items(num) if hasattr(stream, "val_items") else []
    if not items:
        return []
    was_training = model.training
    model.eval()
    batch = collate_generation(items, tokenizer.pad_token_id, stream.num_image_tokens)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    dtype = next(model.parameters()).dtype
    for k in ("latents", "block_tokens"):
        if isinstance(batch.get(k), torch.Tensor):
            batch[k] = batch[k].to(dtype)
    out = model.generate(batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return [{"key": it.key, "task": it.example.task,
             "generation": tokenizer.decode(ids, skip_special_tokens=True),
             "reference": tokenizer.decode(it.example.target_ids, skip_special_tokens=True)}
            for it, ids in zip(items, out)]
