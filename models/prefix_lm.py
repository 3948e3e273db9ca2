"""The Stage2 prefix-LM: a causal LM (LoRA via PEFT) fed an image prefix built from Stage1 latents.

    latent [768] --LayerNorm-Linear-GELU-Linear--> num_image_tokens x hidden  ┐
    cond_id      --Embedding------------------->            1 x hidden       ┘ = prefix [P, hidden]

The prefix replaces the embeddings of the P prefix slots that `models.collate` reserves after
BOS (`prefix_mask`). The loss is computed from the decoder's hidden states at the positions that
predict a target token only, by a chunked (or Liger fused) linear + cross-entropy, so the full
[tokens, vocab] logits of a batch are never materialised (see `models.kernels`).

Attention backends for packed rows live in `models.attention`; `ModelConfig.attn_implementation`
picks one ("auto" = fastest that works on the device).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
from accelerate import init_empty_weights  # a dependency of peft
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from common.io import atomic_path, atomic_write_json
from common.runtime import resolve_device, resolve_dtype
from models import attention as attn
from models import kernels, lora_fused
from models.layer_compile import COMPILE_CHOICES, compile_decoder_layers, resolve_compile
from models.stage1 import TAIL_FILENAME, Stage1Tail
from models.tasks import TASKS
from models.zero3 import gathered

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name, written by save_adapter
PREFIX_WEIGHTS = "stage2_prefix_modules.safetensors"
PREFIX_CONFIG = "prefix_config.json"
SEED_PREFIX_WEIGHTS = "stage2_prefix_modules.pt"
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_CHOICES = ("auto", "none", "chunked", "liger", "liger_flce")
# E[gelu(z)^2] for z ~ N(0, 1): sets the output projection's init so the prefix matches the
# LM's embedding scale.
_GELU_SECOND_MOMENT = 0.4252


@dataclass
class ModelConfig:
    model_path: str = field(default="", metadata={"help": "local directory of the base causal LM + tokenizer (e.g. Mistral-7B-Instruct-v0.3)"})
    use_lora: bool = field(default=True, metadata={"help": "train LoRA adapters on a frozen LM (--no-use-lora: train the whole LM)"})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), metadata={"help": "module names that get LoRA adapters"})
    num_image_tokens: int = field(default=4, metadata={"help": "prefix tokens projected from the Stage1 latent (+1 class embedding)"})
    attn_implementation: Literal["auto", "packed_sdpa", "varlen", "flex", "flash_attn", "sdpa", "eager"] = field(
        default="auto", metadata={"help": "attention kernel; packed rows use packed_sdpa (exact, any device), varlen "
                                           "(torch varlen_attn, CUDA), flex (flex_attention) or flash_attn; sdpa/eager are "
                                           "stock HF (dense mask for packed rows). auto: CUDA -> varlen > flash_attn > flex, "
                                           "CPU -> packed_sdpa"})
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={"help": "LM weight dtype; auto = bf16 on GPU, fp32 on CPU"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder layers in backward (less activation memory, at the cost of a second forward of each layer)"})
    gradient_checkpointing_layers: int = field(default=-1, metadata={
        "help": "with --gradient-checkpointing: recompute only the first N decoder layers (-1 = all); "
                "trades memory for speed in steps of one layer's activations"})
    fused_lora: bool = field(default=True, metadata={
        "help": "fused LoRA forward (models.lora_fused): scale + add inside the LoRA-B GEMM, one dropout "
                "mask per shared input (q/k/v, gate/up); same parameters and PEFT adapter files"})
    flat_lora: bool = field(default=True, metadata={
        "help": "training packs every LoRA weight into one trainable tensor (models.flat_lora), so the engine "
                "(DeepSpeed's per-tensor hooks, checks and norms) handles 1 tensor instead of ~450; needs "
                "--fused-lora; adapter files stay standard PEFT"})
    fused_kernels: Literal["auto", "none", "chunked", "liger", "liger_flce"] = field(
        default="auto", metadata={"help": "loss/kernels: none = full logits + cross-entropy (HF-equivalent); chunked = "
                                           "exact chunked linear+CE (portable); liger = Liger Triton kernels for RoPE, "
                                           "RMSNorm, SwiGLU (CUDA) + the chunked linear+CE, which never syncs with the "
                                           "host; liger_flce = the same with Liger's fused linear+CE (two host syncs per "
                                           "step). auto: liger if installed on CUDA, else chunked"})
    ce_chunk_size: int = field(default=2048, metadata={"help": "tokens per chunk of the chunked linear+cross-entropy"})
    compile: Literal["auto", "on", "off"] = field(default="off", metadata={
        "help": "torch.compile each decoder layer (models/layer_compile.py): the compiler fuses the elementwise work "
                "between the GEMMs (norms, RoPE, SwiGLU, LoRA dropout, residual adds); Liger's kernels are then not "
                "used. auto = on for CUDA; off = the eager modules"})

    def validate(self) -> None:
        if self.num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {self.num_image_tokens}")
        if self.use_lora and (self.lora_r < 1 or not self.lora_target_modules):
            raise ValueError("use_lora needs lora_r >= 1 and at least one lora_target_modules entry")
        if self.gradient_checkpointing_layers < -1:
            raise ValueError(f"gradient_checkpointing_layers must be >= -1, got {self.gradient_checkpointing_layers}")
        if self.ce_chunk_size < 1:
            raise ValueError(f"ce_chunk_size must be >= 1, got {self.ce_chunk_size}")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")


# ---------------------------------------------------------------------------------------------
# The image prefix
# ---------------------------------------------------------------------------------------------

class Stage2Prefix(nn.Module):
    """Stage1 latent + image-type id -> `num_image_tokens + 1` LM input embeddings."""

    def __init__(self, latent_dim: int, hidden_size: int, num_image_tokens: int, num_classes: int = 20,
                 tail: nn.Module | None = None, proj_dim: int | None = None, init_std: float = 0.02):
        super().__init__()
        self.latent_dim, self.hidden_size = latent_dim, hidden_size
        self.num_image_tokens, self.num_classes = num_image_tokens, num_classes
        self.proj_dim = proj_dim or hidden_size
        # The Stage1 latent's scale is whatever the MAE produced: normalise it so that the
        # projection's init (and learning rate) do not depend on it.
        self.latent_norm = nn.LayerNorm(latent_dim)
        self.proj = nn.Sequential(nn.Linear(latent_dim, self.proj_dim), nn.GELU(),
                                  nn.Linear(self.proj_dim, num_image_tokens * hidden_size))
        self.class_embed = nn.Embedding(num_classes, hidden_size)
        self.tail = tail
        self.reset_scale(init_std)

    @torch.no_grad()
    def reset_scale(self, target_std: float) -> None:
        """Init so every prefix element has std ~ `target_std` (the LM token embeddings' std)."""
        nn.init.normal_(self.proj[0].weight, std=1.0 / math.sqrt(self.latent_dim))
        nn.init.zeros_(self.proj[0].bias)
        nn.init.normal_(self.proj[2].weight, std=target_std / math.sqrt(self.proj_dim * _GELU_SECOND_MOMENT))
        nn.init.zeros_(self.proj[2].bias)
        nn.init.normal_(self.class_embed.weight, std=target_std)

    @property
    def prefix_len(self) -> int:
        return self.num_image_tokens + 1

    def forward(self, latents: torch.Tensor, cond_ids: torch.Tensor,
                block_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if self.tail is not None and block_tokens is not None:
            latents = self.tail(block_tokens)
        x = self.latent_norm(latents.to(self.latent_norm.weight.dtype))
        image = self.proj(x).view(-1, self.num_image_tokens, self.hidden_size)
        cls = self.class_embed(cond_ids).unsqueeze(1)
        return torch.cat([image, cls], dim=1)

    def config_dict(self) -> dict:
        return {"format_version": 1, "latent_dim": self.latent_dim, "hidden_size": self.hidden_size,
                "num_image_tokens": self.num_image_tokens, "num_classes": self.num_classes,
                "proj_dim": self.proj_dim, "has_tail": self.tail is not None}

    def save(self, out_dir: str | Path, state_dict: dict | None = None) -> None:
        """Write `stage2_prefix_modules.safetensors` + `prefix_config.json` (+ the Stage1 tail).
        `state_dict`: this module's full weights when its own are sharded (gathered by the engine)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        full = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().float().cpu().contiguous() for k, v in full.items() if not k.startswith("tail.")}
        with atomic_path(out_dir / PREFIX_WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_json(out_dir / PREFIX_CONFIG, self.config_dict())
        if self.tail is not None:
            tail_state = None if state_dict is None else {k[len("tail."):]: v for k, v in full.items()
                                                          if k.startswith("tail.")}
            self.tail.save(out_dir / TAIL_FILENAME, state_dict=tail_state)

    @classmethod
    def load(cls, ckpt_dir: str | Path, map_location="cpu") -> "Stage2Prefix":
        """Load from `save`'s files, or from the seed's `stage2_prefix_modules.pt`."""
        ckpt_dir = Path(ckpt_dir)
        if (ckpt_dir / PREFIX_WEIGHTS).exists():
            return cls._load_safetensors(ckpt_dir, map_location)
        if (ckpt_dir / SEED_PREFIX_WEIGHTS).exists():
            return cls._load_seed(ckpt_dir / SEED_PREFIX_WEIGHTS, map_location)
        raise FileNotFoundError(f"{ckpt_dir}: neither {PREFIX_WEIGHTS} nor {SEED_PREFIX_WEIGHTS} found")

    @classmethod
    def _load_safetensors(cls, ckpt_dir: Path, map_location) -> "Stage2Prefix":
        cfg_path = ckpt_dir / PREFIX_CONFIG
        try:
            cfg = json.loads(cfg_path.read_text())
            kwargs = {k: int(cfg[k]) for k in ("latent_dim", "hidden_size", "num_image_tokens", "num_classes", "proj_dim")}
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{cfg_path}: unreadable prefix config ({e!r})") from e
        tail = None
        if cfg.get("has_tail"):
            if not (ckpt_dir / TAIL_FILENAME).exists():
                raise FileNotFoundError(f"{cfg_path} says has_tail but {ckpt_dir / TAIL_FILENAME} is missing")
            tail = Stage1Tail.load(ckpt_dir / TAIL_FILENAME)
        prefix = cls(tail=tail, **kwargs)
        state = load_file(str(ckpt_dir / PREFIX_WEIGHTS), device=str(map_location))
        _load_strict(prefix, state, ckpt_dir / PREFIX_WEIGHTS, skip_prefix="tail.")
        return prefix.to(map_location)

    @classmethod
    def _load_seed(cls, path: Path, map_location) -> "Stage2Prefix":
        """The seed saved a torch state dict; infer the dims from the weight shapes."""
        obj = torch.load(path, map_location=map_location, weights_only=True)
        for key in ("state_dict", "model", "prefix"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        try:
            w0, w2 = state["proj.0.weight"], state["proj.2.weight"]
            cls_w = state["class_embed.weight"]
        except KeyError as e:
            raise ValueError(f"{path}: seed prefix checkpoint lacks {e}; keys: {sorted(state)[:20]}") from e
        num_classes, hidden = cls_w.shape
        prefix = cls(latent_dim=w0.shape[1], hidden_size=hidden, num_image_tokens=w2.shape[0] // hidden,
                     num_classes=num_classes, proj_dim=w0.shape[0])
        if "latent_norm.weight" not in state:  # the seed had no input LayerNorm: make it the identity
            state["latent_norm.weight"] = torch.ones(w0.shape[1])
            state["latent_norm.bias"] = torch.zeros(w0.shape[1])
        _load_strict(prefix, state, path)
        return prefix.to(map_location)


def _load_strict(module: nn.Module, state: dict, source, skip_prefix: str | None = None) -> None:
    own = {k for k in module.state_dict() if not (skip_prefix and k.startswith(skip_prefix))}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the prefix module (missing {missing}, unexpected {unexpected})")
    module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------
# The prefix-LM
# ---------------------------------------------------------------------------------------------

def embed_with_prefix(lm: nn.Module, prefix: "Stage2Prefix", batch: dict) -> torch.Tensor:
    """The splice, for training and for an exported model alike: `lm`'s token embeddings of
    `batch["input_ids"]` with the prefix slots (`prefix_mask`) replaced by `prefix`'s output: [R, L, H]."""
    embeds = lm.get_input_embeddings()(batch["input_ids"])
    if batch.get("latents") is None:
        return embeds
    out = prefix(batch["latents"], batch["cond_ids"], batch.get("block_tokens"))
    mask, index = batch["prefix_mask"], batch.get("prefix_index")
    slots = index.numel() if index is not None else (None if mask.is_cuda else int(mask.sum()))
    if slots is not None and slots != out.shape[0] * out.shape[1]:  # host-known count: a free check
        raise ValueError(f"batch has {slots} prefix slots but {out.shape[0]} image examples x "
                         f"{out.shape[1]} prefix tokens")
    # Row-major order of the slots == example order == order of `latents`.
    out = out.to(embeds.dtype).reshape(-1, embeds.shape[-1])
    if index is None:  # a batch from elsewhere: masked_scatter (its backward syncs on CUDA)
        return embeds.masked_scatter(mask.unsqueeze(-1), out)
    # index_copy's backward is index_select: no device sync in the step (collate made the index)
    return embeds.reshape(-1, embeds.shape[-1]).index_copy(0, index, out).view(embeds.shape)


class PrefixLMOutput(NamedTuple):
    loss: torch.Tensor             # mean CE over the batch's target tokens (0 if it has none)
    task_loss_sum: torch.Tensor    # [4] summed per-token loss per task (detached), for logging
    task_token_count: torch.Tensor  # [4] target tokens per task
    loss_sum: torch.Tensor | None = None     # summed CE (with grad), for token-weighted reductions
    num_loss_tokens: torch.Tensor | None = None
    # per-token CE of the scored positions: the target tokens in example/position order when the
    # batch has `loss_index` (collate adds it), else every position (0 where not a target)
    token_losses: torch.Tensor | None = None


class PrefixLM(nn.Module):
    """The (PEFT-wrapped) causal LM + the Stage2 prefix; `forward(batch)` takes `models.collate` batches."""

    def __init__(self, lm: nn.Module, prefix: Stage2Prefix, loss_impl: str = "chunked",
                 ce_chunk_size: int = kernels.DEFAULT_CHUNK_SIZE):
        super().__init__()
        if loss_impl not in ("none", "chunked", "liger", "liger_flce"):
            raise ValueError(f"loss_impl {loss_impl!r}; choices: none, chunked, liger, liger_flce")
        self.lm = lm
        self.prefix = prefix
        self.loss_impl = loss_impl
        self.ce_chunk_size = ce_chunk_size

    # -- the pieces of the wrapped HF model ---------------------------------------------------
    @property
    def base_lm(self) -> nn.Module:
        """The HF *ForCausalLM under the PEFT wrapper (or the plain model)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def decoder(self) -> nn.Module:
        return self.base_lm.get_decoder()

    @property
    def attn_implementation(self) -> str:
        return self.base_lm.config._attn_implementation

    # -- inputs ---------------------------------------------------------------------------------
    def embed(self, batch: dict) -> torch.Tensor:
        """Token embeddings with the prefix slots replaced by the prefix output: [R, L, H]."""
        return embed_with_prefix(self.base_lm, self.prefix, batch)

    def _decoder_kwargs(self, batch: dict) -> dict:
        kw = {"position_ids": batch["position_ids"], "use_cache": False}
        if batch.get("attention_mask") is not None:
            kw["attention_mask"] = batch["attention_mask"]
        if attn.is_packed_backend(self.attn_implementation):
            kw.update(attn.packed_attention_kwargs(batch))
        return kw

    # -- loss -----------------------------------------------------------------------------------
    def _per_token_ce(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        head = self.base_lm.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        if self.loss_impl == "liger_flce":
            return kernels.liger_linear_cross_entropy(hidden, weight, labels, bias)
        if self.loss_impl in ("chunked", "liger"):  # liger: Liger's layer kernels, this loss
            return kernels.linear_cross_entropy(hidden, weight, labels, self.ce_chunk_size, bias)
        return kernels.reference_cross_entropy(hidden, weight, labels, bias)

    def forward(self, batch: dict) -> PrefixLMOutput:
        flat = self._modules.get("flat_lora")  # models.flat_lora: set when an engine packed the adapters
        if flat is not None and torch.is_grad_enabled():
            flat.publish()
        inputs_embeds = self.embed(batch)
        try:
            hidden = self.decoder(inputs_embeds=inputs_embeds, **self._decoder_kwargs(batch)).last_hidden_state
        finally:
            # The fused LoRA layers' shared dropout remembers the last input; autograd holds what
            # backward needs, so let the cache go (activation-checkpoint recomputes draw afresh).
            cache = lora_fused.shared_dropout_cache(self.lm)
            if cache is not None:
                cache.clear()

        # Hidden state at position t predicts the label at t + 1 (within a row; a packed
        # example starts with BOS / a prompt token whose label is -100, so nothing crosses).
        labels, task_ids = batch["labels"], batch["task_ids"]
        shifted = torch.full_like(labels, kernels.IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        shifted_tasks = torch.full_like(task_ids, -1)
        shifted_tasks[:, :-1] = task_ids[:, 1:]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        shifted, shifted_tasks = shifted.reshape(-1), shifted_tasks.reshape(-1)
        index = batch.get("loss_index")
        if index is not None:  # only the positions that predict a target token (collate-computed)
            hidden, shifted, shifted_tasks = hidden[index], shifted[index], shifted_tasks[index]

        token_losses = self._per_token_ce(hidden, shifted)
        valid = shifted != kernels.IGNORE_INDEX
        num_tokens = valid.sum()
        loss_sum = token_losses.sum()
        loss = loss_sum / num_tokens.clamp(min=1)

        task = shifted_tasks.clamp(min=0)
        task_loss_sum = token_losses.new_zeros(len(TASKS)).index_add_(0, task, token_losses.detach())
        task_token_count = token_losses.new_zeros(len(TASKS)).index_add_(0, task, valid.float())
        return PrefixLMOutput(loss, task_loss_sum, task_token_count, loss_sum, num_tokens, token_losses)

    # -- generation -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def stock_attention(self, name: str = "sdpa"):
        """Temporarily use a stock HF attention (KV cache + 2-D padding masks), e.g. for generate."""
        config = self.base_lm.config
        old = config._attn_implementation
        config._attn_implementation = name
        try:
            yield
        finally:
            config._attn_implementation = old

    @torch.no_grad()
    def generate(self, batch: dict, **generate_kwargs) -> torch.Tensor:
        """Greedy/sampled generation from a `collate_generation` batch; returns the new token ids."""
        with self.stock_attention("sdpa" if attn.is_packed_backend(self.attn_implementation)
                                  else self.attn_implementation):
            inputs_embeds = self.embed(batch)
            generate_kwargs.setdefault("use_cache", True)
            return self.lm.generate(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"],
                                    **generate_kwargs)


# ---------------------------------------------------------------------------------------------
# Building, parameter groups, adapters
# ---------------------------------------------------------------------------------------------


def resolve_fused_kernels(name: str, device: torch.device, model_type: str | None = None,
                          compiled: bool = False) -> str:
    """The loss/kernel path for `fused_kernels=name` on `device` for an architecture (`model_type`,
    None = assume one Liger supports): auto = liger when installed on CUDA and Liger has a patch for
    the architecture (`models.kernels.LIGER_PATCHES`), else chunked. Compiled layers (`compiled`)
    take no Liger kernels: auto gives chunked, liger / liger_flce are refused."""
    if name not in FUSED_CHOICES:
        raise ValueError(f"fused_kernels={name!r}; choices: {FUSED_CHOICES}")
    if compiled and name in ("liger", "liger_flce"):
        raise ValueError(f"fused_kernels={name!r} with --compile: the compiler generates the RMSNorm / RoPE / "
                         "SwiGLU kernels itself; use --fused-kernels auto (or chunked), or --compile off")
    liger_ok = device.type == "cuda" and kernels.liger_available() and not compiled
    arch_ok = model_type is None or kernels.has_fused_kernels(model_type)
    if name == "auto":
        return "liger" if liger_ok and arch_ok else "chunked"
    if name in ("liger", "liger_flce") and not arch_ok:
        raise ValueError(f"fused_kernels={name!r}: no Liger kernels for model_type {model_type!r} (have: "
                         f"{', '.join(sorted(kernels.LIGER_PATCHES))}); use 'auto' or 'chunked'")
    if name in ("liger", "liger_flce") and not liger_ok:
        raise RuntimeError(f"fused_kernels={name!r} needs liger_kernel installed and a CUDA device")
    return name


# What a local Hugging Face model directory holds. Checked before transformers reads it, which
# otherwise reports a missing tokenizer as "install sentencepiece" and a missing config.json as a hub lookup.
MODEL_CONFIG_FILE = "config.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
MODEL_DIR_EXPECTED = (f"a local Hugging Face model directory with {MODEL_CONFIG_FILE}, the weights "
                      f"(*.safetensors or *.bin) and the tokenizer files ({', '.join(TOKENIZER_FILES)})")


class ModelDirError(FileNotFoundError):
    """A model (or tokenizer) directory that does not exist or lacks the files transformers needs."""


def _model_dir_problem(path: Path, parts: tuple[str, ...]) -> str | None:
    """Why `path` is no directory holding `parts` ("config", "weights", "tokenizer"): a phrase such as
    "does not exist" or "has no config.json; no tokenizer files (...)", or None when it is fine."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a directory"
    missing = []
    if "config" in parts and not (path / MODEL_CONFIG_FILE).is_file():
        missing.append(f"no {MODEL_CONFIG_FILE}")
    if "weights" in parts and not any(f.is_file() for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)):
        missing.append("no weights (*.safetensors, *.bin or an *.index.json of them)")
    if "tokenizer" in parts and not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]})")
    return "has " + "; ".join(missing) if missing else None


