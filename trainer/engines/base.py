"""What the training loop sees of an engine, whichever backend runs it."""

from __future__ import annotations

from typing import Optional

import torch

from models.collate import batch_to_device


class Engine:
    """What the training loop sees of an engine (both backends)."""

    device: torch.device
    dtype: torch.dtype  # compute dtype of the weights and of the float inputs
    flat_lora = None  # models.flat_lora.FlatLora when build_engine packed the LoRA weights
    reshardable = False  # whether its resume checkpoints load on another world size
    shards_parameters = False  # FSDP2: no rank holds the whole model (rank-0-only work cannot run)
    # True when each rank holds a slice of the weights (ZeRO-3): every forward, generation and weight
    # read (checkpoint saving) must then run on all ranks together
    partitions_weights = False

    @property
    def module(self) -> torch.nn.Module:
        raise NotImplementedError

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def to_device(self, batch: dict) -> dict:
        """Tensors to the device (floats to the compute dtype); other entries pass through."""
        return batch_to_device(batch, self.device, float_dtype=self.dtype)

    def forward(self, batch: dict):
        return self.module(self.to_device(batch))

    def gathered_state_dict(self) -> Optional[dict]:
        """Collective: the model's full weights for the inference checkpoint (rank 0), or None when
        every rank's model holds them already (the inference checkpoint then reads the model)."""
        return None
