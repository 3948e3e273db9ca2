"""What every mode consumes: one seeded stream of real examples (prompts and targets built by
`models.tasks` from synthetic data, shards or a lengths file), packed or padded into batches:
the textbook layout for modes 1-3 (written here, independent of `models.collate`), the
trainer's collate for mode 4."""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from benchmarks.throughput.config import IGNORE_INDEX, LATENT_DIM, NUM_CLASSES, BenchConfig, parse_task_mix
from benchmarks.throughput.models import lm_config
from common.io import atomic_write_json
from data_prep.gemini import load_gemini_json
from data_prep.shard_format import CASES_FILENAME, decode_sample
from data_prep.synthetic import generate
from models.collate import TrainItem, collate_train
from models.cond_names import default_cond_name_to_id
from models.prefix_lm import load_tokenizer
from models.tasks import (
    IMAGE_TASKS,
    TASKS,
    TaskUnavailable,
    TokenizedExample,
    build_prompt,
    prefix_length,
    tokenize_prompt,
)
from tiny_models.lm import make_tiny_lm
from trainer.batch_tokens import AUTO_MAX_TOKENS

log = logging.getLogger(__name__)


@dataclass
class Example:
    """A tokenized example plus the image inputs the collators need."""

    tok: TokenizedExample
    latent: np.ndarray  # [768] float32
    cond_id: int

    def length(self, num_image_tokens: int) -> int:
        return (len(self.tok.prompt_ids) + len(self.tok.target_ids)
                + prefix_length(self.tok.uses_image, num_image_tokens))


@dataclass
class _Element:  # what an example is built from, whichever the source
    cond_name: str
    cond_id: int
    caption: str
    global_summary: str
    case_captions: Sequence[str]
    latent: Optional[np.ndarray] = None


def _elements_from_gemini(paths: Sequence[str]) -> list[_Element]:
    cases, _ = load_gemini_json(list(paths), default_cond_name_to_id(), strict=False)
    return [_Element(e.cond_name, e.cond_id, e.caption, c.global_summary, [x.caption for x in c.elements])
            for c in cases for e in c.elements]


def _elements_from_shards(shard_dir: str) -> list[_Element]:
    shards = sorted(str(p) for p in Path(shard_dir).glob("train-*.tar"))
    if not shards:
        raise FileNotFoundError(f"{shard_dir}: no train-*.tar shards")
    captions: dict[str, list[str]] = {}
    cases_file = Path(shard_dir) / CASES_FILENAME
    if cases_file.exists():
        for line in cases_file.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                captions[rec["case_id"]] = rec.get("captions", [])
    out = []
    for raw in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        s = decode_sample(raw)
        out.append(_Element(s.cond_name, s.cond_id, s.caption, s.global_summary,
                            captions.get(s.case_id, [s.caption]), s.latent.astype(np.float32)))
    return out


def _tokenize_elements(elements: list[_Element], tokenizer, cfg: BenchConfig) -> list[Example]:
    """One example per element, its task drawn from the mix (cot falls back to caption, as in
    the trainer); the latent is the shard's or a seeded random one (values don't change speed)."""
    rng = random.Random(cfg.seed)
    mix = parse_task_mix(cfg.task_mix)
    tasks, weights = list(mix), list(mix.values())
    num_image_tokens = cfg.model.num_image_tokens
    out = []
    for el in elements:
        task = rng.choices(tasks, weights)[0]
        try:
            prompt = build_prompt(task, cond_name=el.cond_name, caption=el.caption,
                                  global_summary=el.global_summary, case_captions=el.case_captions)
        except TaskUnavailable:
            prompt = build_prompt("caption", cond_name=el.cond_name, caption=el.caption)
        tok = tokenize_prompt(prompt, tokenizer, cfg.max_seq_len, num_image_tokens)
        if tok is None:
            continue
        latent = el.latent if el.latent is not None else \
            np.random.default_rng(rng.randrange(2**32)).standard_normal(LATENT_DIM).astype(np.float32)
        out.append(Example(tok, latent, el.cond_id))
    return out