def load_tokenizer(model_path: str | Path):
    """The base model's tokenizer with a pad token: its own if it has one (Qwen2: <|endoftext|>),
    else <unk> (Mistral), else EOS (Llama 3 has neither pad nor unk). The pad id only fills prefix
    slots and padding, which carry no label and are masked, so sharing EOS's id is harmless."""
    problem = _model_dir_problem(Path(model_path), ("tokenizer",))
    if problem:
        raise ModelDirError(f"tokenizer directory {str(model_path)!r} {problem}; expected a local directory "
                            f"with the tokenizer files ({', '.join(TOKENIZER_FILES)})")
    tok = AutoTokenizer.from_pretrained(str(model_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer in {str(model_path)!r} has no pad, unk or eos token to pad with")
    return tok


def build_prefix_lm(cfg: ModelConfig, latent_dim: int, num_classes: int = 20, tail: nn.Module | None = None,
                    device=None, meta: bool = False) -> tuple[PrefixLM, object]:
    """Load the base LM + tokenizer from `cfg.model_path`, set attention/kernels, add LoRA and the prefix.

    The directory is checked first: a ModelDirError names the path and everything it lacks. Missing
    weights alone are reported when `from_pretrained` then fails, since a caller may patch it to build
    random weights from config.json (the 7B-shape throughput benchmark has no 7B weights).

    `meta=True` (parameter-sharding engines): the base LM's weights stay on the meta device (no
    memory), the LoRA adapters, prefix and buffers are real; after sharding, `load_base_shards`
    fills each rank's shard from the safetensors files. Nothing else changes (same init order).
    """
    if meta:
        return _build_prefix_lm_meta(cfg, latent_dim, num_classes, tail, device)
    if not cfg.model_path:
        raise ModelDirError(f"model_path is empty; expected {MODEL_DIR_EXPECTED}")
    path = Path(cfg.model_path)
    problem = _model_dir_problem(path, ("config", "weights", "tokenizer"))
    if problem and _model_dir_problem(path, ("config", "tokenizer")):
        raise ModelDirError(f"model directory {cfg.model_path!r} {problem}; expected {MODEL_DIR_EXPECTED}")
    device = resolve_device(device)
    tokenizer = load_tokenizer(cfg.model_path)
    try:
        lm = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=resolve_dtype(cfg.precision, device),
                                                  attn_implementation="sdpa")
    except OSError as e:
        if problem is None:  # the files are there: not a missing-file problem
            raise
        raise ModelDirError(f"model directory {cfg.model_path!r} {problem}; expected {MODEL_DIR_EXPECTED}") from e
    if lm.config.pad_token_id is None:
        lm.config.pad_token_id = tokenizer.pad_token_id
    return wrap_lm(lm, cfg, latent_dim, num_classes, tail, device), tokenizer


def wrap_lm(lm: nn.Module, cfg: ModelConfig, latent_dim: int, num_classes: int = 20,
            tail: nn.Module | None = None, device=None, embed_std: float | None = None,
            place: bool = True) -> PrefixLM:
    """Turn a loaded HF causal LM into the trainable PrefixLM (attention backend, kernels, LoRA,
    prefix). Split from `build_prefix_lm` so benchmarks can start from a randomly initialised LM.
    `place=False` leaves the model where it is (a meta build: the sharding engine places it).

    Kernels and attention are chosen per architecture (`config.model_type`): Llama, Mistral and
    Qwen2 get Liger's patch for their architecture when fused kernels resolve to 'liger'; any other
    architecture runs the portable path (no Liger patch, chunked linear+CE, `auto` attention =
    packed_sdpa), said in one log line."""
    device = resolve_device(device)
    model_type = getattr(lm.config, "model_type", None)
    portable = not kernels.has_fused_kernels(model_type)
    backend = attn.resolve_attn_implementation(cfg.attn_implementation, device, portable=portable)
    attn.check_model_supported(lm, backend)
    compiled = resolve_compile(cfg.compile, device)
    loss_impl = resolve_fused_kernels(cfg.fused_kernels, device, model_type, compiled)
    if portable:
        log.info("%s: no fused kernels for this architecture; using the portable path (attention %s, loss %s, "
                 "no Liger patch)", model_type, backend, loss_impl)
    lm.config._attn_implementation = attn.hf_attn_name(backend)
    if loss_impl in ("liger", "liger_flce"):
        kernels.apply_liger_kernels(lm)  # before PEFT, so LoRA wraps the patched modules
    if cfg.use_lora:
        _warn_unmatched_lora_targets(lm, cfg.lora_target_modules)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm, cfg.gradient_checkpointing_layers)
    lm = _wrap_lora(lm, cfg) if cfg.use_lora else lm
    if compiled:
        log.info("compiled %d decoder layers (--compile %s)", compile_decoder_layers(lm), cfg.compile)

    if embed_std is None:  # a meta-device LM has no values: its caller reads the std from the files
        embed = lm.get_input_embeddings().weight
        with gathered([embed]):  # built under ZeRO-3's zero.Init: every rank holds a slice only
            embed_std = float(embed.detach().float().std())
    prefix = Stage2Prefix(latent_dim, lm.config.hidden_size, cfg.num_image_tokens, num_classes, tail=tail,
                          init_std=embed_std)
    model = PrefixLM(lm, prefix, loss_impl=loss_impl, ce_chunk_size=cfg.ce_chunk_size)
    return model.to(device) if place and not _has_meta(model) else model  # a sharding engine places a meta model


