"""Stage2 training: `python -m trainer.train` (one process per GPU; see launch/train.sh, train.sbatch).

    setup:  config -> process group -> manifest + Stage1 check -> model -> phases -> stream -> engine
    loop:   for each epoch, for each micro-batch: forward, backward, step; at step boundaries:
            log (every --log-steps), sample generations (--sample-log-steps), checkpoints
            (--save-steps and at the end); held-out loss at the end of each epoch.

Non-finite losses: the engine skips the update (engine.step() returns False, or a device False for
the torch engine, read at the next log/save step); more than --max-nan-steps in a row stops training
with an error, leaving the last good checkpoint.
Host syncs happen at log steps only: per-step losses are accumulated on the device.
"""

from __future__ import annotations

import html
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from common.config import config_to_dict, print_config, save_config
from common.io import append_jsonl, atomic_write_text, sha256_file, stable_hash
from common.log import setup_logging
from common.runtime import seed_everything
from data_prep.manifest import check_stage1_compatible, load_manifest
from models.collate import collate_generation
from models.prefix_lm import build_prefix_lm
from models.stage1 import load_stage1_encoder
from models.tasks import TASKS
from trainer.checkpoint import TrainerState, load_resume_checkpoint, save_inference_checkpoint, save_resume_checkpoint
from trainer.config import TrainConfig, parse_train_config
from trainer.data import TrainStream
from trainer.distributed import DistInfo, all_gather_rows, all_reduce_sum, barrier, cleanup, init_distributed
from trainer.engine import build_engine
from trainer.gc_steps import StepAlignedGC
from trainer.schedules import build_phases, phase_at, total_epochs

