"""Stage2 training: `python -m trainer.train` (one process per GPU; see launch/train.sh, train.sbatch).

    setup:  config -> process group -> manifest + Stage1 check -> model -> phases -> stream -> engine
            -> resume state -> components (checkpointer, metric logger, validator, sample logger)
    loop:   each micro-batch: forward, backward, engine step; after each optimizer step the
            components decide for themselves whether to log, sample or save; after each epoch,
            the exactly-once check of its samples (trainer/exactly_once.py) and the held-out loss.

Non-finite losses: the engine skips the update (engine.step() returns False, or a device False for
the torch engine, read at the next log/save step); more than --max-nan-steps in a row stops training
with an error, leaving the last good checkpoint (trainer/skipped_steps.py).
Host syncs happen at log steps only: per-step losses are accumulated on the device (trainer/metrics.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from common.cli import cli_main
from common.config import print_config, save_config
from common.io import sha256_file, stable_hash
from common.log import setup_logging
from common.runtime import resolve_dtype, resolve_precision, seed_everything
from data_prep.manifest import check_stage1_compatible, load_manifest
from models.prefix_lm import build_prefix_lm
from models.stage1 import load_stage1_encoder
from trainer.batch_tokens import BatchTokensChoice, resolve_batch_tokens
from trainer.checkpoint import TRAIN_CONFIG_FILE, TrainerState, resumed_batch_tokens
from trainer.checkpointer import Checkpointer
from trainer.config import TrainConfig, parse_train_config
from trainer.data import TrainStream
from trainer.distributed import DistInfo, cleanup, init_distributed
from trainer.engines import Engine, build_engine, zero3_model_init, zero_stage
from trainer.exactly_once import ExactlyOnce
from trainer.gc_steps import StepAlignedGC
from trainer.heartbeat import start_heartbeat
from trainer.metrics import MetricLogger, RunLog
from trainer.schedules import Phase, build_phases, phase_at, total_epochs
from trainer.skipped_steps import SkippedSteps
from trainer.validation import SampleLogger, Validator

log = logging.getLogger("trainer")


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, manifest, device: torch.device):
    """The prefix-LM (+ the trainable Stage1 tail when K > 0) and its tokenizer. Under ZeRO-3 the LM
    is created partitioned (`zero3_model_init`): no rank holds the whole base model."""
    if cfg.model.compile != "off" and (cfg.engine == "fsdp2" or zero_stage(cfg) == 3):
        raise ValueError(f"--compile {cfg.model.compile}: compiled layers need an engine that keeps whole weights on "
                         f"each GPU (deepspeed ZeRO-1/2, torch, ddp); --engine {cfg.engine} shards them "
                         "(use --compile off)")
    tail = None
    k = cfg.stage1.stage1_trainable_blocks
    if k > 0:
        tail = load_stage1_encoder(cfg.stage1.stage1_encoder_ckpt, pooling=cfg.stage1.latent_pooling).tail(k)
    # fsdp2: the base weights stay on the meta device until each rank loads its own shard of them;
    # ZeRO-3: built partitioned (zero.Init), no rank holds the whole base
    with zero3_model_init(cfg, resolve_precision(cfg.model.precision, device)):
        return build_prefix_lm(cfg.model, latent_dim=manifest.stage1.latent_dim,
                               num_classes=len(manifest.cond_name_to_id), tail=tail, device=device,
                               meta=cfg.engine == "fsdp2")


def check_shards(cfg: TrainConfig):
    """The manifest, refusing shards built with other Stage1 settings/checkpoints than configured."""
    manifest = load_manifest(cfg.data.shard_dir)
    s = cfg.stage1
    check_stage1_compatible(manifest, s,
                            sha256_file(s.stage1_encoder_ckpt) if s.stage1_encoder_ckpt else None,
                            sha256_file(s.stage1_classifier_ckpt) if s.stage1_classifier_ckpt else None)
    return manifest


@dataclass(frozen=True)
class StepPlan:
    """How many batches and optimizer steps each epoch has, and where the run stops. With
    --batch-tokens, phases of other task mixes have other batch sizes, hence other step counts."""

    batches_per_epoch: list[int]
    steps_per_epoch: list[int]
    total_steps: int

    @classmethod
    def of(cls, stream: TrainStream, phases: list[Phase], cfg: TrainConfig) -> "StepPlan":
        batches = [stream.num_batches(e) for e in range(total_epochs(phases))]
        steps = [math.ceil(b / cfg.optim.gradient_accumulation_steps) for b in batches]
        total = sum(steps) if cfg.max_steps < 0 else min(cfg.max_steps, sum(steps))
        return cls(batches, steps, total)

    @property
    def num_epochs(self) -> int:
        return len(self.batches_per_epoch)


def choose_batch_tokens(cfg: TrainConfig, model, tokenizer, manifest, dist: DistInfo) -> BatchTokensChoice:
    """--batch-tokens resolved (trainer/batch_tokens.py); a resumed run keeps its recorded budget."""
    resumed = resumed_batch_tokens(cfg.checkpoint.output_dir, dist.rank) if cfg.checkpoint.resume else None
    return resolve_batch_tokens(
        cfg.data, model, dist.device, resolve_dtype(cfg.model.precision, dist.device), resumed,
        seq_len=cfg.data.max_seq_len, num_image_tokens=cfg.model.num_image_tokens,
        latent_dim=manifest.stage1.latent_dim, pad_id=tokenizer.pad_token_id,
        vocab_size=min(len(tokenizer), model.base_lm.get_input_embeddings().num_embeddings))


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Dropout RNG of one micro-batch: a pure function of its position, so resume is exact
    regardless of how many random numbers anything else (data loader start-up) drew."""
    return stable_hash(f"{seed}/{step}/{micro}/{rank}") % 2**63