def _has_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Meta-device construction + per-rank shard loading (parameter-sharding engines)
# ---------------------------------------------------------------------------------------------

def _safetensors_index(model_path: str | Path) -> dict[str, Path]:
    """{tensor name: the *.safetensors file holding it} of a model directory."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise ModelDirError(f"model directory {str(model_path)!r} has no *.safetensors weights; sharded "
                            "loading (--engine fsdp2) reads safetensors only (convert *.bin with save_pretrained)")
    index = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            index.update({k: f for k in st.keys()})
    return index


def hf_weight_name(param_name: str) -> str:
    """The name a PrefixLM parameter has in the base model's files: PEFT's and our wrappers removed."""
    name = param_name.removeprefix("lm.").removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _build_prefix_lm_meta(cfg: ModelConfig, latent_dim: int, num_classes: int, tail, device):
    path = Path(cfg.model_path)
    problem = _model_dir_problem(path, ("config", "weights", "tokenizer"))
    if problem:
        raise ModelDirError(f"model directory {cfg.model_path!r} {problem}; expected {MODEL_DIR_EXPECTED}")
    tokenizer = load_tokenizer(cfg.model_path)
    config = AutoConfig.from_pretrained(cfg.model_path)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    index = _safetensors_index(path)
    embed_key = "model.embed_tokens.weight"
    if embed_key not in index:
        raise ValueError(f"{cfg.model_path}: no {embed_key!r} in its safetensors files (not a decoder-only LM "
                         "of the Llama/Mistral/Qwen2 layout?)")
    with safe_open(str(index[embed_key]), framework="pt") as st:  # one tensor, once, for the prefix init
        embed_std = float(st.get_tensor(embed_key).float().std())
    return meta_prefix_lm(config, cfg, latent_dim, num_classes, tail, device, embed_std), tokenizer


def meta_prefix_lm(config, cfg: ModelConfig, latent_dim: int, num_classes: int = 20, tail: nn.Module | None = None,
                   device=None, embed_std: float = 0.02) -> PrefixLM:
    """The PrefixLM of the Hugging Face `config` with the base LM's weights on the meta device (no
    memory); LoRA adapters, prefix, Stage1 tail and buffers (RoPE) are real, on the CPU. A sharding
    engine allocates and fills the base weights per rank (`load_base_shards`, or random shards)."""
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError(f"{cfg.model_path or config.model_type}: tied input/output embeddings "
                         "(tie_word_embeddings) are not supported with sharded loading (--engine fsdp2)")
    device = resolve_device(device)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
        lm = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(cfg.precision, device),
                                              attn_implementation="sdpa")
    # PEFT puts each new adapter on its base layer's device (meta would lose the adapter's initial
    # values): the meta weights stand in as zero-stride CPU views of one scalar meanwhile, no memory.
    # Nothing may move the model while they do (a move to the GPU would copy them into a whole model
    # of real zeros, which no engine would then fill).
    zeros, placeholders = _meta_to_placeholders(lm)
    model = wrap_lm(lm, cfg, latent_dim, num_classes, tail, device, embed_std=embed_std, place=False)
    restored = _placeholders_to_meta(model, zeros)
    if restored != placeholders:
        raise RuntimeError(f"meta build: {placeholders - restored} of {placeholders} base weights were materialised "
                           "while their placeholders stood in (the model was moved or copied)")
    return model


def _meta_to_placeholders(module: nn.Module) -> tuple[dict[torch.dtype, torch.Tensor], int]:
    """Every meta parameter becomes a zero-stride view of one zero per dtype; (the zeros, how many)."""
    zeros: dict[torch.dtype, torch.Tensor] = {}
    count = 0
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                zero = zeros.setdefault(p.dtype, torch.zeros((), dtype=p.dtype))
                m._parameters[name] = nn.Parameter(zero.expand(p.shape), requires_grad=p.requires_grad)
                count += 1
    return zeros, count


def _placeholders_to_meta(module: nn.Module, zeros: dict[torch.dtype, torch.Tensor]) -> int:
    """The placeholders back on the meta device; returns how many were found."""
    ptrs = {z.data_ptr() for z in zeros.values()}
    count = 0
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and not p.is_meta and p.data_ptr() in ptrs:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                count += 1
    return count


@torch.no_grad()
def load_base_shards(model: nn.Module, model_path: str | Path, names: list[str]) -> None:
    """Fill the parameters `names` of `model` (DTensor shards or plain tensors, already allocated)
    from the base model's safetensors files, reading only this rank's slice of each tensor."""
    index = _safetensors_index(model_path)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for n in names:
        key = hf_weight_name(n)
        if key not in index:
            raise ValueError(f"{model_path}: no weight {key!r} (for parameter {n}) in its safetensors files")
        by_file.setdefault(index[key], []).append(n)
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as st:
            for n in file_names:
                p, key = params[n], hf_weight_name(n)
                if isinstance(p, DTensor):
                    local = p.to_local()
                    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                    if local.numel() == 0:
                        continue
                    sl = st.get_slice(key)[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
                    local.copy_(sl.view(local.shape))
                else:
                    p.copy_(st.get_tensor(key))


def _warn_unmatched_lora_targets(lm: nn.Module, targets: list[str]) -> None:
    """Llama, Mistral and Qwen2 all name their projections q/k/v/o_proj + gate/up/down_proj; other
    architectures may not (PEFT adapts the names that match and errors only when none does)."""
    names = [n for n, m in lm.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        log.warning("%s: LoRA target modules %s match no linear layer of this model; adapters go on %s only",
                    getattr(lm.config, "model_type", None), unmatched, [t for t in targets if t not in unmatched])


def enable_gradient_checkpointing(lm: nn.Module, num_layers: int = -1) -> None:
    """Non-reentrant activation checkpointing of the first `num_layers` decoder layers (-1 = all).

    Checkpointing only some layers frees one layer's activations per layer checkpointed at the
    cost of recomputing just those layers, so the memory cap can be met with the least recompute.
    """
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    if num_layers < 0:
        return
    layers = lm.get_decoder().layers
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < num_layers


def _wrap_lora(lm: nn.Module, cfg: ModelConfig) -> nn.Module:
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM", bias="none")
    # Adapters in the base weights' dtype (bf16 on GPU): PEFT's default upcasts them to fp32,
    # which turns every LoRA GEMM into an fp32 one plus casts of its input. Under DeepSpeed bf16
    # the optimizer keeps fp32 master weights, so nothing is lost by bf16 compute weights.
    lm = get_peft_model(lm, lora, autocast_adapter_dtype=False)  # freezes every base weight
    if cfg.fused_lora:
        lora_fused.fuse_lora_linears(lm)
    return lm


def param_groups(model: PrefixLM) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by learning-rate group: the Stage1 tail gets `--encoder-lr`."""
    groups: dict[str, list[nn.Parameter]] = {"lora_and_prefix": [], "stage1_tail": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["stage1_tail" if name.startswith("prefix.tail.") else "lora_and_prefix"].append(p)
    return groups


def save_adapter(model: PrefixLM, out_dir: str | Path, lm_state_dict: dict | None = None) -> None:
    """Write the standard PEFT adapter files (`adapter_config.json`, `adapter_model.safetensors`).
    `lm_state_dict`: `model.lm`'s full weights when its own are sharded (gathered by the engine)."""
    if not hasattr(model.lm, "peft_config"):
        raise ValueError("save_adapter: the model has no LoRA adapter (built with use_lora=False)")
    model.lm.save_pretrained(str(out_dir), safe_serialization=True, state_dict=lm_state_dict)


def load_adapter_into(model: PrefixLM, ckpt_dir: str | Path) -> None:
    """Load a saved PEFT adapter into the model's existing (same-shaped) adapter, in place."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{ckpt_dir}: no {ADAPTER_CONFIG}")
    weights = load_peft_weights(str(ckpt_dir), device="cpu")
    result = set_peft_model_state_dict(model.lm, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"{ckpt_dir}: adapter weights do not fit the model (unexpected {unexpected[:5]})")
