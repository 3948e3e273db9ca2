"""`--engine fsdp2`: parameter-sharded training with PyTorch FSDP2 (`fully_shard`).

Every rank holds 1/world of every parameter (frozen base weights too), of its gradients and of its
optimizer state; a decoder layer's weights are all-gathered just before it runs and freed after,
so a base model that no single GPU can hold still trains. The pieces:

- Sharding: `fully_shard` per decoder layer, then on the whole PrefixLM (embeddings, head, final
  norm, prefix and Stage1 tail go with the root). Mixed precision by `MixedPrecisionPolicy`: the
  sharded trainable parameters are the fp32 master weights, the all-gathered copies are in the
  compute dtype (bf16 on GPU), gradients are reduce-scattered in fp32. Frozen base weights are
  stored in the compute dtype (a 70B base in fp32 would double its memory for nothing).
- No rank ever holds the whole model: the model comes from `build_prefix_lm(meta=True)` (base
  weights on the meta device), is sharded, materialised with `to_empty`, and each rank reads only
  its slice of each tensor from the safetensors files (`models.prefix_lm.load_base_shards`).
- Activation checkpointing per layer is the model's own (`--gradient-checkpointing`); the
  re-computation all-gathers the layer again. `--fsdp-cpu-offload` keeps the shards, gradients and
  optimizer state in host memory (AdamW then runs on the CPU).
- Same math as the other engines (trainer/engines/__init__.py): loss / gradient_accumulation_steps,
  gradients averaged over ranks, DeepSpeed's clipping, AdamW with the two LR groups, warm-up +
  cosine over APPLIED steps; a non-finite gradient norm skips the update. Unlike the torch engine,
  `step()` reads the norm on the host (one sync per optimizer step): a big model's step is long.
- Checkpoints: the sharded trainable weights + optimizer state with torch.distributed.checkpoint
  (DCP), which any world size can read back (resharding); the counters in a small JSON.
  `gathered_state_dict()` gathers the full trainable weights on rank 0 (CPU, one parameter at a time)
  for the inference checkpoint, which stays a standard PEFT adapter / Hugging Face model.

Flat LoRA packing (models/flat_lora.py) is switched off: its one tensor would span every layer,
so no layer could be gathered on its own (build_engine logs it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from common.io import atomic_write_json, sha256_file
from models.prefix_lm import load_base_shards
from trainer.checkpoint import FSDP2_DCP_DIR, FSDP2_ENGINE_STATE
from trainer.config import TrainConfig
from trainer.engines.base import Engine
from trainer.engines.optim import optimizer_groups, warmup_cosine

FSDP2_ENGINE_FORMAT = 1
DCP_METADATA = ".metadata"  # DCP's index file: pickled, so its hash is recorded and checked before loading

# Fills the parameters still on the meta device (by name) once the model is sharded and allocated.
MetaInit = Callable[[torch.nn.Module, list[str]], None]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units sharded one by one: the decoder layers of the PrefixLM's base LM."""
    return list(model.decoder.layers)


