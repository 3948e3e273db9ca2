"""Load an exported Stage2 model (written by `python -m eval.export`) and generate with plain transformers.

An export directory is a standard Hugging Face causal-LM directory (the LoRA already folded into the
weights) plus the image prefix in `prefix/` and a few JSON files (see the README.md inside it):

    lm, tokenizer, prefix, cond_map = load_exported("exported/")
    latent, block_tokens = image_latent(stage1_encoder, prefix, pixels)        # pixels [1, 3, S, S]
    prompt = build_prompt("summary", cond_name="shr6")                          # models.tasks
    text = generate_from_latent(lm, tokenizer, prefix, prompt, latent, cond_map["shr6"], block_tokens)

Generation builds the inputs exactly as evaluation does (`models.tasks.tokenize_prompt` +
`models.collate.collate_generation`: left padding, the prefix slots right after BOS, positions from
0 at each row's first real token) and writes the prefix into the prompt's input embeddings, so the
LM is called with `inputs_embeds`. This module needs only torch, transformers, safetensors and the
model library (`models.*`); neither the trainer nor eval.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import AutoModelForCausalLM

from models.collate import TrainItem, collate_generation
from models.cond_names import COND_MAP_FILENAME
from models.prefix_lm import Stage2Prefix, embed_with_prefix, load_tokenizer
from models.tasks import Prompt, tokenize_prompt

# The files of an export besides the Hugging Face ones (config.json, model.safetensors,
# generation_config.json, tokenizer files). The prefix lives in a sub-directory so that tools which
# load every *.safetensors of a model directory see the LM's weights only.
EXPORT_PREFIX_DIR = "prefix"  # Stage2Prefix.save: stage2_prefix_modules.safetensors, prefix_config.json (+ tail)
EXPORT_STAGE1_FILE = "stage1.json"  # the Stage1 encoder/classifier identity and settings the model expects
EXPORT_INFO_FILE = "export_info.json"  # where the export came from, the prompt budget
EXPORT_README = "README.md"

# Evaluation's decoding defaults (eval.modeling.DecodingConfig); any of them can be overridden.
DEFAULT_GENERATION = dict(max_new_tokens=128, num_beams=1, do_sample=False, no_repeat_ngram_size=4,
                          repetition_penalty=1.1)
DEFAULT_MAX_PROMPT_LEN = 1024
# As in evaluation, penalties act on the generated tokens only (the LM sees embeddings, not prompt ids).
warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with `inputs_embeds`")


def load_exported(export_dir: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """(lm, tokenizer, prefix, cond_name_to_id) of an export; `dtype` defaults to the saved one."""
    export_dir = Path(export_dir)
    if not (export_dir / EXPORT_PREFIX_DIR).is_dir():
        raise FileNotFoundError(f"{export_dir}: no {EXPORT_PREFIX_DIR}/ directory; not an export of eval.export")
    lm = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=dtype or "auto").to(device).eval()
    tokenizer = load_tokenizer(export_dir)  # AutoTokenizer, with a pad token
    prefix = Stage2Prefix.load(export_dir / EXPORT_PREFIX_DIR, map_location="cpu")
    prefix = prefix.to(device=device, dtype=lm.dtype).eval()
    cond_map = json.loads((export_dir / COND_MAP_FILENAME).read_text())
    return lm, tokenizer, prefix, cond_map


@torch.no_grad()
def image_latent(encoder, prefix: Stage2Prefix, pixels: torch.Tensor):
    """(latent [B, D], block tokens [B, T, D] or None) of normalised `pixels` [B, 3, S, S].

    `encoder` is a `models.stage1.Stage1Encoder`. When the export holds a fine-tuned Stage1 tail
    (K > 0 trained blocks), the tokens entering the last K blocks are returned too: the prefix then
    computes the latent with its own (fine-tuned) tail instead of the frozen blocks.
    """
    k = prefix.tail.num_blocks if prefix.tail is not None else 0
    return encoder.encode(pixels, trainable_blocks=k)


def _per_prompt(x, n: int, single: bool, item_ndim: int, what: str) -> list:
    """`x` as a list of n per-prompt items. One prompt: the item itself or a batch of one; several:
    a sequence or a tensor with a leading dimension of n (None: none for any prompt)."""
    if x is None:
        return [None] * n
    if single:
        if (item_ndim == 0 and isinstance(x, (list, tuple))) or getattr(x, "ndim", item_ndim) == item_ndim + 1:
            x = x[0]
        return [x]
    items = list(x)
    if len(items) != n:
        raise ValueError(f"{n} prompts but {len(items)} {what}")
    return items


@torch.no_grad()
def generate_ids(lm, tokenizer, prefix: Stage2Prefix, prompts: Prompt | Sequence[Prompt], latents=None,
                 cond_ids=None, block_tokens=None, max_prompt_len: int = DEFAULT_MAX_PROMPT_LEN,
                 **generate_kwargs) -> torch.Tensor:
    """New token ids [N, <= max_new_tokens] (padded with the pad id) for N prompts generated together.

    `latents` [N, D], `cond_ids` (N ints) and `block_tokens` [N, T, D] (only for exports with a Stage1
    tail) belong to the prompts in order (for one prompt: [D], an int, [T, D]); text-only prompts
    (task text_summary) use none of theirs. `generate_kwargs` override DEFAULT_GENERATION.
    """
    single = isinstance(prompts, Prompt)
    prompts = [prompts] if single else list(prompts)
    n = len(prompts)
    latents = _per_prompt(latents, n, single, 1, "latents")
    cond_ids = _per_prompt(cond_ids, n, single, 0, "cond ids")
    block_tokens = _per_prompt(block_tokens, n, single, 2, "block token sets")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = []
    for i, prompt in enumerate(prompts):
        ex = tokenize_prompt(prompt, tokenizer, max_prompt_len, prefix.num_image_tokens, with_target=False)
        if ex is None:
            raise ValueError(f"prompt {i} ({prompt.task}) does not fit max_prompt_len={max_prompt_len}")
        if prompt.uses_image and (latents[i] is None or cond_ids[i] is None):
            raise ValueError(f"prompt {i} ({prompt.task}) uses the image: give its latent and cond id")
        cond = int(cond_ids[i]) if cond_ids[i] is not None else 0
        items.append(TrainItem(ex, latents[i] if prompt.uses_image else None, cond,
                               block_tokens=block_tokens[i] if prompt.uses_image else None))
    device = lm.get_input_embeddings().weight.device
    batch = {k: (v.to(device) if torch.is_tensor(v) else v)
             for k, v in collate_generation(items, pad_id, prefix.num_image_tokens).items()}

    embeds = embed_with_prefix(lm, prefix, batch)  # the same splice as training and evaluation

    kwargs = {**DEFAULT_GENERATION, "pad_token_id": pad_id, "eos_token_id": tokenizer.eos_token_id,
              **generate_kwargs}
    out = lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], use_cache=True, **kwargs)
    # Given only inputs_embeds, HF returns the new tokens alone; guard against versions that prepend the prompt.
    return out[:, embeds.shape[1]:] if out.shape[1] > kwargs["max_new_tokens"] else out


def generate_from_latent(lm, tokenizer, prefix: Stage2Prefix, prompts: Prompt | Sequence[Prompt], latents=None,
                         cond_ids=None, block_tokens=None, max_prompt_len: int = DEFAULT_MAX_PROMPT_LEN,
                         **generate_kwargs):
    """The generated text for one prompt (a str), or a list of texts for a list of prompts."""
    ids = generate_ids(lm, tokenizer, prefix, prompts, latents, cond_ids, block_tokens, max_prompt_len,
                       **generate_kwargs)
    texts = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return texts[0] if isinstance(prompts, Prompt) else texts
