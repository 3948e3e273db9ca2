"""Python's garbage collector, run at the same optimizer steps on every rank.

Automatic collections start whenever a rank's allocation counters say so: at a random step, one
rank pauses (a full collection scans every live Python object, many with a 7B model loaded) and every
other rank waits for it at the next gradient all-reduce, so each rank's pauses cost all of them.
Collecting only at every `interval`-th step, on all ranks at once, turns N ranks' scattered pauses
into one shared pause (the approach of torchtitan and Megatron-LM). Objects alive at start-up (the
model, tokenizer, data plan) are frozen out of the collector's scans, which makes each collection
cheaper too.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


class StepAlignedGC:
    """`interval` > 0: automatic GC off, a young-generation collection every `interval` steps and a
    full one at epoch ends; 0: Python's automatic GC, untouched. `close()` restores the automatic GC."""

    def __init__(self, interval: int):
        if interval < 0:
            raise ValueError(f"gc interval must be >= 0 (got {interval})")
        self.interval = interval
        self.active = interval > 0 and gc.isenabled()
        if self.active:
            gc.collect()
            gc.freeze()  # start-up objects live all run: no collection needs to scan them again
            gc.disable()
            log.info("python GC: automatic collection off; collecting every %d steps on all ranks", interval)

    def step(self, step: int) -> None:
        if self.active and step % self.interval == 0:
            gc.collect(1)

    def epoch_end(self) -> None:
        if self.active:
            gc.collect()

    def close(self) -> None:
        if self.active:
            gc.unfreeze()
            gc.enable()
            self.active = False