def forward_backward(engine: Engine, batch: dict, cfg: TrainConfig, state: TrainerState, micro: int, rank: int):
    torch.manual_seed(step_seed(cfg.seed, state.step, micro, rank))
    out = engine.forward(batch)
    loss = out.loss * float("nan") if state.step + 1 in cfg.debug_nan_at_steps else out.loss
    engine.backward(loss)
    return out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, dist: DistInfo) -> TrainerState:
    seed_everything(cfg.seed)
    manifest = check_shards(cfg)
    model, tokenizer = build_model(cfg, manifest, dist.device)
    budget = choose_batch_tokens(cfg, model, tokenizer, manifest, dist)
    phases = build_phases(cfg.schedule)
    stream = TrainStream(manifest, cfg.data.shard_dir, tokenizer, cfg.data, phases, cfg.model.num_image_tokens,
                         dist.rank, dist.world_size, cfg.seed, batch_tokens=budget.tokens)
    plan = StepPlan.of(stream, phases, cfg)
    engine = build_engine(model, cfg, plan.total_steps, dist.device)
    checkpointer = Checkpointer(cfg, dist, engine, tokenizer, manifest.cond_name_to_id, stage1=manifest.stage1)
    state = checkpointer.resume()
    state.batch_tokens = budget.tokens
    runlog = RunLog(cfg, dist)
    runlog.write("start", state.step, {"total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
                                       "batches_per_epoch": plan.batches_per_epoch,
                                       "batch_size_per_phase": stream.phase_batch_sizes, "world_size": dist.world_size,
                                       **budget.record()})
    skips = SkippedSteps(state, cfg.checkpoint.max_nan_steps, checkpointer.out_dir)
    exactly_once = ExactlyOnce(manifest, dist, runlog, state, strict=cfg.data.strict_exactly_once)
    checkpointer.before_save.append(exactly_once.fold_into)
    validator = Validator(cfg, engine, stream, runlog, plan.total_steps)
    samples = SampleLogger(cfg, dist, engine, tokenizer, stream, runlog)
    validator.at_start(state)

    engine.train()
    logger = MetricLogger(cfg, dist, runlog, skips, plan.total_steps, state.step)  # its first window starts here
    step_gc = StepAlignedGC(cfg.gc_interval_steps)
    micro = 0
    for epoch in range(state.epoch, plan.num_epochs):
        if state.step >= plan.total_steps:
            break
        state.epoch = epoch
        log.info("epoch %d: phase %s", epoch, phase_at(phases, epoch).name)
        for batch in stream.loader(epoch, skip_batches=state.batches_in_epoch):
            logger.lap("data")
            out = forward_backward(engine, batch, cfg, state, micro, dist.rank)
            logger.micro_batch(out, batch)
            exactly_once.add(batch)
            state.batches_in_epoch += 1
            boundary = engine.is_boundary()
            logger.lap("fwd_bwd")
            applied = engine.step()
            logger.lap("step")
            micro += 1
            if not boundary:
                continue
            micro, state.step = 0, state.step + 1
            skips.add(state.step, applied)
            step_gc.step(state.step)
            logger.step(state, applied, engine, epoch)
            samples.maybe_sample(state.step)
            checkpointer.maybe_save(state, plan.total_steps, skips)
            logger.lap("other")
            if state.step >= plan.total_steps:
                break
        else:  # the epoch ran to its end
            step_gc.epoch_end()
            exactly_once.at_epoch_end(state, epoch)
            validator.at_epoch_end(state, epoch)
            logger.lap("other")
            state.epoch, state.batches_in_epoch = epoch + 1, 0
    logger.close()
    step_gc.close()
    if state.epoch < plan.num_epochs:  # stopped by --max-steps inside (or at the last batch of) an epoch
        exactly_once.at_end(state, state.batches_in_epoch == plan.batches_per_epoch[state.epoch])
    validator.at_end(state)
    checkpointer.save(state, "final", skips)
    runlog.write("end", state.step, {"nan_steps_total": state.nan_steps_total})
    runlog.close()
    return state


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_train_config(argv)
    dist = init_distributed(cfg)
    setup_logging("trainer", rank=dist.rank)
    heartbeat = start_heartbeat(cfg.hang_timeout, dist.rank, dist.world_size)
    if dist.is_main:
        Path(cfg.checkpoint.output_dir).mkdir(parents=True, exist_ok=True)
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        print_config(cfg)
        save_config(cfg, Path(cfg.checkpoint.output_dir) / TRAIN_CONFIG_FILE)
    try:
        state = train(cfg, dist)
        if dist.is_main:
            print(f"done: {state.step} steps; checkpoints in {cfg.checkpoint.output_dir}", flush=True)
    finally:
        heartbeat.stop()
        cleanup()


if __name__ == "__main__":
    main()
