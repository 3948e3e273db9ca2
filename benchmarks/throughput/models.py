"""The models the modes time: the project's `build_prefix_lm` with random weights of a real shape
(mode 4), and a plain HF + PEFT prefix-LM written here, independent of the project's model code
(modes 1-3)."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from benchmarks.make_random_model import shape_config
from benchmarks.throughput.config import LATENT_DIM, NUM_CLASSES, BenchConfig
from models.kernels import liger_patch_function
from models.prefix_lm import build_prefix_lm


def lm_config(shape: str, model_dir: Path, layers: int = 0):
    """The LM's config: the tiny model dir's own, or a real shape's (its first `layers` layers if > 0)."""
    if shape == "tiny":
        return AutoConfig.from_pretrained(model_dir)
    config = shape_config(shape)
    if layers:
        config.num_hidden_layers = layers
    return config


@contextlib.contextmanager
def random_weights(device: torch.device):
    """Make `from_pretrained` build the model from its config with random weights, directly on
    `device`: there are no 7B weights here, and their values don't change speed."""
    original = PreTrainedModel.__dict__["from_pretrained"]

    def from_config(cls, path, *args, config=None, **kwargs):
        config = config or AutoConfig.from_pretrained(path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if not isinstance(dtype, torch.dtype):
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        attn = kwargs.get("attn_implementation")
        with torch.device(device):
            return cls._from_config(config, dtype=dtype, **({"attn_implementation": attn} if attn else {}))

    PreTrainedModel.from_pretrained = classmethod(from_config)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original


class BaselinePrefix(nn.Module):
    """The seed's prefix, minimally: latent -> P token embeddings, plus a class embedding."""

    def __init__(self, hidden: int, num_image_tokens: int):
        super().__init__()
        self.num_image_tokens, self.hidden = num_image_tokens, hidden
        self.proj = nn.Linear(LATENT_DIM, num_image_tokens * hidden)
        self.cls = nn.Embedding(NUM_CLASSES, hidden)

    def forward(self, latents: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        img = self.proj(latents.to(self.proj.weight.dtype)).view(-1, self.num_image_tokens, self.hidden)
        return torch.cat([img, self.cls(cond_ids)[:, None]], dim=1)


class BaselinePrefixLM(nn.Module):
    """Plain HF + PEFT prefix-LM: prefix spliced into inputs_embeds, HF's own `labels=` loss."""

    def __init__(self, lm: nn.Module, prefix: BaselinePrefix):
        super().__init__()
        self.lm, self.prefix = lm, prefix

    def forward(self, batch: dict) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(batch["input_ids"])
        if "latents" in batch:
            pre = self.prefix(batch["latents"], batch["cond_ids"]).to(emb.dtype)
            emb = emb.masked_scatter(batch["prefix_mask"][..., None], pre.reshape(-1, emb.shape[-1]))
        out = self.lm(inputs_embeds=emb, attention_mask=batch.get("attention_mask"),
                      position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
        return out.loss


def build_baseline(cfg: BenchConfig, hf_config, attn: str, device: torch.device, dtype: torch.dtype,
                   liger: bool) -> BaselinePrefixLM:
    if liger:  # the shape's architecture's patch (class-level: the model built below gets it)
        liger_patch_function(hf_config.model_type)(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                                   fused_linear_cross_entropy=True)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn, dtype=dtype)
        prefix = BaselinePrefix(hf_config.hidden_size, cfg.model.num_image_tokens).to(dtype)
    m = cfg.model
    lm = get_peft_model(lm, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                       target_modules=list(m.lora_target_modules), task_type="CAUSAL_LM"))
    return BaselinePrefixLM(lm, prefix).train()


def build_project(cfg: BenchConfig, model_dir: Path, device: torch.device):
    mcfg = replace(cfg.model, model_path=str(model_dir))
    torch.manual_seed(cfg.seed)
    with random_weights(device):
        model, tokenizer = build_prefix_lm(mcfg, latent_dim=LATENT_DIM, num_classes=NUM_CLASSES, device=device)
    return model.to(device).train(), tokenizer
