"""The run's checkpoint component: resumes the run, and decides when to save (every --save-steps
before the last step, and at the end). The files and their layout are trainer/checkpoint.py's."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from data_prep.manifest import Stage1Record
from trainer.checkpoint import (
    TrainerState,
    load_resume_checkpoint,
    save_inference_checkpoint,
    save_resume_checkpoint,
    save_trained_checkpoint,
)
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, barrier
from trainer.skipped_steps import SkippedSteps

log = logging.getLogger("trainer")


class Checkpointer:
    def __init__(self, cfg: TrainConfig, dist: DistInfo, engine, tokenizer, cond_map: dict,
                 stage1: Optional[Stage1Record] = None):
        """`stage1`: the training shards' manifest `stage1` section, stored in every inference
        checkpoint so that eval can refuse latents made with another Stage1."""
        self.cfg, self.dist, self.engine, self.tokenizer, self.cond_map = cfg, dist, engine, tokenizer, cond_map
        self.stage1 = stage1
        self.out_dir = Path(cfg.checkpoint.output_dir)
        self.every = cfg.checkpoint.save_steps
        # collective hooks run on every rank before a save, to put what they own into the state
        self.before_save: list[Callable[[TrainerState], None]] = []

    def resume(self) -> TrainerState:
        """The saved state with --resume and a complete checkpoint (engine and RNGs restored), else a fresh one."""
        state = TrainerState(world_size=self.dist.world_size, seed=self.cfg.seed)
        if self.cfg.checkpoint.resume:
            # the newest complete, intact checkpoint (resume/latest is a hint); what was passed over is a warning
            state = load_resume_checkpoint(self.engine, self.out_dir, self.dist.rank, self.dist.world_size,
                                           warn=log.warning) or state
            log.info("resuming at step %d (epoch %d, batch %d)", state.step, state.epoch, state.batches_in_epoch)
        return state

    def maybe_save(self, state: TrainerState, total_steps: int, skips: SkippedSteps) -> None:
        if self.every and state.step % self.every == 0 and state.step < total_steps:
            self.save(state, f"checkpoint-{state.step}", skips)

    def save(self, state: TrainerState, tag: str, skips: SkippedSteps) -> None:
        """Collective: the resume checkpoint (every rank), then the inference checkpoint `tag` (rank 0
        writes it; under ZeRO-3 every rank helps gather the weights)."""
        skips.check()  # the saved NaN counters are exact
        for hook in self.before_save:
            hook(state)
        save_resume_checkpoint(self.engine, self.out_dir, state, self.dist.is_main,
                               keep=self.cfg.checkpoint.save_total_limit)
        full = self.engine.gathered_state_dict()  # collective; FSDP2: rank 0 gets the full weights
        if full is not None:
            if self.dist.is_main:
                save_inference_checkpoint(self.engine.module, self.tokenizer, self.cond_map, self.cfg,
                                          self.out_dir / tag, stage1=self.stage1, state_dict=full)
        else:  # replicated weights (rank 0 writes) or ZeRO-3 (gathered by every rank, rank 0 writes)
            save_trained_checkpoint(self.engine.module, self.tokenizer, self.cond_map, self.cfg, self.out_dir / tag,
                                    self.dist.is_main, stage1=self.stage1)
        barrier()
