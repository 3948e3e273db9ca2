"""Training metrics and the run's log: what the loop reports, and when it is written.

    MetricLogger      the component the loop talks to: fed every micro-batch and optimizer step, it
                      decides when to log (every --log-steps and at the last step) and drives the
                      progress bar
    Metrics           loss sums per task accumulated on the device, host-side counts from the collator
    RankTimes         where each rank's wall time goes per step (data wait, fwd+bwd issue, step, other)
    RankTimeWarnings  plain-language warnings from RankTimes (data-bound rank, straggler)
    RunLog            train_log.jsonl (+ wandb) on rank 0

Between log steps nothing here syncs the host with the device: losses stay on the device and the
counts are Python ints; at a log step one all-reduce and one all-gather turn them into a record.
"""

from __future__ import annotations

import html
import logging
import time
import uuid
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.config import config_to_dict
from common.io import append_jsonl, atomic_write_text
from models.tasks import TASKS
from trainer.checkpoint import TrainerState
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, all_gather_rows, all_reduce_sum
from trainer.skipped_steps import SkippedSteps

log = logging.getLogger("trainer")

TRAIN_LOG_FILE = "train_log.jsonl"


class MetricLogger:
    """Per-step bookkeeping of the loop; writes a `train` record every `--log-steps` steps and at
    the last step. Its first timing window starts when it is created."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, runlog: "RunLog", skips: SkippedSteps,
                 total_steps: int, start_step: int):
        self.log_steps, self.total_steps = cfg.logging.log_steps, total_steps
        self.runlog, self.skips = runlog, skips
        self.metrics, self.times = Metrics(dist.device), RankTimes(dist.device)
        self.warnings = RankTimeWarnings(dist.is_main)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not dist.is_main,
                        dynamic_ncols=True)

    def lap(self, phase: str) -> None:
        self.times.lap(phase)

    def micro_batch(self, out, batch: dict) -> None:
        self.metrics.add_micro_batch(out, batch)

    def step(self, state: TrainerState, applied: bool | torch.Tensor, engine, epoch: int) -> None:
        """After optimizer step `state.step`: count it, and write a record when one is due."""
        self.metrics.end_step(applied)
        self.times.end_step()
        if state.step % self.log_steps == 0 or state.step == self.total_steps:
            self.skips.check()  # the record's NaN counters are exact
            rec = self.metrics.reduce_and_reset()
            state.tokens_seen += rec["real_tokens"]
            for k, v in rec["truncation"].items():
                state.truncation[k] = state.truncation.get(k, 0) + v
            rec.update(epoch=epoch, lr=engine.lr(), tokens_seen=state.tokens_seen,
                       nan_steps_total=state.nan_steps_total, rank_ms_per_step=self.times.gather_and_reset())
            self.runlog.write("train", state.step, rec)
            self.warnings.check(state.step, rec["rank_ms_per_step"])
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


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


class RunLog:
    """train_log.jsonl (+ wandb) on rank 0. Every record is one line: {"kind": ..., "step": ...}."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo):
        self.enabled = dist.is_main
        self.path = cfg.log_dir / TRAIN_LOG_FILE
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
                import wandb  # optional: only with --use-wandb

                text = f"GEN: {record.get('generation', '')}\nREF: {record.get('reference', '')}"
                flat = {f"sample/{record.get('task', '')}": wandb.Html(f"<pre>{html.escape(text)}</pre>")}
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(cfg: TrainConfig):
    """wandb run that a requeued job continues (its id is kept in the output dir)."""
    import wandb  # optional: only with --use-wandb

    id_file = Path(cfg.checkpoint.output_dir) / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    atomic_write_text(id_file, run_id)
    return wandb.init(project=cfg.logging.wandb_project, id=run_id, resume="allow", dir=str(cfg.log_dir),
                      name=cfg.logging.wandb_run_name or Path(cfg.checkpoint.output_dir).name,
                      config=config_to_dict(cfg))
