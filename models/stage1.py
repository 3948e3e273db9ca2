"""The frozen Stage1 image models: an MAE ViT encoder (image -> latent) and an EfficientNet classifier.

Both wrap transformers classes (`ViTMAEModel`, `EfficientNetForImageClassification`); timm and
torchvision do not import beside the CPU torch build, so checkpoints written by them (or by the
official MAE code) are converted by key name here instead.

Encoder
    `Stage1Encoder.encode(pixels, K)` runs the ViT with mask ratio 0 and the identity patch order
    (ViTMAE shuffles patches by argsort of `noise`; we pass increasing noise, so nothing is masked
    or reordered and the output is deterministic). It returns the pooled latent and, for K > 0, the
    hidden states *entering* the last K blocks. The shard builder caches those tokens, so training
    can fine-tune a copy of the last K blocks (`Stage1Tail`) without running the frozen part:
    `encoder.tail(K)(block_tokens) == latent`.

Checkpoint layouts accepted by `load_stage1_encoder`
    - a bare state dict, or one under "model" / "state_dict" / "model_state_dict";
    - keys with `module.` / `model.` / `encoder.` / `vit.` / `_orig_mod.` prefixes (DDP, wrappers,
      torch.compile, `ViTMAEForPreTraining`);
    - transformers names (both the v4 `encoder.layer.N.attention.attention.query` and the v5
      `layers.N.attention.q_proj` layouts) and official-MAE / timm names (`patch_embed.proj`,
      `cls_token`, `pos_embed`, `blocks.N.attn.qkv` (split into q/k/v), `blocks.N.norm1`,
      `mlp.fc1`, `norm`); MAE decoder keys (`decoder_*`, `mask_token`) and a `head.*` are ignored;
    - `.safetensors` files (config, if any, as JSON in the metadata key "config").
    The architecture comes from a "config" dict in the checkpoint, else from tensor shapes (heads
    default to hidden/64, LayerNorm eps to 1e-6 for MAE/timm names and 1e-12 for HF names, as
    those codebases use).

Classifier checkpoints: transformers `EfficientNetForImageClassification` keys, timm
`efficientnet_b0` keys (`conv_stem`, `blocks.S.B.conv_dw`, `conv_head`, ...) and torchvision
`efficientnet_b0` keys (`features.S.B.block.J...`), mapped by name. timm and torchvision pad
convolutions symmetrically and use BatchNorm eps 1e-5, while the transformers port pads TF-style
("same", extra pixel right/bottom) with eps 1e-3; the loaded model is switched to the source's
convention so that it computes the same function the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import EfficientNetConfig, EfficientNetForImageClassification, ViTMAEConfig, ViTMAEModel
from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer

from common.io import atomic_path

# ImageNet statistics: both Stage1 models were trained on images normalised this way.

NUM_STAGE1_CLASSES = 20
# The fine-tuned tail (K > 0) in a Stage2 checkpoint, next to the prefix files (models.prefix_lm).
TAIL_FILENAME = "stage1_encoder_finetuned.safetensors"
Pooling = Literal["mean", "cls"]


@dataclass
class Stage1Settings:
    """Stage1 settings shared by the shard builder, the trainer and the evaluator.

    Pooling defaults to `mean` over the patch tokens: MAE pre-training puts no objective on the
    CLS token (the reconstruction loss is on patches only), so the CLS output is a weak global
    summary, while average pooling is what the MAE paper itself uses for fine-tuning/linear probes.
    """

    stage1_encoder_ckpt: str = field(default="", metadata={"help": "Stage1 MAE ViT encoder checkpoint (.pt/.pth/.safetensors)"})
    stage1_classifier_ckpt: str = field(default="", metadata={"help": "Stage1 EfficientNet classifier checkpoint (.pt/.pth/.safetensors)"})
    image_size: int = field(default=224, metadata={"help": "square size images are resized to before Stage1"})
    stage1_trainable_blocks: int = field(default=0, metadata={"help": "K: fine-tune a copy of the last K encoder blocks (0 = fully frozen; K > 0 caches the tokens entering them)"})
    latent_pooling: Literal["mean", "cls"] = field(default="mean", metadata={"help": "latent = mean of patch tokens (default; MAE trains no CLS objective) or the CLS token"})
    gif_frame: int = field(default=0, metadata={"help": "which GIF frame to use for animated images"})


class Stage1LoadError(ValueError):
    """A checkpoint that does not fit the Stage1 architecture; the message names the file and keys."""


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files
# ----------------------------------------------------------------------------------------------

_NESTED_KEYS = ("model", "state_dict", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "vit.", "backbone.")


def _read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], Optional[dict]]:
    """(state dict, optional "config" dict) from a .safetensors or torch file of any common layout."""
    path = Path(path)
    if not path.is_file():
        raise Stage1LoadError(f"{path}: Stage1 checkpoint not found")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        return sd, (json.loads(meta["config"]) if "config" in meta else None)
    obj = _torch_load(path)
    config = None
    if isinstance(obj, Mapping):
        config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise Stage1LoadError(f"{path}: expected a state dict (or one under {list(_NESTED_KEYS)}), "
                              f"got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise Stage1LoadError(f"{path}: the checkpoint holds no tensors (keys: {list(obj)[:10]})")
    return sd, (dict(config) if config else None)


def _torch_load(path: Path):
    """torch.load with weights_only=True; official MAE checkpoints also pickle an argparse Namespace."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and a way out
        raise Stage1LoadError(f"{path}: cannot be read with torch.load(weights_only=True): {e}. "
                              "Re-save the state dict alone (or as .safetensors).") from e