log = logging.getLogger("trainer")


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Dropout RNG of one micro-batch: a pure function of its position, so resume is exact
    regardless of how many random numbers anything else (data loader start-up) drew."""
    return stable_hash(f"{seed}/{step}/{micro}/{rank}") % 2**63


def build_model(cfg: TrainConfig, manifest, device: torch.device):
    """The prefix-LM (+ the trainable Stage1 tail when K > 0) and its tokenizer."""
    tail = None
    k = cfg.stage1.stage1_trainable_blocks
    if k > 0:
        tail = load_stage1_encoder(cfg.stage1.stage1_encoder_ckpt, pooling=cfg.stage1.latent_pooling).tail(k)
    return build_prefix_lm(cfg.model, latent_dim=manifest.stage1.latent_dim,
                           num_classes=len(manifest.cond_name_to_id), tail=tail, device=device)


def check_shards(cfg: TrainConfig):
    """The manifest, refusing shards built with other Stage1 settings/checkpoints than configured."""
    manifest = load_manifest(cfg.data.shard_dir)
    s = cfg.stage1
    check_stage1_compatible(manifest, s,
                            sha256_file(s.stage1_encoder_ckpt) if s.stage1_encoder_ckpt else None,
                            sha256_file(s.stage1_classifier_ckpt) if s.stage1_classifier_ckpt else None)
    return manifest


# ---------------------------------------------------------------------------------------------
# Metrics: accumulated on the device between log steps, reduced over ranks at log steps
# ---------------------------------------------------------------------------------------------

class Metrics:
    def __init__(self, device: torch.device):
        self.device = device
        self.pending = torch.zeros(2, len(TASKS), dtype=torch.float64, device=device)  # this step
        self.window = torch.zeros_like(self.pending)  # applied steps since the last log
        self.counts: dict[str, float] = {}  # host-side ints from the collator (no sync)
        self.truncation: dict[str, dict[str, int]] = {}
        self.t0 = time.perf_counter()

    def add_micro_batch(self, out, batch: dict) -> None:
        self.pending[0] += out.task_loss_sum.detach().to(torch.float64)
        self.pending[1] += out.task_token_count.detach().to(torch.float64)
        self.counts["real_tokens"] = self.counts.get("real_tokens", 0) + int(batch.get("num_real_tokens", 0))
        stats = batch.get("stats") or {}
        for task, n in (stats.get("task_counts") or {}).items():
            self.counts[f"task/{task}"] = self.counts.get(f"task/{task}", 0) + n
        for k, v in stats.items():
            if isinstance(v, (int, float)) and k != "task_counts":
                self.counts[k] = self.counts.get(k, 0) + v
        for kind, per_task in (stats.get("truncation") or {}).items():
            acc = self.truncation.setdefault(kind, {})
            for t, v in per_task.items():
                acc[t] = acc.get(t, 0) + v

    def end_step(self, applied: bool | torch.Tensor) -> None:
        # a skipped (non-finite) step must not poison the logged loss; a device flag masks on the device
        if isinstance(applied, torch.Tensor):
            self.window += torch.where(applied.to(self.device), self.pending, torch.zeros_like(self.pending))
        elif applied:
            self.window += self.pending
        self.pending.zero_()

    def reduce_and_reset(self) -> dict:
        """All-reduce the window over ranks (the host sync) and turn it into a log record."""
        window = all_reduce_sum(self.window.clone())
        loss_sum, tokens = window.tolist()
        flat_trunc = {f"trunc/{kind}/{t}": v for kind, d in self.truncation.items() for t, v in d.items()}
        counts = all_reduce_sum({**self.counts, **flat_trunc}, device=self.device)
        elapsed = time.perf_counter() - self.t0
        rec = {"loss": sum(loss_sum) / max(1.0, sum(tokens))}
        for t, s, n in zip(TASKS, loss_sum, tokens):
            if n > 0:
                rec[f"loss_{t}"] = s / n
        rec["real_tokens"] = int(counts.pop("real_tokens", 0))
        rec["tokens_per_s"] = rec["real_tokens"] / max(elapsed, 1e-9)
        rec["task_mix"] = {k.split("/", 1)[1]: int(v) for k, v in counts.items() if k.startswith("task/")}
        rec["truncation"] = {k[len("trunc/"):]: int(v) for k, v in counts.items() if k.startswith("trunc/") and v}
        rec.update({k: v for k, v in counts.items() if "/" not in k})
        self.window.zero_()
        self.counts, self.truncation, self.t0 = {}, {}, time.perf_counter()
        return rec


class RankTimes:
    """Where each rank's wall time goes, per optimizer step of a log window: waiting for its next
    batch (`data`), issuing forward + backward (`fwd_bwd`), the engine step (`step`: gradient
    reduction and optimizer; DeepSpeed waits there for the device and the other ranks), and the rest
    (`other`: logging, checkpoints, and with the torch engine the wait at the log step's sync).
    Host clocks only, no device sync. Ranks finish a step together, so a rank with less time in the
    waiting phases than the others is the straggler; the log record has one list entry per rank.
    """

    PHASES = ("data", "fwd_bwd", "step", "other")

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = [0.0] * len(self.PHASES)
        self.steps = 0  # optimizer steps in this window
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[self.PHASES.index(phase)] += now - self.last
        self.last = now

    def end_step(self) -> None:
        self.steps += 1

    def gather_and_reset(self) -> dict[str, list[float]]:
        """ms per step of every phase, one entry per rank (a collective: every rank calls it)."""
        self.lap("other")
        row = torch.tensor(self.seconds, dtype=torch.float64, device=self.device) * (1000.0 / max(1, self.steps))
        table = all_gather_rows(row).tolist()
        self.seconds, self.steps = [0.0] * len(self.PHASES), 0
        return {phase: [round(r[i], 2) for r in table] for i, phase in enumerate(self.PHASES)}


def diagnose_rank_times(times: dict[str, list[float]], data_share: float = 0.1,
                        slow_share: float = 0.1) -> dict[str, str]:
    """Plain-language warnings from one window's `rank_ms_per_step`, by kind (empty when all is well):
    a rank that spends more than `data_share` of the step waiting for batches (the data path
    limits training), and a rank whose forward + backward issue takes more than `slow_share` longer
    than the other ranks' mean (a slow host: every other rank waits for it each step)."""
    out = {}
    step_ms = [sum(times[p][r] for p in times) for r in range(len(times["data"]))]
    worst = max(range(len(step_ms)), key=lambda r: times["data"][r] / max(step_ms[r], 1e-9))
    if times["data"][worst] > data_share * step_ms[worst]:
        out["data"] = (f"rank {worst} waits {times['data'][worst]:.0f} of {step_ms[worst]:.0f} ms per step for "
                       "batches: the data path limits training (raise --num-workers, or check the shard file system)")
    issue = times["fwd_bwd"]
    if len(issue) > 1:
        slow = max(range(len(issue)), key=issue.__getitem__)
        others = (sum(issue) - issue[slow]) / (len(issue) - 1)
        if issue[slow] > (1 + slow_share) * others:
            out["straggler"] = (f"rank {slow} takes {issue[slow]:.0f} ms per step to issue forward + backward, the "
                                f"others {others:.0f}: the other ranks wait for it every step (a slower or busier host?)")
    return out


class RankTimeWarnings:
    """Logs diagnose_rank_times' warnings on rank 0, each kind at most once per `every` log records."""

    def __init__(self, enabled: bool, every: int = 20):
        self.enabled, self.every = enabled, every
        self.records = 0
        self.last: dict[str, int] = {}

    def check(self, step: int, times: dict[str, list[float]]) -> None:
        self.records += 1
        if not self.enabled:
            return
        for kind, message in diagnose_rank_times(times).items():
            if self.records - self.last.get(kind, -self.every) >= self.every:
                self.last[kind] = self.records
                log.warning("step %d: %s", step, message)


class SkippedSteps:
    """Counts skipped (non-finite) steps in the TrainerState; too many in a row stop the run.

    `engine.step()` returns a bool (DeepSpeed) or a 0-d device bool (the torch engine, which never
    syncs with the host): a bool is counted at once, device flags in one transfer by `check()`, which
    the loop calls where it syncs anyway (log and save steps, the end). So with the torch engine a
    NaN streak is caught at the next log step at the latest.
    """

    def __init__(self, state: TrainerState, max_nan_steps: int, out_dir: Path):
        self.state, self.max_nan_steps, self.out_dir = state, max_nan_steps, out_dir
        self.pending: list[tuple[int, bool | torch.Tensor]] = []

    def add(self, step: int, applied: bool | torch.Tensor) -> None:
        self.pending.append((step, applied))
        if not isinstance(applied, torch.Tensor):
            self.check()

    def check(self) -> None:
        flags = [a for _, a in self.pending if isinstance(a, torch.Tensor)]
        values = iter(torch.stack(flags).tolist() if flags else [])
        resolved = [(s, bool(next(values)) if isinstance(a, torch.Tensor) else bool(a)) for s, a in self.pending]
        self.pending.clear()
        state = self.state
        for step, applied in resolved:
            state.consecutive_nan = 0 if applied else state.consecutive_nan + 1
            state.nan_steps_total += 0 if applied else 1
            if applied:
                continue
            log.warning("step %d: non-finite loss/gradients, update skipped (%d in a row)", step, state.consecutive_nan)
            if state.consecutive_nan > self.max_nan_steps:
                raise NonFiniteLossError(
                    f"{state.consecutive_nan} consecutive non-finite steps (> --max-nan-steps "
                    f"{self.max_nan_steps}) at step {step}; stopping. The last good "
                    f"checkpoint is in {self.out_dir}/resume (lower --lr or check the data)")


class RunLog:
    """train_log.jsonl (+ wandb) on rank 0. Every record is one line: {"kind": ..., "step": ...}."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo):
        self.enabled = dist.is_main
        self.path = cfg.log_dir / "train_log.jsonl"
        self.wandb = None
        if self.enabled and cfg.logging.use_wandb:
            self.wandb = _init_wandb(cfg)

    def write(self, kind: str, step: int, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, {"kind": kind, "step": step, **record})
        if self.wandb is not None:
            flat = {}
            for k, v in record.items():
                if isinstance(v, dict):  # task mix, truncation, lr groups: one chart per entry
                    flat.update({f"{kind}/{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
                elif isinstance(v, (int, float)):
                    flat[f"{kind}/{k}"] = v
            if kind == "sample":
                import wandb

                text = f"GEN: {record.get('generation', '')}\nREF: {record.get('reference', '')}"
                flat = {f"sample/{record.get('task', '')}": wandb.Html(f"<pre>{html.escape(text)}</pre>")}
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(cfg: TrainConfig):
    """wandb run that a requeued job continues (its id is kept in the output dir)."""
    import wandb

    id_file = Path(cfg.checkpoint.output_dir) / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    atomic_write_text(id_file, run_id)
    return wandb.init(project=cfg.logging.wandb_project, id=run_id, resume="allow", dir=str(cfg.log_dir),
                      name=cfg.logging.wandb_run_name or Path(cfg.checkpoint.output_dir).name,
                      config=config_to_dict(cfg))


# ---------------------------------------------------------------------------------------------
# Evaluation during training
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, dist: DistInfo) -> TrainerState:
    seed_everything(cfg.seed)
    manifest = check_shards(cfg)
    model, tokenizer = build_model(cfg, manifest, dist.device)
    phases = build_phases(cfg.schedule)
    stream = TrainStream(manifest, cfg.data.shard_dir, tokenizer, cfg.data, phases, cfg.model.num_image_tokens,
                         dist.rank, dist.world_size, cfg.seed)
    ga = cfg.optim.gradient_accumulation_steps
    num_epochs = total_epochs(phases)
    # With --batch-tokens, phases of other task mixes have other batch sizes, hence other step counts.
    batches_per_epoch = [stream.num_batches(e) for e in range(num_epochs)]
    steps_per_epoch = [math.ceil(b / ga) for b in batches_per_epoch]
    total_steps = sum(steps_per_epoch) if cfg.max_steps < 0 else min(cfg.max_steps, sum(steps_per_epoch))
    engine = build_engine(model, cfg, total_steps, dist.device)

    out_dir = Path(cfg.checkpoint.output_dir)
    state = TrainerState(world_size=dist.world_size, seed=cfg.seed)
    if cfg.checkpoint.resume:
        state = load_resume_checkpoint(engine, out_dir, dist.rank, dist.world_size) or state
        log.info("resuming at step %d (epoch %d, batch %d)", state.step, state.epoch, state.batches_in_epoch)
    runlog = RunLog(cfg, dist)
    runlog.write("start", state.step, {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                                       "batches_per_epoch": batches_per_epoch,
                                       "batch_size_per_phase": stream.phase_batch_sizes, "world_size": dist.world_size})
    skips = SkippedSteps(state, cfg.checkpoint.max_nan_steps, out_dir)
    bar = _progress(dist, total_steps, state.step)
    has_val = cfg.data.val_max_samples > 0 and stream.num_val_samples > 0
    if has_val and state.step == 0:  # the held-out loss before any update: the baseline every later one is read against
        runlog.write("val", 0, {"epoch": -1, **validation_loss(engine, stream)})
    last_val_step = state.step

    def save_checkpoints(tag: str) -> None:
        skips.check()  # the saved NaN counters are exact
        save_resume_checkpoint(engine, out_dir, state, dist.is_main, keep=cfg.checkpoint.save_total_limit)
        if dist.is_main:
            save_inference_checkpoint(engine.module, tokenizer, manifest.cond_name_to_id, cfg, out_dir / tag)
        barrier()

    engine.train()
    metrics, times = Metrics(dist.device), RankTimes(dist.device)  # their first window starts here
    time_warnings = RankTimeWarnings(dist.is_main)
    step_gc = StepAlignedGC(cfg.gc_interval_steps)
    micro = 0
    for epoch in range(state.epoch, num_epochs):
        if state.step >= total_steps:
            break
        state.epoch = epoch
        log.info("epoch %d: phase %s", epoch, phase_at(phases, epoch).name)
        for batch in stream.loader(epoch, skip_batches=state.batches_in_epoch):
            times.lap("data")
            torch.manual_seed(step_seed(cfg.seed, state.step, micro, dist.rank))
            out = engine.forward(batch)
            loss = out.loss * float("nan") if state.step + 1 in cfg.debug_nan_at_steps else out.loss
            engine.backward(loss)
            metrics.add_micro_batch(out, batch)
            state.batches_in_epoch += 1
            boundary = engine.is_boundary()
            times.lap("fwd_bwd")
            applied = engine.step()
            times.lap("step")
            micro += 1
            if not boundary:
                continue
            micro = 0
            state.step += 1
            metrics.end_step(applied)
            times.end_step()
            skips.add(state.step, applied)
            step_gc.step(state.step)
            if state.step % cfg.logging.log_steps == 0 or state.step == total_steps:
                skips.check()
                rec = metrics.reduce_and_reset()
                state.tokens_seen += rec["real_tokens"]
                _merge_truncation(state, rec["truncation"])
                rec.update(epoch=epoch, lr=engine.lr(), tokens_seen=state.tokens_seen,
                           nan_steps_total=state.nan_steps_total,
                           rank_ms_per_step=times.gather_and_reset())
                runlog.write("train", state.step, rec)
                time_warnings.check(state.step, rec["rank_ms_per_step"])
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            if cfg.logging.sample_log_steps and state.step % cfg.logging.sample_log_steps == 0 and dist.is_main:
                for s in sample_generations(engine.module, tokenizer, stream, cfg.logging.sample_log_num,
                                            cfg.logging.sample_log_max_new_tokens, dist.device):
                    runlog.write("sample", state.step, s)
            if cfg.checkpoint.save_steps and state.step % cfg.checkpoint.save_steps == 0 and state.step < total_steps:
                save_checkpoints(f"checkpoint-{state.step}")
            times.lap("other")
            if state.step >= total_steps:
                break
        else:  # the epoch ran to its end
            step_gc.epoch_end()
            if has_val:
                runlog.write("val", state.step, {"epoch": epoch, **validation_loss(engine, stream)})
                last_val_step = state.step
            times.lap("other")
            state.epoch, state.batches_in_epoch = epoch + 1, 0
    bar.close()
    step_gc.close()
    if has_val and last_val_step != state.step:  # stopped mid-epoch (--max-steps): report where it ended too
        runlog.write("val", state.step, {"epoch": state.epoch, **validation_loss(engine, stream)})
    save_checkpoints("final")
    runlog.write("end", state.step, {"nan_steps_total": state.nan_steps_total})
    runlog.close()
    return state


def _merge_truncation(state: TrainerState, trunc: dict) -> None:
    for k, v in trunc.items():
        state.truncation[k] = state.truncation.get(k, 0) + v


def _progress(dist: DistInfo, total: int, start: int):
    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not dist.is_main, dynamic_ncols=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_train_config(argv)
    dist = init_distributed(cfg)
    setup_logging("trainer", rank=dist.rank)
    if dist.is_main:
        Path(cfg.checkpoint.output_dir).mkdir(parents=True, exist_ok=True)
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        print_config(cfg)
        save_config(cfg, Path(cfg.checkpoint.output_dir) / "train_config.json")
    try:
        state = train(cfg, dist)
        if dist.is_main:
            print(f"done: {state.step} steps; checkpoints in {cfg.checkpoint.output_dir}", flush=True)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
