"""Non-finite steps: counted in the TrainerState, too many in a row stop the run."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.cli import UserError
from trainer.checkpoint import TrainerState

log = logging.getLogger("trainer")


class NonFiniteLossError(UserError, RuntimeError):
    pass


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