def write_lengths_file(path: str, examples: list[Example]) -> None:
    atomic_write_json(path, {"examples": [
        {"task": e.tok.task, "uses_image": e.tok.uses_image, "prompt_len": len(e.tok.prompt_ids),
         "target_len": len(e.tok.target_ids)} for e in examples]})


def examples_from_lengths_file(path: str, vocab_size: int, bos_id: int, seed: int) -> list[Example]:
    """Examples of the recorded lengths with random token ids (ids don't change speed)."""
    try:
        records = json.loads(Path(path).read_text())["examples"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: expected {{'examples': [{{task, uses_image, prompt_len, "
                         f"target_len}}, ...]}} as --write-lengths writes it ({e})") from None
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(records):
        try:
            task, uses_image = r["task"], bool(r["uses_image"])
            prompt_len, target_len = int(r["prompt_len"]), int(r["target_len"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: examples[{i}] lacks or has a bad field: {e}") from None
        if task not in TASKS or prompt_len < 1 or target_len < 1:
            raise ValueError(f"{path}: examples[{i}]: bad task {task!r} or lengths {prompt_len}/{target_len}")
        ids = rng.integers(3, vocab_size, prompt_len + target_len).tolist()
        tok = TokenizedExample(task, uses_image and task in IMAGE_TASKS, [bos_id] + ids[1:prompt_len],
                               ids[prompt_len:], has_bos=True)
        out.append(Example(tok, rng.standard_normal(LATENT_DIM).astype(np.float32),
                           int(rng.integers(NUM_CLASSES))))
    return out


def example_stream(pool: list[Example], n: int, seed: int) -> list[Example]:
    """`n` examples: the pool in seeded shuffled passes, so the length mix is the pool's."""
    rng = random.Random(seed)
    out: list[Example] = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out += order
    return out[:n]


def length_stats(examples: list[Example], num_image_tokens: int) -> dict:
    lengths = [e.length(num_image_tokens) for e in examples]
    q = np.percentile(lengths, [10, 50, 90])
    tasks = {t: sum(e.tok.task == t for e in examples) for t in TASKS}
    return {"num_examples": len(lengths), "mean": round(statistics.fmean(lengths), 1),
            "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2]), "max": max(lengths),
            "tasks": tasks}


def pack_groups(stream: list[Example], count: int, num_image_tokens: int, token_budget: int,
                batch_size: int) -> list[list[Example]]:
    """`count` packed rows from the stream's start: `batch_size` examples each, or as many as fit
    in `token_budget` tokens."""
    groups, i = [], 0
    while len(groups) < count:
        group, used = [], 0
        while i < len(stream):
            n = stream[i].length(num_image_tokens)
            if (batch_size > 0 and len(group) == batch_size) or (batch_size <= 0 and group and used + n > token_budget):
                break
            group.append(stream[i])
            used += n
            i += 1
        if not group:
            raise RuntimeError("example stream exhausted while packing (internal sizing error)")
        groups.append(group)
    return groups


def doc_lengths(group: list[Example], num_image_tokens: int) -> list[int]:
    return [e.length(num_image_tokens) for e in group]


def _baseline_layout(ex: Example, pad_id: int, num_image_tokens: int):
    t = ex.tok
    p = prefix_length(t.uses_image, num_image_tokens)
    head, rest = (t.prompt_ids[:1], t.prompt_ids[1:]) if t.has_bos else ([], t.prompt_ids)
    ids = head + [pad_id] * p + rest + t.target_ids
    labels = [IGNORE_INDEX] * (len(ids) - len(t.target_ids)) + t.target_ids
    is_prefix = [False] * len(head) + [True] * p + [False] * (len(rest) + len(t.target_ids))
    return ids, labels, is_prefix


def baseline_batch(group: list[Example], pad_id: int, num_image_tokens: int, packed: bool,
                   pad_to: int = 0) -> dict:
    """Packed: one row, position_ids restarting per example, no attention mask (HF derives the
    document mask from position_ids). Padded: one row per example, right-padded to the longest
    (or to `pad_to`), with an attention mask."""
    rows = [_baseline_layout(e, pad_id, num_image_tokens) for e in group]
    positions = [list(range(len(r[0]))) for r in rows]
    if packed:  # concatenate the examples; positions still restart per example
        rows = [tuple(sum((r[k] for r in rows), []) for k in range(3))]
        positions = [sum(positions, [])]
    width = max(pad_to, max(len(r[0]) for r in rows))

    def pad(seqs, value):
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    batch = {"input_ids": pad([r[0] for r in rows], pad_id),
             "labels": pad([r[1] for r in rows], IGNORE_INDEX),
             "prefix_mask": pad([r[2] for r in rows], False),
             "position_ids": pad(positions, 0),
             "attention_mask": None if packed else pad([[1] * len(r[0]) for r in rows], 0)}
    img = [e for e in group if e.tok.uses_image]
    if img:
        batch["latents"] = torch.from_numpy(np.stack([e.latent for e in img]))
        batch["cond_ids"] = torch.tensor([e.cond_id for e in img])
    return batch


def project_batch(group: list[Example], pad_id: int, num_image_tokens: int) -> dict:
    items = [TrainItem(e.tok, e.latent, e.cond_id, key=f"ex{i}") for i, e in enumerate(group)]
    return collate_train(items, pad_id, num_image_tokens, packed=True)


def prepare_model_dir(cfg: BenchConfig, workdir: Path, corpus_json: Sequence[str]) -> Path:
    """A model dir `build_prefix_lm` can read: the tiny LM + its tokenizer; for a real shape, the same
    dir with that shape's config.json (weights are then built randomly by `random_weights`)."""
    model_dir = make_tiny_lm(workdir / "lm", corpus_json=list(corpus_json) or None,
                             corpus_texts=None if corpus_json else ["The image is a map."], seed=cfg.seed)
    if cfg.shape != "tiny":
        for f in model_dir.glob("*.safetensors"):
            f.unlink()  # never read: random_weights builds from the config
        lm_config(cfg.shape, model_dir, cfg.layers).save_pretrained(model_dir)
    return Path(model_dir)


def load_examples(cfg: BenchConfig, workdir: Path) -> tuple[list[Example], Path, object]:
    """(example pool, model dir, tokenizer)."""
    corpus: list[str] = list(cfg.gemini_json)
    if not (cfg.gemini_json or cfg.shard_dir or cfg.lengths_file):
        log.info("generating %d synthetic cases for the length mix", cfg.synthetic_cases)
        corpus = [str(p) for p in generate(workdir / "synthetic", num_cases=cfg.synthetic_cases,
                                           num_files=1, seed=cfg.seed, image_px=32)]
    model_dir = prepare_model_dir(cfg, workdir, corpus)
    tokenizer = load_tokenizer(cfg.tokenizer or model_dir)
    if cfg.lengths_file:
        vocab = min(len(tokenizer), lm_config(cfg.shape, model_dir, cfg.layers).vocab_size)
        pool = examples_from_lengths_file(cfg.lengths_file, vocab, tokenizer.bos_token_id or 1, cfg.seed)
    else:
        elements = _elements_from_shards(cfg.shard_dir) if cfg.shard_dir else _elements_from_gemini(corpus)
        pool = _tokenize_elements(elements, tokenizer, cfg)
    if not pool:
        raise ValueError("no usable examples (all dropped by truncation?)")
    return pool, model_dir, tokenizer


def stream_size(cfg: BenchConfig, pool: list[Example]) -> int:
    """Enough examples for the largest consumer (mode 2's biggest batch or a packed mode)."""
    n_steps = cfg.warmup_steps + cfg.steps
    mean_len = statistics.fmean(e.length(cfg.model.num_image_tokens) for e in pool)
    budget = AUTO_MAX_TOKENS if cfg.auto_budget else cfg.fixed_budget
    per_row = cfg.batch_size if cfg.batch_size > 0 else math.ceil(budget / max(1.0, min(
        e.length(cfg.model.num_image_tokens) for e in pool)))
    return n_steps * max(max(cfg.padded_batch_sizes), per_row, 1) + int(mean_len)
