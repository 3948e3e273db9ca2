"""Models under evaluation and batched generation with an image prefix.

`EvalModel` is what every evaluation program holds: a Stage2 checkpoint (PEFT LM + prefix modules)
or the plain pretrained LM (text-only baseline). Generation is batched:

1. prompts are built by `models.tasks` and left-padded by `models.collate.collate_generation`,
   so every row's last prompt token sits in the last column and new tokens append in lock-step;
2. the image prefix is written into the prompt's embeddings (`PrefixLM.embed`), so the LM is
   called with `inputs_embeds`, never with placeholder token ids;
3. HF `generate(inputs_embeds=..., attention_mask=..., position_ids=...)` runs with the KV cache.
   Positions come from the collator (0 at each row's BOS, padding masked out), so a left-padded
   row sees exactly the positions it would see alone; `tests/test_eval_generate.py` checks that
   batched greedy outputs equal one-at-a-time ones.

Only `inputs_embeds` is given to `generate` (for the baseline too), so repetition penalties act on
the generated tokens, identically for every model compared.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.runtime import resolve_device, resolve_dtype
from data_prep.manifest import Stage1Record
from eval.inputs import EvalCase
from models import attention as attn
from models.collate import TrainItem, collate_generation
from models.cond_names import default_cond_name_to_id
from models.prefix_lm import ADAPTER_CONFIG
from models.tasks import Prompt, TaskUnavailable, TokenizedExample, build_prompt, tokenize_prompt
from trainer.checkpoint import TRAIN_CONFIG_FILE, load_inference_model, load_stage1_identity
from trainer.config import TrainConfig

PREFIX_MODES = ("true", "shuffled", "zero")

# Penalties acting on generated tokens only is the documented choice above; don't warn per batch.
warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with `inputs_embeds`")


@dataclass
class DecodingConfig:
    """Decoding settings shared by every generating program."""

    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate per sample"})
    min_new_tokens: int = field(default=0, metadata={"help": "force at least this many new tokens"})
    num_beams: int = field(default=1, metadata={"help": "beam search width (1 = greedy/sampling)"})
    no_repeat_ngram_size: int = field(default=4, metadata={"help": "ban repeated n-grams (0 = off)"})
    repetition_penalty: float = field(default=1.1, metadata={"help": "HF repetition penalty (1 = off)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (with temperature > 0)"})
    batch_size: int = field(default=8, metadata={"help": "prompts generated together"})
    max_prompt_len: int = field(default=1024, metadata={"help": "prompt budget incl. the image prefix"})

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.num_beams < 1:
            raise ValueError("--max-new-tokens, --batch-size and --num-beams must be >= 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class EvalModel:
    name: str
    lm: Any  # HF causal LM; PEFT-wrapped for Stage2 checkpoints
    tokenizer: Any
    prefix_lm: Any  # models.prefix_lm.PrefixLM, or None for the text-only baseline
    cond_map: dict
    num_image_tokens: int
    train_config: Optional[TrainConfig]  # the checkpoint's; None for the baseline and seed checkpoints
    source: str = ""
    # The Stage1 identity the checkpoint was trained with (trainer.checkpoint.STAGE1_IDENTITY_FILE);
    # None for the baseline and for checkpoints written before that file existed (the seed's).
    stage1: Optional[Stage1Record] = None

    @property
    def uses_image(self) -> bool:
        return self.prefix_lm is not None

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


PRETRAINED_NAME = "pretrained"


def _num_image_tokens(prefix_lm, train_config: Optional[TrainConfig]) -> int:
    prefix = getattr(prefix_lm, "prefix", None)
    for holder in (prefix, getattr(prefix, "config", None)):
        n = getattr(holder, "num_image_tokens", None)
        if isinstance(n, int):
            return n
    if train_config is not None:
        return train_config.model.num_image_tokens
    raise ValueError(f"cannot tell num_image_tokens from the checkpoint's prefix config or {TRAIN_CONFIG_FILE}")


def load_pretrained_model(model_path: str, device: str = "auto", dtype: str = "auto",
                          name: str = PRETRAINED_NAME) -> EvalModel:
    """The plain HF causal LM and its tokenizer from a local model directory."""
    path = Path(model_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'}: missing; --base-model-path must be a local "
                                "HF model directory (config, weights, tokenizer)")
    if (path / ADAPTER_CONFIG).exists():
        raise ValueError(f"{path}: holds a PEFT adapter; the pretrained baseline needs the base model "
                         f"(see base_model_name_or_path in {path / ADAPTER_CONFIG})")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return EvalModel(name=name, lm=lm, tokenizer=tokenizer, prefix_lm=None,
                     cond_map=default_cond_name_to_id(), num_image_tokens=0,
                     train_config=None, source=str(path))


def load_checkpoint_model(ckpt_dir: str, base_model_path: Optional[str] = None, device: str = "auto",
                          dtype: str = "auto", name: Optional[str] = None, merge_lora: bool = True) -> EvalModel:
    """A Stage2 inference checkpoint (`<output_dir>/final/` or `checkpoint-<step>/`).

    `merge_lora` folds the LoRA update into the base weights (inference only): each decode step
    then runs one GEMM per projection instead of the base GEMM plus two small LoRA GEMMs.
    """
    device = resolve_device(device)
    prefix_lm, tokenizer, cond_map, train_config = load_inference_model(
        ckpt_dir, base_model_path=base_model_path, device=device, dtype=resolve_dtype(dtype, device))
    prefix_lm.eval()
    if merge_lora and hasattr(prefix_lm.lm, "merge_and_unload"):
        prefix_lm.lm = prefix_lm.lm.merge_and_unload()
    path = Path(ckpt_dir)
    default_name = path.parent.name if path.name in ("final",) or path.name.startswith("checkpoint-") else path.name
    return EvalModel(name=name or default_name, lm=prefix_lm.lm, tokenizer=tokenizer, prefix_lm=prefix_lm,
                     cond_map=cond_map, num_image_tokens=_num_image_tokens(prefix_lm, train_config),
                     train_config=train_config, source=str(path), stage1=load_stage1_identity(path))


# ------------------------------------------------------------------------------------ requests
@dataclass
class GenRequest:
    """One prompt to generate for: the case, its prompt text and its tokenized form."""

    case: EvalCase
    prompt: Prompt
    example: TokenizedExample

    @property
    def reference(self) -> str:
        return self.prompt.target


def record_key(case_id: str, element: int, task: str) -> tuple[str, int, str]:
    return (str(case_id), int(element), task)


def build_requests(cases: Sequence[EvalCase], task: str, model: EvalModel,
                   max_prompt_len: int) -> tuple[list[GenRequest], Counter]:
    """Prompts of `task` for `cases`; cases that cannot be evaluated are counted, not raised.

    Skips: `empty_reference` (no reference text to score against), `task_unavailable` (e.g. a
    one-sentence caption for task cot), `prompt_too_long` (fixed prompt parts exceed the budget),
    `duplicate_case` (task text_summary has one prompt per case, not per element).
    """
    skips: Counter = Counter()
    out: list[GenRequest] = []
    seen_cases: set[str] = set()
    for c in cases:
        if task == "text_summary":
            if c.case_id in seen_cases:
                skips["duplicate_case"] += 1
                continue
            seen_cases.add(c.case_id)
        try:
            prompt = build_prompt(task, cond_name=c.cond_name, caption=c.caption,
                                  global_summary=c.global_summary, case_captions=c.case_captions,
                                  with_image=model.uses_image)
        except TaskUnavailable:
            skips["task_unavailable"] += 1
            continue
        if not prompt.target.strip():
            skips["empty_reference"] += 1
            continue
        if prompt.uses_image and c.latent is None:
            raise ValueError(f"case {c.case_id} element {c.element_index}: no Stage1 latent to build "
                             "the image prefix from")
        ex = tokenize_prompt(prompt, model.tokenizer, max_prompt_len, model.num_image_tokens, with_target=False)
        if ex is None:
            skips["prompt_too_long"] += 1
            continue
        out.append(GenRequest(c, prompt, ex))
    return out, skips


# ------------------------------------------------------------------------------------- batches
def collate_requests(model: EvalModel, requests: Sequence[GenRequest],
                     latents_from: Optional[Sequence[EvalCase]] = None) -> dict:
    """A left-padded prompt batch on the model's device. `latents_from[i]` replaces the case
    whose latent/class feeds request i (the ablation's shuffled prefix)."""
    items = []
    for i, r in enumerate(requests):
        src = latents_from[i] if latents_from is not None else r.case
        latent = None if src.latent is None else torch.as_tensor(src.latent, dtype=torch.float32)
        tokens = None if src.block_tokens is None else torch.as_tensor(src.block_tokens, dtype=torch.float32)
        items.append(TrainItem(r.example, latent, src.cond_id, block_tokens=tokens,
                               key=f"{r.case.case_id}__e{r.case.element_index}"))
    batch = collate_generation(items, model.pad_id, model.num_image_tokens)
    return {k: (v.to(model.device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def embed_batch(model: EvalModel, batch: dict, prefix_mode: str = "true") -> torch.Tensor:
    """Input embeddings with the image prefix in place (`zero`: the prefix slots set to 0)."""
    if prefix_mode not in PREFIX_MODES:
        raise ValueError(f"unknown prefix mode {prefix_mode!r}; known: {PREFIX_MODES}")
    if model.prefix_lm is None:
        return model.lm.get_input_embeddings()(batch["input_ids"])
    embeds = model.prefix_lm.embed(batch)
    if prefix_mode == "zero":
        embeds = embeds.masked_fill(batch["prefix_mask"].unsqueeze(-1), 0.0)
    return embeds


def stock_attention(model: EvalModel):
    """The training model may use a packed-sequence attention backend (cu_seqlens, no KV cache);
    generation and padded scoring need a stock HF one that honours a 2-D padding mask."""
    if model.prefix_lm is None or not hasattr(model.prefix_lm, "stock_attention"):
        return contextlib.nullcontext()
    current = model.prefix_lm.attn_implementation
    return model.prefix_lm.stock_attention("sdpa" if attn.is_packed_backend(current) else current)


def generation_kwargs(decoding: DecodingConfig, model: EvalModel) -> dict:
    kw = dict(max_new_tokens=decoding.max_new_tokens, min_new_tokens=decoding.min_new_tokens,
              num_beams=decoding.num_beams, repetition_penalty=decoding.repetition_penalty,
              pad_token_id=model.pad_id, eos_token_id=model.tokenizer.eos_token_id)
    if decoding.no_repeat_ngram_size > 0:
        kw["no_repeat_ngram_size"] = decoding.no_repeat_ngram_size
    if decoding.temperature > 0:
        kw.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p)
    else:
        kw.update(do_sample=False)
    return kw


@torch.no_grad()
def generate_token_ids(model: EvalModel, requests: Sequence[GenRequest], decoding: DecodingConfig,
                       prefix_mode: str = "true", latents_from: Optional[Sequence[EvalCase]] = None,
                       return_scores: bool = False):
    """New token ids `[len(requests), <= max_new_tokens]` for one batch (padded with pad_id).

    With `return_scores`, also the processed next-token scores `[len(requests), steps, vocab]`.
    """
    batch = collate_requests(model, requests, latents_from)
    with stock_attention(model):
        embeds = embed_batch(model, batch, prefix_mode)
        out = model.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"], use_cache=True,
                                output_scores=return_scores, return_dict_in_generate=True,
                                **generation_kwargs(decoding, model))
    ids = out.sequences
    # With only inputs_embeds given, HF returns just the new tokens; guard against versions that
    # prepend the prompt ids.
    if ids.shape[1] > decoding.max_new_tokens:
        ids = ids[:, embeds.shape[1]:]
    if return_scores:
        return ids, torch.stack(out.scores, dim=1)
    return ids


def generate_texts(model: EvalModel, requests: Sequence[GenRequest], decoding: DecodingConfig,
                   prefix_mode: str = "true", latents_from: Optional[Sequence[EvalCase]] = None) -> list[str]:
    ids = generate_token_ids(model, requests, decoding, prefix_mode, latents_from)
    return [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def length_sorted_batches(requests: Sequence[GenRequest], batch_size: int) -> list[list[int]]:
    """Indices of `requests` in batches of similar prompt length (less padding, same results)."""
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].example.prompt_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------- target loss
@torch.no_grad()
def target_losses(model: EvalModel, cases: Sequence[EvalCase], task: str, max_seq_len: int,
                  batch_size: int = 8, prefix_mode: str = "true",
                  latents_from: Optional[Sequence[EvalCase]] = None) -> list[float]:
    """Mean per-token NLL of each case's reference under the model (teacher forcing).

    The prompt and target are tokenized as in training (`with_target=True`) and fed as one left-padded
    "prompt", so the target occupies the last positions of every row. `latents_from` / `prefix_mode`
    select the ablation variant. Cases whose task is unavailable or reference empty get NaN.
    """
    out = [float("nan")] * len(cases)
    valid = []
    for i, c in enumerate(cases):
        try:
            prompt = build_prompt(task, cond_name=c.cond_name, caption=c.caption,
                                  global_summary=c.global_summary, case_captions=c.case_captions,
                                  with_image=model.uses_image)
        except TaskUnavailable:
            continue
        if not prompt.target.strip():
            continue
        ex = tokenize_prompt(prompt, model.tokenizer, max_seq_len, model.num_image_tokens, with_target=True)
        if ex is not None and ex.target_ids:
            valid.append((i, ex))
    for start in range(0, len(valid), batch_size):
        chunk = valid[start:start + batch_size]
        items = []
        for i, ex in chunk:
            src = latents_from[i] if latents_from is not None else cases[i]
            whole = TokenizedExample(ex.task, ex.uses_image, ex.prompt_ids + ex.target_ids, [], ex.has_bos)
            items.append(TrainItem(whole, None if src.latent is None else torch.as_tensor(src.latent),
                                   src.cond_id, block_tokens=None if src.block_tokens is None
                                   else torch.as_tensor(src.block_tokens)))
        batch = collate_generation(items, model.pad_id, model.num_image_tokens)
        batch = {k: (v.to(model.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with stock_attention(model):
            embeds = embed_batch(model, batch, prefix_mode)
            logits = model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], use_cache=False).logits.float()
        for row, (i, ex) in enumerate(chunk):
            n = len(ex.target_ids)
            pred = logits[row, -n - 1:-1]
            gold = torch.as_tensor(ex.target_ids, device=pred.device)
            out[i] = torch.nn.functional.cross_entropy(pred, gold).item()
    return out
