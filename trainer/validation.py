"""Evaluation during training: the held-out loss, the image-use gap and logged sample generations.

    Validator      held-out loss before the first update, at each epoch's end, and where the run
                   stops if that is mid-epoch (--max-steps); at every --image-gap-every-th
                   validation also the image-use gap
    SampleLogger   greedy generations for a few val examples every --sample-log-steps (rank 0)

The image-use gap answers "does the model read the image?" while it trains: a recipe can reach a
good loss while ignoring the prefix. Each held-out batch is run a second time with every image
example's latent (and Stage1 block tokens and image class) taken from another example of the batch
(a rotation by one: no example keeps its own), without gradients. The gap is the shuffled minus the
true loss in nats per target token over the image tasks (positive: the true image helps), with a
95% bootstrap CI over batches; each rank evaluates its share of the batches and rank 0 pools them.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from models.collate import collate_generation
from models.tasks import IMAGE_TASKS, TASKS
from trainer.checkpoint import TrainerState
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, all_gather_objects, all_reduce_sum
from trainer.metrics import RunLog

log = logging.getLogger("trainer")

PER_IMAGE_KEYS = ("latents", "block_tokens", "cond_ids")  # models/collate.py: one row per image example
BOOTSTRAP_RESAMPLES = 1000


class Validator:
    def __init__(self, cfg: TrainConfig, engine, stream, runlog: RunLog, total_steps: int):
        self.engine, self.stream, self.runlog = engine, stream, runlog
        self.enabled = cfg.data.val_max_samples > 0 and stream.num_val_samples > 0
        self.gap_every = cfg.logging.image_gap_every
        self.warmup_steps = math.ceil(cfg.optim.warmup_ratio * total_steps)
        self.seed = cfg.seed
        self.count = 0  # validations run
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
        if not self.enabled:
            return
        gap = self.gap_every > 0 and self.count % self.gap_every == 0
        record = {"epoch": epoch, **validation_loss(self.engine, self.stream, image_gap=gap, seed=self.seed + step)}
        self.runlog.write("val", step, record)
        self.count += 1
        self.last_step = step
        low, high = record.get("image_gap_ci_low"), record.get("image_gap_ci_high")
        if low is not None and step > self.warmup_steps and low <= 0.0 <= high:
            log.warning("step %d: the image-use gap %.4f nats/token (95%% CI %.4f .. %.4f) still includes 0: the "
                        "model may be ignoring the image prefix (true vs shuffled latents, %d held-out batches)",
                        step, record["image_gap"], low, high, record["image_gap_batches"])


class SampleLogger:
    def __init__(self, cfg: TrainConfig, dist: DistInfo, engine, tokenizer, stream, runlog: RunLog):
        self.every, self.num = cfg.logging.sample_log_steps, cfg.logging.sample_log_num
        self.max_new_tokens = cfg.logging.sample_log_max_new_tokens
        # Rank 0 generates alone, except under ZeRO-3 where every forward gathers weights from all
        # ranks: there all ranks generate the same samples in lockstep and rank 0 writes them.
        self.collective = bool(getattr(engine, "partitions_weights", False))
        self.is_main = dist.is_main
        self.enabled = bool(self.every) and (dist.is_main or self.collective)
        if self.every and getattr(engine, "shards_parameters", False):
            self.enabled = False  # FSDP2: not run in lockstep generation yet
            if dist.is_main:
                log.warning("--sample-log-steps: off with --engine %s (sharded weights; rank 0 alone cannot "
                            "generate); generate from the saved checkpoints instead", cfg.engine)
        self.engine, self.tokenizer, self.stream, self.runlog, self.device = engine, tokenizer, stream, runlog, dist.device

    def maybe_sample(self, step: int) -> None:
        if self.enabled and step % self.every == 0:
            samples = sample_generations(self.engine.module, self.tokenizer, self.stream, self.num,
                                         self.max_new_tokens, self.device, synced=self.collective)
            for s in samples if self.is_main else []:
                self.runlog.write("sample", step, s)


@torch.no_grad()
def validation_loss(engine, stream, image_gap: bool = False, seed: int = 0) -> dict:
    """Held-out target loss (token-weighted, all ranks) overall and per task; with `image_gap`, also
    the image-use gap (module doc) and the seconds the extra forwards took."""
    engine.eval()
    sums = torch.zeros(2, len(TASKS), dtype=torch.float64, device=engine.device)
    gap_rows, gap_seconds = [], 0.0
    for batch in stream.val_loader():
        out = engine.forward(batch)
        sums[0] += out.task_loss_sum.to(torch.float64)
        sums[1] += out.task_token_count.to(torch.float64)
        shuffled = shuffle_images(batch) if image_gap else None
        if shuffled is not None:
            t0 = time.perf_counter()
            out_shuffled = engine.forward(shuffled)
            gap_rows.append(torch.stack([out.task_loss_sum, out_shuffled.task_loss_sum, out.task_token_count]))
            gap_seconds += time.perf_counter() - t0
    engine.train()
    loss_sum, tokens = all_reduce_sum(sums).tolist()
    rec = {"val_loss": sum(loss_sum) / sum(tokens) if sum(tokens) else float("nan"), "val_tokens": int(sum(tokens))}
    rec.update({f"val_loss_{t}": s / n for t, s, n in zip(TASKS, loss_sum, tokens) if n > 0})
    if image_gap:
        mine = torch.stack(gap_rows).double().cpu().numpy() if gap_rows else np.zeros((0, 3, len(TASKS)))
        gathered = all_gather_objects((mine, gap_seconds))  # one collective for both
        rec.update(image_gap_stats(np.concatenate([rows for rows, _ in gathered]), seed=seed))
        rec["image_gap_seconds"] = max(sec for _, sec in gathered)  # ranks work in parallel
    return rec


def shuffle_images(batch: dict) -> dict | None:
    """The batch with every image example's latent, block tokens and class taken from the next image
    example (a rotation: none keeps its own); None when the batch has fewer than two images."""
    latents = batch.get("latents")
    if not isinstance(latents, torch.Tensor) or latents.shape[0] < 2:
        return None
    out = dict(batch)
    for key in PER_IMAGE_KEYS:
        if isinstance(batch.get(key), torch.Tensor):
            out[key] = torch.roll(batch[key], shifts=1, dims=0)
    return out


def image_gap_stats(rows: np.ndarray, num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """The gap (shuffled minus true loss, nats per target token, image tasks) with a 95% bootstrap CI
    over batches, and per image task. `rows`: [batches, 3 (true sum, shuffled sum, tokens), tasks]."""
    image = [i for i, t in enumerate(TASKS) if t in IMAGE_TASKS]
    rec: dict = {"image_gap_batches": int(rows.shape[0])}
    if rows.shape[0] == 0:
        return rec
    diff = rows[:, 1, image] - rows[:, 0, image]  # [batches, image tasks]
    tokens = rows[:, 2, image]
    if tokens.sum() <= 0:
        return rec
    rec["image_gap"] = float(diff.sum() / tokens.sum())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, rows.shape[0], size=(num_resamples, rows.shape[0]))
    boot = diff.sum(1)[picks].sum(1) / np.maximum(tokens.sum(1)[picks].sum(1), 1e-12)
    rec["image_gap_ci_low"], rec["image_gap_ci_high"] = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    for j, i in enumerate(image):
        if tokens[:, j].sum() > 0:
            rec[f"image_gap_{TASKS[i]}"] = float(diff[:, j].sum() / tokens[:, j].sum())
    return rec


@torch.no_grad()
def sample_generations(model, tokenizer, stream, num: int, max_new_tokens: int, device,
                       synced: bool = False) -> list[dict]:
    """Greedy generations for a few val examples next to their references (rank 0 only; with
    `synced`, every rank together: ZeRO-3, where each decoding step gathers weights from all ranks)."""
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
    extra = {"synced_gpus": True} if synced else {}  # ranks keep stepping until all are done
    out = model.generate(batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    model.train(was_training)
    return [{"key": it.key, "task": it.example.task,
             "generation": tokenizer.decode(ids, skip_special_tokens=True),
             "reference": tokenizer.decode(it.example.target_ids, skip_special_tokens=True)}
            for it, ids in zip(items, out)]