def _strip_wrapper_prefixes(sd: dict[str, Tensor], ignore: re.Pattern) -> dict[str, Tensor]:
    """Drop ignorable keys and strip prefixes that *every* remaining key carries.

    Stripping only shared prefixes keeps HF's own `encoder.layer.N` names intact while removing
    `module.` (DDP), `encoder.` (a wrapper module), `vit.` (ViTMAEForPreTraining) and the like.
    """
    sd = dict(sd)
    while True:
        sd = {k: v for k, v in sd.items() if not ignore.search(k)}
        for prefix in _WRAPPER_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                break
        else:
            return sd


def _check_keys(path, expected: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str, naming: str) -> None:
    """Raise Stage1LoadError listing missing / unexpected / mis-shaped keys (first 10 of each)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in given and given[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{path}: not a loadable {what} checkpoint (key names shown in {naming} form)"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
            lines.append(f"  {len(items)} {title}: {items[:10]}{more}")
    raise Stage1LoadError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# ViT key names: transformers v4 / v5 <-> canonical (official MAE / timm)
# ----------------------------------------------------------------------------------------------

# Inside one block: canonical name -> {layout: name}. q/k/v are fused in the canonical form.
_BLOCK_NAMES = {
    "norm1": {"v5": "layernorm_before", "v4": "layernorm_before"},
    "norm2": {"v5": "layernorm_after", "v4": "layernorm_after"},
    "attn.proj": {"v5": "attention.o_proj", "v4": "attention.output.dense"},
    "mlp.fc1": {"v5": "mlp.fc1", "v4": "intermediate.dense"},
    "mlp.fc2": {"v5": "mlp.fc2", "v4": "output.dense"},
}
_QKV_NAMES = {"v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
              "v4": ("attention.attention.query", "attention.attention.key", "attention.attention.value")}
_GLOBAL_NAMES = {  # canonical -> HF (same in v4 and v5)
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_TO_CANONICAL_BLOCK = {hf: canon for canon, names in _BLOCK_NAMES.items() for hf in names.values()}
_HF_QKV = {hf: i for names in _QKV_NAMES.values() for i, hf in enumerate(names)}
_BLOCK_KEY = re.compile(r"(?:blocks|layers|encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)")
_VIT_IGNORE = re.compile(r"(^|\.)(decoder[._]|mask_token$|head\.)")


def _vit_to_canonical(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename HF ViTMAE keys (v4 or v5 layout) to official-MAE/timm names; fuse q/k/v into qkv.

    Unknown keys pass through unchanged so that they are reported as unexpected.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], list[Optional[Tensor]]] = {}
    hf_globals = {hf: canon for canon, hf in _GLOBAL_NAMES.items()}
    for key, value in sd.items():
        if key in hf_globals:
            out[hf_globals[key]] = value
            continue
        m = _BLOCK_KEY.fullmatch(key)
        if m and m.group(2) in _HF_QKV:
            qkv.setdefault((int(m.group(1)), m.group(3)), [None, None, None])[_HF_QKV[m.group(2)]] = value
        elif m and m.group(2) in _HF_TO_CANONICAL_BLOCK:
            out[f"blocks.{m.group(1)}.{_HF_TO_CANONICAL_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        else:
            out[key] = value
    for (i, kind), parts in qkv.items():
        if any(p is None for p in parts):  # an incomplete triple: keep what is there, visibly
            out.update({f"blocks.{i}.attn.{'qkv'[j]}.{kind}": p for j, p in enumerate(parts) if p is not None})
        else:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def _canonical_to_hf(sd: Mapping[str, Tensor], layout: str, container: str) -> dict[str, Tensor]:
    """Inverse of `_vit_to_canonical` for `layout` ("v4"/"v5"), blocks under `container`."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            out[key] = value
        elif m.group(2) == "attn.qkv":
            for name, part in zip(_QKV_NAMES[layout], value.chunk(3, dim=0)):
                out[f"{container}.{m.group(1)}.{name}.{m.group(3)}"] = part
        else:
            out[f"{container}.{m.group(1)}.{_BLOCK_NAMES[m.group(2)][layout]}.{m.group(3)}"] = value
    return out


