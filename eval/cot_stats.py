"""Token-length and truncation statistics of the MTL targets (the spec's check_cot_stats).

    python -m eval.cot_stats --shard-dir shards --tokenizer-path runs/uniform/final --max-seq-len 256
    python -m eval.cot_stats --json-path a.json b.json --tokenizer-path /models/mistral-7b

For each task: prompt / target / total token lengths (percentiles), how many examples truncation
cuts at `--max-seq-len` (prompt body, target) and by how many target tokens, how many are dropped;
and the sentence counts of the captions (task C needs >= 2, the spec's captions have 4). Lengths
come from `models.tasks` with the tokenizer actually used (a checkpoint's or a model's), so they are
exactly what training sees. Prints a table and writes JSON.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from transformers import AutoTokenizer

from common.cli import cli_main
from common.config import parse_config, print_config, save_config
from common.io import atomic_write_json
from eval.inputs import EvalCase, load_json_cases, load_shard_cases
from models.cond_names import COND_MAP_FILENAME, default_cond_name_to_id, load_cond_map
from models.tasks import (
    TASKS,
    TaskUnavailable,
    TruncationStats,
    build_prompt,
    prefix_length,
    split_sentences,
    tokenize_prompt,
)
from trainer.checkpoint import TRAIN_CONFIG_FILE
from trainer.config import TrainConfig, load_train_config

PERCENTILES = (50, 90, 95, 99, 100)


@dataclass
class CotStatsConfig:
    """Token lengths per task and what truncation at --max-seq-len cuts."""

    json_path: list[str] = field(default_factory=list, metadata={"help": "Gemini JSON file(s)"})
    shard_dir: Optional[str] = field(default=None, metadata={"help": "shard directory (instead of JSON)"})
    splits: list[str] = field(default_factory=lambda: ["train", "val"], metadata={"help": "shard splits read"})
    tokenizer_path: str = field(default="", metadata={"help": "checkpoint dir or model dir holding the tokenizer"})
    max_seq_len: int = field(default=0, metadata={"help": "truncation length (0 = the checkpoint's, else 256)"})
    num_image_tokens: int = field(default=0, metadata={"help": "image prefix tokens (0 = the checkpoint's, else 4)"})
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": "tasks to measure"})
    max_cases: int = field(default=0, metadata={"help": "cases read (0 = all)"})
    out_json: str = field(default="cot_stats.json", metadata={"help": "JSON output"})

    def validate(self) -> None:
        if bool(self.shard_dir) == bool(self.json_path):
            raise ValueError("give exactly one input: --shard-dir or --json-path")
        if not self.tokenizer_path:
            raise ValueError("--tokenizer-path is required (a checkpoint or model directory)")
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"--tasks: unknown {unknown}; known: {list(TASKS)}")


def _percentiles(values: Sequence[int]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values)
    out = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["mean"] = float(arr.mean())
    return out


def task_prompts(cases: Sequence[EvalCase], task: str):
    """The prompts training builds for `task` (text_summary: one per case); (prompts, unavailable)."""
    prompts, unavailable, seen = [], 0, set()
    for c in cases:
        if task == "text_summary":
            if c.case_id in seen:
                continue
            seen.add(c.case_id)
        try:
            prompts.append(build_prompt(task, cond_name=c.cond_name, caption=c.caption,
                                        global_summary=c.global_summary, case_captions=c.case_captions))
        except TaskUnavailable:
            unavailable += 1
    return prompts, unavailable


def compute_cot_stats(cases: Sequence[EvalCase], tokenizer, max_seq_len: int, num_image_tokens: int,
                      tasks: Sequence[str] = TASKS) -> dict:
    """Per-task length percentiles and truncation counts, and caption sentence counts."""
    enc = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else 0  # noqa: E731
    bos = int(tokenizer.bos_token_id is not None)
    eos = int(tokenizer.eos_token_id is not None)
    trunc = TruncationStats()
    per_task = {}
    for task in tasks:
        prompts, unavailable = task_prompts(cases, task)
        prompt_lens, target_lens, total_lens, cuts = [], [], [], []
        for p in prompts:
            n_prompt = bos + prefix_length(p.uses_image, num_image_tokens) + enc(p.head) + enc(p.body) + enc(p.tail)
            n_target = enc(p.target) + eos
            prompt_lens.append(n_prompt)
            target_lens.append(n_target)
            total_lens.append(n_prompt + n_target)
            ex = tokenize_prompt(p, tokenizer, max_seq_len, num_image_tokens, with_target=True)
            trunc.add(ex, task)
            if ex is not None and ex.target_cut:
                cuts.append(ex.target_cut)
        n = len(prompts)
        per_task[task] = {
            "examples": n, "unavailable": unavailable,
            "prompt_tokens": _percentiles(prompt_lens), "target_tokens": _percentiles(target_lens),
            "total_tokens": _percentiles(total_lens),
            "over_max_seq_len": int(sum(t > max_seq_len for t in total_lens)),
            "prompt_truncated": trunc.prompt_truncated[task], "target_truncated": trunc.target_truncated[task],
            "target_truncated_frac": trunc.target_truncated[task] / n if n else 0.0,
            "target_tokens_cut": trunc.target_tokens_cut[task],
            "target_cut_when_cut": _percentiles(cuts), "dropped": trunc.dropped[task],
        }
    sentences = Counter(len(split_sentences(c.caption)) for c in cases)
    return {"max_seq_len": max_seq_len, "num_image_tokens": num_image_tokens, "num_elements": len(cases),
            "num_cases": len({c.case_id for c in cases}), "tasks": per_task,
            "caption_sentences": {str(k): v for k, v in sorted(sentences.items())}}


def format_table(stats: dict) -> str:
    head = (f"{'task':<13} {'n':>6} {'tgt p50':>8} {'tgt p95':>8} {'tgt max':>8} {'tot p95':>8} "
            f"{'cut':>6} {'cut %':>6} {'cut p50':>8} {'prompt cut':>10} {'dropped':>7}")
    lines = [f"max_seq_len={stats['max_seq_len']} num_image_tokens={stats['num_image_tokens']} "
             f"elements={stats['num_elements']} cases={stats['num_cases']}", head, "-" * len(head)]
    for task, s in stats["tasks"].items():
        t, tot, c = s["target_tokens"], s["total_tokens"], s["target_cut_when_cut"]
        lines.append(f"{task:<13} {s['examples']:>6} {t.get('p50', 0):>8.0f} {t.get('p95', 0):>8.0f} "
                     f"{t.get('p100', 0):>8.0f} {tot.get('p95', 0):>8.0f} {s['target_truncated']:>6} "
                     f"{100 * s['target_truncated_frac']:>5.1f}% {c.get('p50', 0):>8.0f} "
                     f"{s['prompt_truncated']:>10} {s['dropped']:>7}")
    lines.append(f"caption sentence counts: {stats['caption_sentences']}")
    return "\n".join(lines)


def _checkpoint_train_config(path: Path) -> Optional[TrainConfig]:
    """The training config of a checkpoint directory; None for a model directory (or a seed checkpoint)."""
    cfg_path = path / TRAIN_CONFIG_FILE
    return load_train_config(cfg_path, ignore_unknown=True) if cfg_path.is_file() else None


def load_cases_for_stats(cfg: CotStatsConfig, cond_map: dict) -> list[EvalCase]:
    if cfg.shard_dir:
        cases = []
        for split in cfg.splits:
            cases += load_shard_cases(cfg.shard_dir, split, cond_map, max_cases=cfg.max_cases)
        return cases
    return load_json_cases(cfg.json_path, cond_map, max_cases=cfg.max_cases)


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_config(CotStatsConfig, argv)
    print_config(cfg)
    out = Path(cfg.out_json)
    save_config(cfg, out.with_name(out.stem + ".config.json"))
    tok_path = Path(cfg.tokenizer_path)
    tc = _checkpoint_train_config(tok_path)
    max_seq_len = cfg.max_seq_len or (tc.data.max_seq_len if tc is not None else 256)
    num_image_tokens = cfg.num_image_tokens or (tc.model.num_image_tokens if tc is not None else 4)
    cond_map = load_cond_map(tok_path) if (tok_path / COND_MAP_FILENAME).exists() else default_cond_name_to_id()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_path))
    stats = compute_cot_stats(load_cases_for_stats(cfg, cond_map), tokenizer, max_seq_len, num_image_tokens,
                              cfg.tasks)
    stats["tokenizer"] = str(tok_path)
    print(format_table(stats))
    atomic_write_json(cfg.out_json, stats)
    print(f"[cot_stats] wrote {cfg.out_json}")
    return stats


if __name__ == "__main__":
    main()