def shard_model(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype,
                cpu_offload: bool = False, meta_init: Optional[MetaInit] = None) -> list[str]:
    """`fully_shard` per decoder layer and on the root, then allocate and fill what is on meta.

    Trainable parameters become fp32 (the masters), frozen ones the compute dtype. `meta_init(model,
    names)` fills the parameters that were on the meta device (default: nothing may be). Returns those names."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                want = torch.float32 if p.requires_grad else compute_dtype
                if p.dtype != want:
                    p.data = p.data.to(want)
    if not dist.is_initialized():
        raise RuntimeError("--engine fsdp2 needs torch.distributed initialised (trainer.distributed.init_distributed)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    # The root's weights (embeddings, head) are used again right at the start of backward: keep them.
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)

    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        # to_empty re-allocates every tensor: keep the real ones (LoRA, prefix, RoPE buffers) across it
        real = {n: p.to_local().detach().clone() for n, p in model.named_parameters() if not p.is_meta}
        buffers = {(m, b): t.detach().clone() for m in model.modules() for b, t in m._buffers.items()
                   if t is not None and not t.is_meta}
        model.to_empty(device="cpu" if cpu_offload else device)  # offloaded shards live in host memory
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in real:
                    p.to_local().copy_(real[n])
        for (m, b), t in buffers.items():
            m._buffers[b] = t.to(device)  # buffers are used where compute runs, offloaded or not
        if meta_init is None:
            raise ValueError(f"{len(meta)} parameters on the meta device and nothing to fill them (e.g. {meta[0]})")
        meta_init(model, meta)
    return meta


class FSDP2Engine(Engine):
    """AdamW over FSDP2-sharded fp32 masters (see the module doc)."""

    reshardable = True  # its resume checkpoints load on another world size
    shards_parameters = True  # no rank holds the whole model: rank-0-only generation cannot run

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device,
                 dtype: torch.dtype, meta_init: Optional[MetaInit] = None):
        self.model, self.device, self.dtype = model, device, dtype
        o = cfg.optim
        self.grad_accum, self.max_grad_norm = o.gradient_accumulation_steps, o.max_grad_norm
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.cpu_offload = bool(getattr(cfg, "fsdp_cpu_offload", False))
        if meta_init is None:
            path = cfg.model.model_path
            meta_init = lambda m, names: load_base_shards(m, path, names)  # noqa: E731
        shard_model(model, device, dtype, self.cpu_offload, meta_init)
        groups = optimizer_groups(model, cfg)  # after sharding: the DTensor parameters
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "name": g["name"], "lr": g["lr"]} for g in groups],
            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
        self.base_lrs = [g["lr"] for g in groups]
        self.factor = warmup_cosine(total_steps, o.warmup_ratio, o.min_lr_ratio)
        self.applied_steps = 0
        self._set_lrs()
        self.micro_steps = 0
        self._skipped = 0
        self._grad_norm: Optional[float] = None

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def _set_lrs(self) -> None:
        f = self.factor(self.applied_steps)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def forward(self, batch: dict):
        # Gradients are reduce-scattered only at the end of an accumulation window.
        if torch.is_grad_enabled():
            self.model.set_requires_gradient_sync(self.is_boundary())
        return self.model(self.to_device(batch))

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def _global_grad_norm(self) -> torch.Tensor:
        """sqrt of the sum over ranks of each shard's squared norm (shards are disjoint)."""
        local = [(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad) for p in self.params
                 if p.grad is not None]
        comm_device = self.device  # nccl reduces device tensors, also with CPU-offloaded gradients
        sq = torch.zeros((), dtype=torch.float32, device=comm_device)
        if local:
            sq = sq + torch.stack(torch._foreach_norm(local, 2)).float().pow(2).sum().to(comm_device)
        if self.world_size > 1:
            dist.all_reduce(sq)
        return sq.sqrt()

    def step(self) -> bool:
        """At a boundary: the update; False when it was skipped (non-finite gradient norm)."""
        boundary = self.is_boundary()
        self.micro_steps += 1
        if not boundary:
            return True
        norm = self._global_grad_norm()
        self._grad_norm = float(norm)
        finite = bool(torch.isfinite(norm))
        if finite:
            if self.max_grad_norm > 0:  # DeepSpeed's clip: divide by max(1, (norm + 1e-6) / max_norm)
                clip = max(1.0, (self._grad_norm + 1e-6) / self.max_grad_norm)
                if clip > 1.0:
                    local = [(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad) for p in self.params
                             if p.grad is not None]
                    torch._foreach_div_(local, clip)
            self.optimizer.step()
            self.applied_steps += 1
            self._set_lrs()
        else:
            self._skipped += 1
        self.zero_grad()
        return finite

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    def lr(self) -> dict[str, float]:
        return {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups}

    def grad_norm(self) -> Optional[float]:
        return self._grad_norm

    # --- checkpoints --------------------------------------------------------------------------

    def _state_dicts(self) -> dict:
        opts = StateDictOptions(ignore_frozen_params=True)  # the frozen base comes from its files
        return {"model": get_model_state_dict(self.model, options=opts),
                "optim": get_optimizer_state_dict(self.model, self.optimizer, options=opts)}

    def save(self, save_dir: str | Path, tag: str, client_state: dict | None = None) -> None:
        """Collective: every rank writes its shards (DCP); rank 0 the counters and DCP's index hash."""
        ckpt = Path(save_dir) / tag
        if self.rank == 0 and (ckpt / FSDP2_DCP_DIR).exists():
            shutil.rmtree(ckpt / FSDP2_DCP_DIR)  # a resumed run saving this step again, maybe on other ranks
        dist.barrier()
        dcp.save(self._state_dicts(), checkpoint_id=str(ckpt / FSDP2_DCP_DIR))
        if self.rank == 0:
            atomic_write_json(ckpt / FSDP2_ENGINE_STATE, {
                "format": FSDP2_ENGINE_FORMAT, "applied_steps": self.applied_steps, "skipped_steps": self._skipped,
                "micro_steps": self.micro_steps, "world_size": self.world_size,
                "metadata_sha256": sha256_file(ckpt / FSDP2_DCP_DIR / DCP_METADATA), "client_state": client_state or {}})
        dist.barrier()

    def load(self, load_dir: str | Path, tag: str) -> dict:
        """Collective: restores the trainable weights, optimizer state and counters (any world size)."""
        ckpt = Path(load_dir) / tag
        state_path = ckpt / FSDP2_ENGINE_STATE
        if not state_path.is_file():
            raise FileNotFoundError(f"{state_path} not found: not an --engine fsdp2 checkpoint "
                                    "(resume with the engine that wrote it)")
        try:
            saved = json.loads(state_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{state_path}: unreadable ({e})") from e
        if saved.get("format") != FSDP2_ENGINE_FORMAT:
            raise ValueError(f"{state_path}: format {saved.get('format')!r}, expected {FSDP2_ENGINE_FORMAT}")
        meta = ckpt / FSDP2_DCP_DIR / DCP_METADATA
        # DCP unpickles its index: only a file this engine wrote (hash recorded at save) is read.
        if not meta.is_file() or sha256_file(meta) != saved.get("metadata_sha256"):
            raise ValueError(f"{meta}: missing or not the file saved with {state_path} (its sha256 differs); "
                             "refusing to unpickle it")
        state = self._state_dicts()
        dcp.load(state, checkpoint_id=str(ckpt / FSDP2_DCP_DIR))
        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
        missing = set_model_state_dict(self.model, state["model"], options=opts).missing_keys
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if trainable & set(missing):
            raise ValueError(f"{ckpt}: trainable parameters missing: {sorted(trainable & set(missing))[:5]}")
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=opts)
        self.applied_steps, self._skipped = int(saved["applied_steps"]), int(saved["skipped_steps"])
        self.micro_steps = int(saved["micro_steps"])
        self._set_lrs()
        self.zero_grad()
        return saved.get("client_state", {})

    def gathered_state_dict(self) -> dict:
        """Collective: the full weights on rank 0 (CPU), for the inference checkpoint ({} elsewhere).
        A LoRA run gathers its trainable weights only; a full fine-tune the whole model, in the
        compute dtype (the files of the other engines), one parameter at a time."""
        lora = any(not p.requires_grad for p in self.model.parameters())
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
        sd = get_model_state_dict(self.model, options=opts)
        if not lora:
            sd = {k: (v.to(self.dtype) if v.is_floating_point() and k.startswith("lm.") else v) for k, v in sd.items()}
        return sd