def _layer_layout(layer: nn.Module) -> str:
    """Which transformers ViTMAE layout this installed version uses (v5 renamed the submodules)."""
    return "v5" if hasattr(layer, "mlp") else "v4"


def _vit_blocks(vit: ViTMAEModel) -> nn.ModuleList:
    return vit.layers if hasattr(vit, "layers") else vit.encoder.layer


def _run_block(block: nn.Module, hidden: Tensor) -> Tensor:
    out = block(hidden)
    return out[0] if isinstance(out, tuple) else out  # v4 layers return a tuple


# ----------------------------------------------------------------------------------------------
# ViT configuration
# ----------------------------------------------------------------------------------------------

_VIT_CONFIG_ALIASES = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads",
                       "img_size": "image_size", "in_chans": "num_channels"}
_VIT_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                    "image_size", "num_channels", "qkv_bias", "layer_norm_eps", "hidden_act")


def vit_config(sd: Mapping[str, Tensor], stored: Optional[dict], hf_names: bool) -> ViTMAEConfig:
    """The encoder's config: from the stored dict, else inferred from canonical tensor shapes."""
    values: dict = {}
    if "patch_embed.proj.weight" in sd and "pos_embed" in sd:
        proj = sd["patch_embed.proj.weight"]  # [hidden, channels, patch, patch]
        hidden, patch = proj.shape[0], proj.shape[-1]
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        values = dict(hidden_size=hidden, num_channels=proj.shape[1], patch_size=patch, image_size=grid * patch,
                      num_hidden_layers=max(blocks) + 1 if blocks else 0,
                      num_attention_heads=max(1, hidden // 64),
                      qkv_bias="blocks.0.attn.qkv.bias" in sd,
                      layer_norm_eps=1e-12 if hf_names else 1e-6)
        if "blocks.0.mlp.fc1.weight" in sd:
            values["intermediate_size"] = sd["blocks.0.mlp.fc1.weight"].shape[0]
    for key, value in (stored or {}).items():
        key = _VIT_CONFIG_ALIASES.get(key, key)
        if key in _VIT_CONFIG_KEYS:
            values[key] = value
    if "mlp_ratio" in (stored or {}) and "intermediate_size" not in values:
        values["intermediate_size"] = int(values.get("hidden_size", 768) * stored["mlp_ratio"])
    # Frozen feature extractor: nothing masked, no dropout (MAE encoders train without it).
    config = ViTMAEConfig(**values, mask_ratio=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # Stand-alone layers (a loaded Stage1Tail) never pass through PreTrainedModel's dispatch.
    config._attn_implementation = "sdpa"
    return config


def vit_config_dict(config: ViTMAEConfig) -> dict:
    return {k: getattr(config, k) for k in _VIT_CONFIG_KEYS}


# ----------------------------------------------------------------------------------------------
# Encoder and its trainable tail
# ----------------------------------------------------------------------------------------------

def _pool(hidden: Tensor, pooling: str) -> Tensor:
    """[B, 1 + patches, H] -> [B, H]: mean over patch tokens (CLS excluded) or the CLS token."""
    if pooling == "mean":
        return hidden[:, 1:].mean(dim=1)
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"latent pooling must be 'mean' or 'cls', got {pooling!r}")


class Stage1Tail(nn.Module):
    """The last K encoder blocks + final LayerNorm + pooling: cached block tokens -> latent.

    This is the trainable Stage1 part when `--stage1-trainable-blocks K > 0`. Saved weights use
    the canonical (official-MAE/timm) names with blocks numbered 0..K-1, so a tail file does not
    depend on the transformers version that wrote it.
    """

    def __init__(self, config: ViTMAEConfig, num_blocks: int, pooling: str = "mean",
                 blocks: Optional[list[nn.Module]] = None, norm: Optional[nn.LayerNorm] = None):
        super().__init__()

        if num_blocks < 1:
            raise ValueError(f"a Stage1 tail needs >= 1 block, got {num_blocks}")
        _pool(torch.zeros(1, 2, 1), pooling)  # validate early
        self.config = config
        self.pooling = pooling
        self.layers = nn.ModuleList(blocks if blocks is not None else [ViTMAELayer(config) for _ in range(num_blocks)])
        self.layernorm = norm if norm is not None else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def forward(self, block_tokens: Tensor) -> Tensor:
        hidden = block_tokens.to(self.layernorm.weight.dtype)
        for block in self.layers:
            hidden = _run_block(block, hidden)
        return _pool(self.layernorm(hidden), self.pooling)

    def canonical_state_dict(self, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        state = self.state_dict() if state_dict is None else state_dict
        return _vit_to_canonical({k: v.detach() for k, v in state.items()})

    def save(self, path: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write safetensors (fp32, canonical names) with the architecture in the metadata.
        `state_dict`: this module's full weights when its own are sharded (gathered by the engine)."""
        tensors = {k: v.float().contiguous().cpu() for k, v in self.canonical_state_dict(state_dict).items()}
        meta = {"format": "stage1_tail", "config": json.dumps(vit_config_dict(self.config)),
                "num_blocks": str(self.num_blocks), "pooling": self.pooling}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "Stage1Tail":
        path = Path(path)
        if not path.is_file():
            raise Stage1LoadError(f"{path}: Stage1 tail file not found")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "stage1_tail":
            raise Stage1LoadError(f"{path}: not a Stage1 tail file (metadata format={meta.get('format')!r})")
        config = vit_config({}, json.loads(meta["config"]), hf_names=False)
        tail = cls(config, int(meta["num_blocks"]), meta.get("pooling", "mean"))
        tail.load_canonical(sd, source=path)
        return tail

    def load_canonical(self, sd: Mapping[str, Tensor], source="state dict") -> None:
        expected = self.canonical_state_dict()
        _check_keys(source, expected, sd, "Stage1 tail", "official-MAE/timm")
        hf = _canonical_to_hf(sd, _layer_layout(self.layers[0]), "layers")
        self.load_state_dict(hf, strict=True)


class Stage1Encoder(nn.Module):
    """Frozen MAE ViT encoder: normalised pixels [B, 3, S, S] -> latent [B, hidden].

    Always in eval mode with frozen weights; fine-tuning happens on a `tail(K)` copy.
    """

    def __init__(self, config: ViTMAEConfig, pooling: str = "mean"):
        super().__init__()
        _pool(torch.zeros(1, 2, 1), pooling)
        self.pooling = pooling
        self.vit = ViTMAEModel(config)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Stage1Encoder":
        return super().train(False)  # frozen: never switch to training behaviour

    @property
    def config(self) -> ViTMAEConfig:
        return self.vit.config

    @property
    def latent_dim(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        return _vit_blocks(self.vit)

    def num_tokens(self, image_size: Optional[int] = None) -> int:
        """Tokens per image in `block_tokens` (CLS + patches) at `image_size` (default: the config's)."""
        size = image_size or self.config.image_size
        return 1 + (size // self.config.patch_size) ** 2

    def _check_k(self, k: int) -> int:
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"trainable_blocks must be in [0, {self.num_layers}], got {k}")
        return k

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Patch + position embeddings with CLS, patches in their natural order (no masking)."""
        ref = self.vit.embeddings.cls_token
        pixels = pixel_values.to(device=ref.device, dtype=ref.dtype)
        batch, _, height, width = pixels.shape
        patch = self.config.patch_size
        num_patches = (height // patch) * (width // patch)
        # argsort(increasing noise) is the identity: with mask_ratio 0 ViTMAE keeps every patch in place.
        noise = torch.arange(num_patches, device=ref.device, dtype=torch.float32).expand(batch, -1)
        size = self.config.image_size
        interpolate = (height, width) != ((size, size) if isinstance(size, int) else tuple(size))
        return self.vit.embeddings(pixels, noise=noise, interpolate_pos_encoding=interpolate)[0]

    @torch.no_grad()
    def encode(self, pixel_values: Tensor, trainable_blocks: int = 0) -> tuple[Tensor, Optional[Tensor]]:
        """(latent [B, hidden], hidden states entering the last K blocks [B, T, hidden] or None)."""
        return self.encode_with_grad(pixel_values, trainable_blocks)

    def encode_with_grad(self, pixel_values: Tensor, trainable_blocks: int = 0) -> tuple[Tensor, Optional[Tensor]]:
        """`encode` with autograd on, for training the encoder itself (the tiny stand-in's pre-training)."""
        k = self._check_k(trainable_blocks)
        hidden = self.embed(pixel_values)
        block_tokens = None
        for i, block in enumerate(self.blocks):
            if i == self.num_layers - k:
                block_tokens = hidden
            hidden = _run_block(block, hidden)
        return _pool(self.vit.layernorm(hidden), self.pooling), block_tokens

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encode(pixel_values)[0]

    def tail(self, k: int) -> Stage1Tail:
        """A trainable deep copy of the last k blocks + final norm + pooling."""
        if not 1 <= k <= self.num_layers:
            raise ValueError(f"tail needs 1 <= k <= {self.num_layers}, got {k}")
        blocks = [copy.deepcopy(b) for b in self.blocks[self.num_layers - k:]]
        tail = Stage1Tail(self.config, k, self.pooling, blocks=blocks, norm=copy.deepcopy(self.vit.layernorm))
        tail.requires_grad_(True)
        return tail.train()

    @torch.no_grad()
    def apply_tail(self, tail: Stage1Tail) -> None:
        """Copy a (fine-tuned) tail's weights into the last blocks, so `encode` yields its latents."""
        if tail.config.hidden_size != self.latent_dim or tail.num_blocks > self.num_layers:
            raise ValueError(f"tail ({tail.num_blocks} blocks, hidden {tail.config.hidden_size}) does not fit "
                             f"this encoder ({self.num_layers} blocks, hidden {self.latent_dim})")
        for mine, theirs in zip(self.blocks[self.num_layers - tail.num_blocks:], tail.layers):
            mine.load_state_dict(theirs.state_dict())
        self.vit.layernorm.load_state_dict(tail.layernorm.state_dict())
        self.pooling = tail.pooling

    def canonical_state_dict(self) -> dict[str, Tensor]:
        return _vit_to_canonical({k: v.detach() for k, v in self.vit.state_dict().items()})

    def load_canonical(self, sd: Mapping[str, Tensor], source="state dict") -> None:
        _check_keys(source, self.canonical_state_dict(), sd, "Stage1 MAE ViT encoder", "official-MAE/timm")
        container = "layers" if hasattr(self.vit, "layers") else "encoder.layer"
        self.vit.load_state_dict(_canonical_to_hf(sd, _layer_layout(self.blocks[0]), container), strict=True)


def load_stage1_encoder(path: str | Path, pooling: str = "mean") -> Stage1Encoder:
    """Load an MAE ViT encoder checkpoint in any accepted layout (see the module docstring)."""
    raw, stored_config = _read_checkpoint(path)
    raw = _strip_wrapper_prefixes(raw, _VIT_IGNORE)
    hf_names = any(k.startswith(("embeddings.", "layers.", "encoder.layer.", "layernorm.")) for k in raw)
    sd = _vit_to_canonical(raw)
    try:
        config = vit_config(sd, stored_config, hf_names)
        encoder = Stage1Encoder(config, pooling=pooling)
    except (ValueError, TypeError, KeyError) as e:
        raise Stage1LoadError(f"{path}: cannot build a ViT-MAE encoder from this checkpoint ({e}); "
                              f"first keys: {list(raw)[:10]}") from e
    encoder.load_canonical(sd, source=path)
    return encoder


# ----------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------

_EFFNET_CONFIG_KEYS = ("image_size", "num_channels", "width_coefficient", "depth_coefficient", "depth_divisor",
                       "kernel_sizes", "in_channels", "out_channels", "strides", "num_block_repeats",
                       "expand_ratios", "squeeze_expansion_ratio", "hidden_act", "hidden_dim", "batch_norm_eps",
                       "depthwise_padding", "dropout_rate", "drop_connect_rate")
# EfficientNet-B0 (the transformers default config is B7).
_B0 = dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280, dropout_rate=0.2)


class Stage1Classifier(nn.Module):
    """Frozen EfficientNet image-type classifier: normalised pixels -> logits [B, num_classes]."""

    def __init__(self, config: EfficientNetConfig, padding: Literal["tf", "symmetric"] = "tf"):
        super().__init__()
        self.padding = padding
        self.model = EfficientNetForImageClassification(config)
        if padding == "symmetric":
            _use_symmetric_padding(self.model)
        elif padding != "tf":
            raise ValueError(f"padding must be 'tf' or 'symmetric', got {padding!r}")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Stage1Classifier":
        return super().train(False)  # frozen: BatchNorm statistics must never update

    @property
    def config(self) -> EfficientNetConfig:
        return self.model.config

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        ref = self.model.classifier.weight
        return self.model(pixel_values=pixel_values.to(device=ref.device, dtype=ref.dtype)).logits

    def config_dict(self) -> dict:
        d = {k: getattr(self.config, k) for k in _EFFNET_CONFIG_KEYS}
        return {**d, "num_labels": self.num_classes, "padding": self.padding}


def _use_symmetric_padding(model: EfficientNetForImageClassification) -> None:
    """Pad k//2 on every side (PyTorch-style) instead of the TF-style right/bottom extra pixel.

    transformers pads only strided convolutions explicitly (stride-1 ones use padding="same",
    which is already symmetric for odd kernels), so only those ZeroPad2d modules change.
    """
    model.efficientnet.embeddings.padding.padding = (1, 1, 1, 1)  # 3x3 stride-2 stem
    for block in model.efficientnet.encoder.blocks:
        k = block.depthwise_conv.depthwise_conv.kernel_size[0]
        block.depthwise_conv.depthwise_conv_pad.padding = (k // 2,) * 4


_BN_PARAM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_TIMM_DS = {"conv_dw": "depthwise_conv.depthwise_conv", "bn1": "depthwise_conv.depthwise_norm",
            "se.conv_reduce": "squeeze_excite.reduce", "se.conv_expand": "squeeze_excite.expand",
            "conv_pw": "projection.project_conv", "bn2": "projection.project_bn"}
_TIMM_IR = {"conv_pw": "expansion.expand_conv", "bn1": "expansion.expand_bn",
            "conv_dw": "depthwise_conv.depthwise_conv", "bn2": "depthwise_conv.depthwise_norm",
            "se.conv_reduce": "squeeze_excite.reduce", "se.conv_expand": "squeeze_excite.expand",
            "conv_pwl": "projection.project_conv", "bn3": "projection.project_bn"}
_TIMM_TOP = {"conv_stem": "efficientnet.embeddings.convolution", "bn1": "efficientnet.embeddings.batchnorm",
             "conv_head": "efficientnet.encoder.top_conv", "bn2": "efficientnet.encoder.top_bn",
             "classifier": "classifier"}
# torchvision MBConv sub-blocks in order: [expand], depthwise, SE, project.
_TV_WITH_EXPAND = ("expansion.expand", "depthwise_conv.depthwise", "squeeze_excite", "projection.project")
_TV_NO_EXPAND = _TV_WITH_EXPAND[1:]
_TV_CONV_BN = {"expansion.expand": ("expansion.expand_conv", "expansion.expand_bn"),
               "depthwise_conv.depthwise": ("depthwise_conv.depthwise_conv", "depthwise_conv.depthwise_norm"),
               "projection.project": ("projection.project_conv", "projection.project_bn")}


def _block_index(pairs: set[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """(stage, block) -> flat block number in transformers' single `blocks` list."""
    return {sb: i for i, sb in enumerate(sorted(pairs))}


def _timm_effnet_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    key_re = re.compile(rf"blocks\.(\d+)\.(\d+)\.(.+)\.{_BN_PARAM}")
    flat = _block_index({(int(m[1]), int(m[2])) for k in sd if (m := key_re.fullmatch(k))})
    out = {}
    for key, value in sd.items():
        m = key_re.fullmatch(key)
        if m:
            stage, blk, module, param = int(m[1]), int(m[2]), m[3], m[4]
            table = _TIMM_IR if f"blocks.{stage}.{blk}.conv_pwl.weight" in sd else _TIMM_DS
            name = table.get(module)
            out[f"efficientnet.encoder.blocks.{flat[stage, blk]}.{name}.{param}" if name else key] = value
            continue
        module, _, param = key.rpartition(".")
        out[f"{_TIMM_TOP[module]}.{param}" if module in _TIMM_TOP else key] = value
    return out


def _torchvision_effnet_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    key_re = re.compile(rf"features\.(\d+)\.(\d+)\.block\.(\d+)\.(.+)\.{_BN_PARAM}")
    stages = {int(m[1]) for k in sd if (m := re.match(r"features\.(\d+)\.", k))}
    first, last = min(stages), max(stages)  # stem and head conv layers
    flat = _block_index({(int(m[1]), int(m[2])) for k in sd if (m := key_re.fullmatch(k))})
    subs: dict[tuple[int, int], set[int]] = {}
    for k in sd:
        if m := key_re.fullmatch(k):
            subs.setdefault((int(m[1]), int(m[2])), set()).add(int(m[3]))
    out = {}
    for key, value in sd.items():
        m = key_re.fullmatch(key)
        if m:
            sb, sub, rest, param = (int(m[1]), int(m[2])), int(m[3]), m[4], m[5]
            roles = _TV_WITH_EXPAND if len(subs[sb]) == 4 else _TV_NO_EXPAND
            role = roles[sub] if sub < len(roles) else None
            name = None
            if role == "squeeze_excite":
                name = {"fc1": "squeeze_excite.reduce", "fc2": "squeeze_excite.expand"}.get(rest)
            elif role is not None and rest in ("0", "1"):
                name = _TV_CONV_BN[role][int(rest)]
            out[f"efficientnet.encoder.blocks.{flat[sb]}.{name}.{param}" if name else key] = value
            continue
        m = re.fullmatch(rf"features\.(\d+)\.([01])\.{_BN_PARAM}", key)
        if m and int(m[1]) in (first, last):
            top = "efficientnet.embeddings" if int(m[1]) == first else "efficientnet.encoder"
            names = ("convolution", "batchnorm") if int(m[1]) == first else ("top_conv", "top_bn")
            out[f"{top}.{names[int(m[2])]}.{m[3]}"] = value
        elif m := re.fullmatch(r"classifier\.\d+\.(weight|bias)", key):
            out[f"classifier.{m[1]}"] = value
        else:
            out[key] = value
    return out


def _effnet_to_hf(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """(state dict in transformers names, source style: 'hf' | 'timm' | 'torchvision' | 'unknown')."""
    if any(k.startswith("efficientnet.") for k in sd):
        return dict(sd), "hf"
    if any(k.startswith("embeddings.convolution") for k in sd):  # EfficientNetModel without the head
        return {(k if k.startswith("classifier.") else f"efficientnet.{k}"): v for k, v in sd.items()}, "hf"
    if "conv_stem.weight" in sd:
        return _timm_effnet_to_hf(sd), "timm"
    if any(k.startswith("features.0.0.") for k in sd):
        return _torchvision_effnet_to_hf(sd), "torchvision"
    return dict(sd), "unknown"


def load_stage1_classifier(path: str | Path, num_classes: int = NUM_STAGE1_CLASSES) -> Stage1Classifier:
    """Load an EfficientNet classifier checkpoint (transformers, timm or torchvision names)."""
    raw, stored = _read_checkpoint(path)
    raw = _strip_wrapper_prefixes(raw, re.compile(r"num_batches_tracked$"))
    sd, style = _effnet_to_hf(raw)
    values = {**_B0, "batch_norm_eps": 1e-3 if style in ("hf", "unknown") else 1e-5}
    padding = "tf" if style in ("hf", "unknown") else "symmetric"
    for key, value in (stored or {}).items():
        if key in _EFFNET_CONFIG_KEYS:
            values[key] = value
    padding = (stored or {}).get("padding", padding)
    labels = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else num_classes
    if labels != num_classes:
        raise Stage1LoadError(f"{path}: classifier has {labels} classes, expected {num_classes} (one per cond_name)")
    try:
        model = Stage1Classifier(EfficientNetConfig(**values, num_labels=num_classes), padding=padding)
    except (ValueError, TypeError) as e:
        raise Stage1LoadError(f"{path}: cannot build an EfficientNet from this checkpoint ({e})") from e
    expected = {k: v for k, v in model.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    _check_keys(path, expected, sd, f"Stage1 EfficientNet classifier ({style} names)", "transformers")
    model.model.load_state_dict(sd, strict=False)  # only num_batches_tracked (unused in eval) may be absent
    return model


